"""Settings of `decal serve`: the frozen config, the threshold and calibrator it applies, bind rules.

- `ServeConfig` holds every setting; the CLI builds it and nothing assigns to it afterwards.
- `load_threshold` reads `--threshold`: a number in [0, 1], the JSON that `decal threshold --out`
  writes (a threshold per label with its guarantees, `decal.selective.RiskControl`; how a server
  defers with it is `decal.serve.policy`), or that of an earlier release (its ``choice`` holds
  the threshold and the target accuracy and delta it was chosen for; a ``null`` threshold means
  no threshold reached the target, so every decision is deferred, as
  `decal.selective.apply_threshold(..., None)` accepts nothing).
- `load_served_calibrator` reads `--calibrator` with `decal.calibrators.load_calibrator` (JSON,
  never a pickle) and keeps its identity (method, path, sha256) for responses.
- `check_bind` refuses a non-loopback address without an API key unless `insecure`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from ..engines import EngineOptions
from ..errors import ConfigError, DataError

__all__ = [
    "API_KEY_ENV",
    "ServeConfig",
    "ThresholdInfo",
    "CalibratorInfo",
    "load_threshold",
    "load_served_calibrator",
    "is_loopback",
    "check_bind",
    "file_sha256",
]

API_KEY_ENV = "DECAL_API_KEY"

@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything `decal serve` runs with (see `decal serve --help` for each flag).

    model, adapter, dtype, device, trust_remote_code, allow_pickle, offline: as `decal evaluate`.
    task, split, data_dir, reasoning, max_new_tokens: the task whose labels and prompt template
        turn each input into a prompt (split: which split to read it from; None picks the first).
    calibrator, threshold: `--calibrator FILE`, `--threshold FILE|VALUE` (None: not given).
    conformal, min_label_mass: `--conformal FILE`, `--min-label-mass M` (`decal.serve.policy`).
    engine: a registered engine (`decal.engines.engine_names()`: hf, decal's batching queue over
        transformers; vllm; remote, vLLM servers at `engine_options.extra["server_urls"]`).
    host, port, api_key, insecure: where to listen and who may call.
    max_batch_size, max_wait_ms: a batch starts when it is full, or after `max_wait_ms`, or when no
        input came for a tenth of that (`decal.serve.batching`).
    max_queue: inputs accepted and waiting; past it requests get 503 (must be >= max_inputs).
    max_inputs: inputs per request; max_body_bytes: request body size.
    request_timeout_s: the longest a request may take before it gets 504.
    unsafe_label: the label `/v1/moderations` flags (default: the one spelled "unsafe").
    log_bodies: log request bodies (off: logs never hold them).
    threads: torch intra-op threads (None: torch's default).
    engine_options: `decal.engines.EngineOptions` (vllm: tensor parallelism, memory, extra arguments;
        remote: server URLs and limits).
    server_api_key: the remote engine's bearer token for its servers (not decal's own `api_key`);
        never in a repr, /v1/info or a log.
    prefix_cache: hf: compute the prompt prefix all requests share once (`decal.serve.prefix`).
    state_dir: the decision log's folder (`decal.serve.store`); None: no log, no feedback, no monitor.
    reference: the run folder of the monitor's reference window (None: the threshold file's
        calibration run when it exists, else the drift alarm watches the stream's own past).
    alarm_alpha: each alarm's false-alarm probability over the whole stream (`decal.serve.alarms`).
    monitor_window: decisions (and labels) in the monitor's analysis window.
    """

    model: str
    task: str
    adapter: str | None = None
    split: str | None = None
    data_dir: str | None = None
    reasoning: bool = False
    max_new_tokens: int = 256
    calibrator: str | None = None
    threshold: str | None = None
    conformal: str | None = None
    min_label_mass: float | None = None
    engine: str = "hf"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    offline: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 50.0
    max_queue: int = 256
    max_inputs: int = 64
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 30.0
    unsafe_label: str | None = None
    log_bodies: bool = False
    threads: int | None = None
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    prefix_cache: bool = True
    state_dir: str | None = None
    reference: str | None = None
    alarm_alpha: float = 0.05
    monitor_window: int = 500
    server_api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size, "max_queue": self.max_queue, "max_inputs": self.max_inputs,
            "max_body_bytes": self.max_body_bytes, "max_new_tokens": self.max_new_tokens,
            "monitor_window": self.monitor_window,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be an integer >= 1; got {value!r}")
        if self.max_queue < self.max_inputs:
            raise ConfigError(
                f"`max_queue` ({self.max_queue}) must be >= `max_inputs` ({self.max_inputs}), "
                f"or a request with max_inputs inputs could never be queued"
            )
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 60_000):
            raise ConfigError(f"`max_wait_ms` must be in [0, 60000]; got {self.max_wait_ms!r}")
        if not (isinstance(self.request_timeout_s, (int, float)) and self.request_timeout_s > 0):
            raise ConfigError(f"`request_timeout_s` must be > 0; got {self.request_timeout_s!r}")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ConfigError(f"`port` must be in [0, 65535]; got {self.port!r}")
        from ..engines import check_engine_name

        check_engine_name(self.engine)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"`threads` must be >= 1; got {self.threads!r}")
        if not (isinstance(self.alarm_alpha, (int, float)) and 0.0 < self.alarm_alpha < 1.0):
            raise ConfigError(f"`alarm_alpha` must be in (0, 1); got {self.alarm_alpha!r}")
        if self.reference is not None and self.state_dir is None:
            raise ConfigError("`--reference` sets the monitor's reference window; the monitor needs `--state-dir`")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("`api_key` must not be empty; leave it out to serve without one")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (identifies the calibrator and threshold a server applies)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ThresholdInfo:
    """The threshold a server applies to calibrated confidences: defer when below it.

    value: the threshold, or None when the source chose none (then every decision is deferred).
    source: "value" or the JSON file's path; sha256: the file's hash (None for a value).
    target_accuracy, delta, coverage: what the threshold was chosen for, from the JSON file.
    calibration_run: the run it was chosen on (the file's ``calibration_run``), if recorded.
    risk_control: a per-label threshold file (`decal.selective.RiskControl`); then `value` is
        None, `target_accuracy` the level of its accuracy target if any, and `scale` the
        confidence its thresholds compare.
    """

    value: float | None
    source: str
    sha256: str | None = None
    target_accuracy: float | None = None
    delta: float | None = None
    coverage: float | None = None
    calibration_run: str | None = None
    risk_control: object = None
    scale: str | None = None

    def defers(self, calibrated_confidence: float, label: str | None = None) -> bool:
        """Whether a decision (of `label`, for a per-label file) with this calibrated confidence is deferred."""
        rc = self.risk_control
        if rc is not None:
            return bool(rc.defers([rc.labels.index(label)], [calibrated_confidence])[0])
        return self.value is None or not (calibrated_confidence >= self.value)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("risk_control", "scale")}
        rc = self.risk_control
        if rc is not None:
            out.update(scale=self.scale, thresholds=dict(rc.thresholds), band=rc.band(), deferral_rate=rc.deferral_rate,
                       guarantees=[str(t) for t, ok in zip(rc.targets, rc.certified) if ok])
        return out


def _parse_value(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def load_threshold(spec: str) -> ThresholdInfo:
    """A threshold from `--threshold`: a number in [0, 1] or a `decal threshold --out` JSON file.

    Raises:
        ConfigError: a number outside [0, 1].
        DataError: a JSON file without ``choice.threshold`` (the message names the file and field).
        FileNotFoundError: neither a number nor an existing file.
    """
    from .._io import read_json

    value = _parse_value(spec)
    if value is not None:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"`--threshold` must be a number in [0, 1] or a JSON file; got {spec!r}")
        return ThresholdInfo(value=value, source="value")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--threshold {spec}: neither a number in [0, 1] nor a file")
    data = read_json(path)
    if isinstance(data, dict) and data.get("kind") == "decal.risk_control":
        return _risk_control_threshold(path, data)
    choice = data.get("choice") if isinstance(data, dict) else None
    if not isinstance(choice, dict):
        raise DataError("missing; expected the JSON that `decal threshold --out` writes", path=path, field="choice")
    if "threshold" not in choice:
        raise DataError("missing", path=path, field="choice.threshold")
    raw = choice["threshold"]
    if raw is not None and (isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0.0 <= raw <= 1.0):
        raise DataError(f"must be a number in [0, 1] or null; got {raw!r}", path=path, field="choice.threshold")

    def number(key: str) -> float | None:
        v = choice.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return ThresholdInfo(
        value=None if raw is None else float(raw), source=str(path), sha256=file_sha256(path),
        target_accuracy=number("target_accuracy"), delta=number("delta"), coverage=number("coverage"),
        calibration_run=data.get("calibration_run") if isinstance(data.get("calibration_run"), str) else None,
    )


def _risk_control_threshold(path: Path, data: dict) -> ThresholdInfo:
    """A per-label threshold file of `decal threshold --out` as a `ThresholdInfo`."""
    from ..selective import RiskControl

    rc = RiskControl.from_dict(data, path=path)
    accuracy = [t.level for t, ok in zip(rc.targets, rc.certified) if t.quantity == "accuracy" and ok]
    run = data.get("calibration_run")
    return ThresholdInfo(
        value=None, source=str(path), sha256=file_sha256(path), target_accuracy=accuracy[0] if accuracy else None,
        delta=rc.delta, coverage=1.0 - rc.deferral_rate, calibration_run=run if isinstance(run, str) else None,
        risk_control=rc, scale=data.get("scale") if isinstance(data.get("scale"), str) else None,
    )


@dataclass(frozen=True, kw_only=True)
class CalibratorInfo:
    """A loaded calibrator and its identity (method, path, sha256 of the file)."""

    calibrator: object
    method: str
    path: str
    sha256: str

    def to_dict(self) -> dict:
        return {"method": self.method, "path": self.path, "sha256": self.sha256}


def load_served_calibrator(path: str | os.PathLike) -> CalibratorInfo:
    """Load a `decal calibrate` calibrator.json (JSON of plain numbers; never a pickle)."""
    from ..calibrators import load_calibrator

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--calibrator {path}: no such file")
    calibrator = load_calibrator(path)
    return CalibratorInfo(calibrator=calibrator, method=calibrator.name, path=str(path), sha256=file_sha256(path))


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or "localhost"."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without an API key, unless `insecure` (issue 16, item 5).

    Raises:
        ConfigError: a non-loopback `host` with neither an API key nor `insecure`.
    """
    if is_loopback(host) or api_key or insecure:
        return
    raise ConfigError(
        f"refusing to listen on {host!r} without an API key: pass --api-key (or set {API_KEY_ENV}), "
        f"or --insecure to serve anyone who can reach this address"
    )
