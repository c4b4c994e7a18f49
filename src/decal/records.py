"""Prediction records: the one schema that scoring writes and metrics, calibrators, plots and reports read.

One JSON object per example (docs/design.md, "Prediction record"), appended to `predictions.jsonl`
in a run folder and flushed per batch, so an interrupted run resumes where it stopped. Records
are built from engine outputs in one place, `decal.recording`; this module holds the schema, its
reading and writing, and the rule a rerun must pass to resume into a run folder
(`check_resume`).

The gold label is optional in the schema: a served decision (`decal serve`) has none, so its
`label` and `correct` are None. Everything that needs gold (metrics, `read_records`,
`records_to_arrays` by default) refuses records without it, naming the record.

Raw and calibrated values live side by side (docs/design.md, "Label mass"): ``confidence`` and
``option_probs`` are always the model's full-vocabulary probabilities, and a calibrated run adds
``calibrated_probs`` (over the options, summing to 1) and ``calibrated_confidence``. Records that
earlier releases calibrated in place (raw values kept in ``extra.uncalibrated_*``) are read back
into this shape. An applied conformal run adds ``option_set`` (labels, in option order).
`records_to_arrays` stacks the scale metrics use: calibrated where the run is calibrated.
"""

from __future__ import annotations

import json

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

from .errors import ConfigError, DataError

__all__ = [
    "PredictionRecord",
    "RecordArrays",
    "RecordWriter",
    "read_records",
    "iter_records",
    "records_to_arrays",
    "completed_ids",
    "check_resume",
    "Scale",
]

_REQUIRED = ("id", "task", "split", "prediction", "valid", "confidence", "option_probs", "labels")
_GOLD = ("label", "correct")
# Optional fields left out of the JSON when None, so records without them are unchanged.
_OMIT_IF_NONE = ("true_probs", "calibrated_probs", "calibrated_confidence", "option_set")
# Calibrated probabilities are written with float rounding; a row may miss 1 by this much.
_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class PredictionRecord:
    """One example's decision: see docs/design.md, "Prediction record", for each field's meaning.

    `confidence` is the full-vocabulary probability of the emitted decision token (the forced
    decision's when `valid` is False); `option_probs[k]` is the full-vocabulary probability of
    option k's decision token at the decision position (not renormalised). `label_mass` is their
    sum, and `argmax_is_option` says whether the unconstrained top token there (`top_token`) is an
    option's decision token; both are set on every record `decal.recording` builds, and
    `label_mass` is computed from `option_probs` when a record is made without it (runs written
    before it existed). `label` and `correct` are None for a decision without gold (serving).
    `true_probs` (optional) is the true probability of each option, aligned with `labels`, for a
    task that knows it (`decal.tasks.verdicts`); it is left out of the JSON when None, so records
    of other tasks are unchanged. `calibrated_probs` / `calibrated_confidence` (optional, both or
    neither) are a post-hoc calibrator's distribution over the options and its value at the
    prediction; `option_set` (optional) is a conformal prediction set (module docstring).
    """

    id: str
    task: str
    split: str
    label: str | None
    prediction: str
    correct: bool | None
    valid: bool
    confidence: float
    option_probs: list[float]
    labels: list[str]
    label_mass: float | None = None
    argmax_is_option: bool | None = None
    true_probs: list[float] | None = None
    calibrated_probs: list[float] | None = None
    calibrated_confidence: float | None = None
    option_set: list[str] | None = None
    emitted_token: str | None = None
    completion: str | None = None
    model: str | None = None
    adapter: str | None = None
    seed: int | None = None
    prompt_version: str | None = None
    top_token: str | None = None
    seconds: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label_mass is None:
            # Clipped: K float32 probabilities can sum past 1 by a few ulps.
            object.__setattr__(self, "label_mass", min(1.0, float(sum(self.option_probs))))

    def as_dict(self) -> dict:
        """The record as a JSON-ready dict (the optional fields of `_OMIT_IF_NONE` left out when None)."""
        row = asdict(self)
        for key in _OMIT_IF_NONE:
            if row[key] is None:
                del row[key]
        return row

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), ensure_ascii=False, allow_nan=True)

    @classmethod
    def from_dict(cls, row: dict, *, path=None, line: int | None = None, require_gold: bool = True) -> "PredictionRecord":
        """Validate one decoded JSON object; errors name the file, line and field.

        With `require_gold` (the default, for everything that scores records) `label` and
        `correct` must be present; without it they may be null (a served decision). A record of
        an older run that holds `top_is_option` reads it as `argmax_is_option`.
        """
        if not isinstance(row, dict):
            raise DataError("expected a JSON object", path=path, line=line)
        for key in _REQUIRED + (_GOLD if require_gold else ()):
            if row.get(key) is None:
                raise DataError("missing required field", path=path, line=line, field=key)
        row = _migrate_in_place_calibration(row)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in row.items() if k in known}
        if "argmax_is_option" not in row and "top_is_option" in row:
            kwargs["argmax_is_option"] = row["top_is_option"]
        kwargs.setdefault("label", None)
        kwargs.setdefault("correct", None)
        _check_fields(row, path=path, line=line)
        _check_calibrated(row, row["labels"], path=path, line=line)
        _check_option_set(row.get("option_set"), row["labels"], path=path, line=line)
        kwargs["id"] = str(row["id"])
        return cls(**kwargs)

    def with_calibration(self, calibrated_probs: Sequence[float], calibrated_confidence: float, *, calibrator: str) -> "PredictionRecord":
        """A copy with a post-hoc calibrator's values beside the raw ones (which stay as they are).

        `label_mass` keeps the raw value: it is the mass of the uncalibrated `option_probs`.
        """
        return replace(
            self,
            calibrated_probs=[float(p) for p in calibrated_probs],
            calibrated_confidence=float(calibrated_confidence),
            extra={**self.extra, "calibrator": calibrator},
        )

    def with_option_set(self, option_set: Sequence[str]) -> "PredictionRecord":
        """A copy carrying a conformal option set (labels, kept in option order)."""
        chosen = set(option_set)
        return replace(self, option_set=[lab for lab in self.labels if lab in chosen])


def _migrate_in_place_calibration(row: dict) -> dict:
    """A record calibrated in place by an earlier release, in today's shape (module docstring).

    Those records overwrote `confidence` and `option_probs` and kept the raw values in
    ``extra.uncalibrated_confidence`` / ``extra.uncalibrated_option_probs``.
    """
    extra = row.get("extra")
    if "calibrated_probs" in row or not isinstance(extra, dict) or "uncalibrated_option_probs" not in extra:
        return row
    rest = {k: v for k, v in extra.items() if k not in ("uncalibrated_option_probs", "uncalibrated_confidence")}
    return {
        **row,
        "calibrated_probs": row["option_probs"],
        "calibrated_confidence": row["confidence"],
        "option_probs": extra["uncalibrated_option_probs"],
        "confidence": extra.get("uncalibrated_confidence", row["confidence"]),
        "extra": rest,
    }


def _is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _check_calibrated(row: dict, labels: list, *, path, line) -> None:
    probs, conf = row.get("calibrated_probs"), row.get("calibrated_confidence")
    if probs is None and conf is None:
        return
    if probs is None or conf is None:
        missing = "calibrated_probs" if probs is None else "calibrated_confidence"
        raise DataError("missing; a calibrated record carries calibrated_probs and calibrated_confidence",
                        path=path, line=line, field=missing)
    if not isinstance(probs, list) or len(probs) != len(labels) or not all(_is_probability(p) for p in probs):
        raise DataError(f"must be a list of {len(labels)} probabilities in [0, 1]; got {probs!r}",
                        path=path, line=line, field="calibrated_probs")
    if abs(sum(probs) - 1.0) > _SUM_TOLERANCE:
        raise DataError(f"must sum to 1 (a distribution over the options); sums to {sum(probs)!r}",
                        path=path, line=line, field="calibrated_probs")
    if not _is_probability(conf):
        raise DataError(f"must be a probability in [0, 1]; got {conf!r}", path=path, line=line, field="calibrated_confidence")


def _check_option_set(option_set, labels: list, *, path, line) -> None:
    if option_set is None:
        return
    if not isinstance(option_set, list) or any(lab not in labels for lab in option_set) or len(set(option_set)) != len(option_set):
        raise DataError(f"must be a list of distinct labels from {labels}; got {option_set!r}",
                        path=path, line=line, field="option_set")


def _check_fields(row: dict, *, path, line) -> None:
    """The value checks of `PredictionRecord.from_dict` (keys are known present)."""
    labels, probs = row["labels"], row["option_probs"]
    if not isinstance(labels, list) or len(labels) < 2:
        raise DataError("must be a list of at least two labels", path=path, line=line, field="labels")
    if not isinstance(probs, list) or len(probs) != len(labels):
        raise DataError(f"must be a list of {len(labels)} numbers", path=path, line=line, field="option_probs")
    mass = () if row.get("label_mass") is None else (("label_mass", row["label_mass"]),)
    for name, value in (("confidence", row["confidence"]), *(("option_probs", p) for p in probs), *mass):
        if not _is_probability(value):
            raise DataError(f"must be a probability in [0, 1]; got {value!r}", path=path, line=line, field=name)
    truth = row.get("true_probs")
    if truth is not None and (not isinstance(truth, list) or len(truth) != len(labels)
                              or not all(_is_probability(p) for p in truth)):
        raise DataError(
            f"must be a list of {len(labels)} probabilities in [0, 1] (one per label); got {truth!r}",
            path=path, line=line, field="true_probs",
        )
    for name in ("label", "prediction"):
        if row.get(name) is not None and row[name] not in labels:
            raise DataError(f"{row[name]!r} is not one of {labels}", path=path, line=line, field=name)
    for name in ("correct", "valid", "argmax_is_option"):
        if row.get(name) is not None and not isinstance(row[name], bool):
            raise DataError(f"must be true or false; got {row[name]!r}", path=path, line=line, field=name)
    if (row.get("label") is None) != (row.get("correct") is None):
        raise DataError("`label` and `correct` must both be set or both be null (a decision without gold)",
                        path=path, line=line, field="correct")


def iter_records(path: str | os.PathLike) -> Iterator[PredictionRecord]:
    """Stream records from a JSONL file, validating each line."""
    for _, record in _numbered_records(path):
        yield record


def _numbered_records(path: str | os.PathLike) -> Iterator[tuple[int, PredictionRecord]]:
    """(file line number, record) pairs; blank lines are skipped but still counted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 ({e.reason} at byte {e.start})", path=path, line=lineno) from e
            if not text.strip():
                continue
            try:
                # Stripped, so a line cut short reports the cut ("Unterminated string"), not its newline.
                row = json.loads(text.strip())
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=lineno) from e
            yield lineno, PredictionRecord.from_dict(row, path=path, line=lineno)


def read_records(path: str | os.PathLike) -> list[PredictionRecord]:
    """Read all records of a `predictions.jsonl` (or of a run folder holding one).

    Raises `DataError` on a malformed line, on duplicate ids, on records whose label sets differ
    (a run is one task: every consumer stacks them with `records_to_arrays`), and on an empty file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    records, seen = [], set()
    for lineno, rec in _numbered_records(path):
        if rec.id in seen:
            raise DataError(f"duplicate id {rec.id!r}", path=path, line=lineno, field="id")
        if records and rec.labels != records[0].labels:
            raise DataError(
                f"{rec.labels} differ from the labels {records[0].labels} of the first record; one run holds one task",
                path=path, line=lineno, field="labels",
            )
        seen.add(rec.id)
        records.append(rec)
    if not records:
        raise DataError("no prediction records", path=path)
    return records


Scale = Literal["calibrated", "raw"]


@dataclass(frozen=True)
class RecordArrays:
    """Records as plain arrays for the metric functions.

    confidence: (n,) float, the confidence metrics read: `calibrated_confidence` when the run is
        calibrated and `scale="calibrated"`, else the raw full-vocabulary `confidence`.
    class_probs: (n, K) rows summing to 1: `calibrated_probs`, or `option_probs` renormalised.
    option_probs: (n, K) the raw full-vocabulary option probabilities, whatever the scale.
    label_mass: (n,) the records' `label_mass`, the raw option probabilities' sum clipped at 1
        (docs/design.md, "Label mass").
    calibrated: whether `confidence` and `class_probs` are a calibrator's.
    correct, valid: (n,) bool; label_index, prediction_index: (n,) int;
    true_probs: (n, K) float when every record carries `true_probs`, else None;
    option_set: (n, K) bool membership when every record carries an `option_set`, else None.
    """

    confidence: np.ndarray
    correct: np.ndarray
    valid: np.ndarray
    option_probs: np.ndarray
    class_probs: np.ndarray
    label_index: np.ndarray
    prediction_index: np.ndarray
    labels: tuple[str, ...]
    true_probs: np.ndarray | None = None
    label_mass: np.ndarray | None = None
    calibrated: bool = False
    option_set: np.ndarray | None = None


def _all_or_none(records: Sequence[PredictionRecord], name: str, what: str) -> bool:
    """Whether every record has field `name` set; a DataError when only some have it."""
    has = getattr(records[0], name) is not None
    for r in records:
        if (getattr(r, name) is not None) != has:
            raise DataError(
                f"record {r.id!r} {'lacks' if has else 'has'} `{name}` unlike record {records[0].id!r}; "
                f"a run's records all carry {what} or none does",
                field=name,
            )
    return has


def records_to_arrays(records: Sequence[PredictionRecord], *, scale: Scale = "calibrated",
                      require_gold: bool = True) -> RecordArrays:
    """Stack records that share one label set into arrays.

    Args:
        records: prediction records of one run.
        scale: "calibrated" reads `calibrated_confidence` / `calibrated_probs` where the run has
            them (what metrics, thresholds and conformal sets use); "raw" always reads the
            full-vocabulary `confidence` and renormalised `option_probs` (what calibrators fit on).
        require_gold: refuse a record without gold (`label` None). False for consumers that read
            only the confidences (applying a calibrator to served decisions): there a record
            without gold gets `label_index` -1 and `correct` False, which mean nothing.

    Raises `DataError` if label sets differ, if some records carry `true_probs`, calibrated
    values or option sets and others not, or (with `require_gold`) if a record has no gold label.
    """
    if not records:
        raise DataError("no prediction records")
    if scale not in ("calibrated", "raw"):
        raise ValueError(f"`scale` must be 'calibrated' or 'raw'; got {scale!r}")
    labels = tuple(records[0].labels)
    for r in records:
        if tuple(r.labels) != labels:
            raise DataError(f"record {r.id!r} has labels {r.labels}, expected {list(labels)}", field="labels")
        if require_gold and r.label is None:
            raise DataError(f"record {r.id!r} has no gold label; metrics need labelled records", field="label")
    has_truth = _all_or_none(records, "true_probs", "the true probabilities")
    calibrated = _all_or_none(records, "calibrated_probs", "calibrated values") and scale == "calibrated"
    has_sets = _all_or_none(records, "option_set", "an option set")
    index = {lab: i for i, lab in enumerate(labels)}
    option_probs = np.asarray([r.option_probs for r in records], dtype=np.float64)
    totals = option_probs.sum(axis=1, keepdims=True)
    if calibrated:
        class_probs = np.asarray([r.calibrated_probs for r in records], dtype=np.float64)
        confidence = np.asarray([r.calibrated_confidence for r in records], dtype=np.float64)
    else:
        # A row with no mass on any option (possible in float underflow) becomes uniform over options.
        safe = np.where(totals > 0, totals, 1.0)
        class_probs = np.where(totals > 0, option_probs / safe, 1.0 / len(labels))
        confidence = np.asarray([r.confidence for r in records], dtype=np.float64)
    option_set = None
    if has_sets:
        option_set = np.zeros((len(records), len(labels)), dtype=bool)
        for i, r in enumerate(records):
            option_set[i, [index[lab] for lab in r.option_set]] = True
    return RecordArrays(
        confidence=confidence,
        correct=np.asarray([bool(r.correct) for r in records], dtype=bool),
        valid=np.asarray([r.valid for r in records], dtype=bool),
        option_probs=option_probs,
        class_probs=class_probs,
        label_index=np.asarray([index.get(r.label, -1) for r in records], dtype=np.int64),
        prediction_index=np.asarray([index[r.prediction] for r in records], dtype=np.int64),
        labels=labels,
        true_probs=np.asarray([r.true_probs for r in records], dtype=np.float64) if has_truth else None,
        label_mass=np.asarray([r.label_mass for r in records], dtype=np.float64),
        calibrated=calibrated,
        option_set=option_set,
    )


def completed_ids(path: str | os.PathLike) -> set[str]:
    """Ids already written to an append-only predictions file, repairing a torn last line.

    A crash (SIGKILL) can leave the last line half-written; that line is cut off so the
    example is scored again, and no id is lost or doubled.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    ids = set()
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            try:
                ids.add(str(json.loads(raw)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"cannot resume: unreadable record ({e})", path=path, line=lineno) from e
    return ids


class RecordWriter:
    """Append records to a JSONL file, flushing and syncing after each batch.

    Use as a context manager; `write_batch` is the unit that survives a crash.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def __enter__(self) -> "RecordWriter":
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def write_batch(self, records: Iterable[PredictionRecord | dict]) -> None:
        lines = []
        for r in records:
            if isinstance(r, PredictionRecord):
                lines.append(r.to_json())
            else:
                lines.append(json.dumps(r, ensure_ascii=False, allow_nan=True))
        if not lines:
            return
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_resume(out_dir: str | os.PathLike, settings: dict, *, write: bool = True, unknown: Sequence[str] = (),
                 legacy: dict | None = None, project=None) -> None:
    """The rule a rerun must pass to resume into a run folder: every setting that can change a
    record equals the one in its ``run.json`` (issue #20 item 4). `decal evaluate` and both analyses call it.

    Resuming with another setting (dtype, batch size, seed, marker, engine options, ...) would mix
    two experiments in one file of records, so it is refused in one line naming each differing
    setting, its recorded value and the new one.

    Args:
        out_dir: the run folder.
        settings: the settings that must match, by name; every key is compared.
        write: write `settings` as ``run.json`` when the folder has none (the analyses; `evaluate`
            writes its own fuller ``run.json``). False for an early check before the model loads.
        unknown: keys not known yet (left out of the comparison).
        legacy: the value a setting had before ``run.json`` recorded it, for runs of older versions.
        project: maps the stored ``run.json`` to the form of `settings` (default: as stored).

    Raises:
        ConfigError: a setting differs.
    """
    from ._io import read_json, write_json_atomic

    path = Path(out_dir) / "run.json"
    if not path.exists():
        if write:
            write_json_atomic(path, settings)
        return
    stored = read_json(path)
    old = {**(legacy or {}), **(project(stored) if project else stored)}
    settings = json.loads(json.dumps(settings, default=str))  # as stored: tuples read back as lists
    diff = sorted(k for k in settings if k not in unknown and old.get(k) != settings[k])
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in diff)
        raise ConfigError(
            f"{out_dir} holds a run with other settings ({details}); "
            f"rerun with the same options to resume, or pass another --out"
        )
