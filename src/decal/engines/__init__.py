"""Inference engines: the one place a model runs (docs/design.md, "Inference engines").

Three engines give the same records for the same inputs, up to floating-point rounding:

- `hf` (default): transformers' forward pass and `generate` in this process (`decal.engines.hf`);
- `vllm`: a vLLM engine in this process (`decal.engines.vllm`): paged KV cache, continuous
  batching, prefix sharing, tensor and data parallelism, LoRA adapters served from one engine;
- `remote`: vLLM's OpenAI-compatible servers, one or many (`decal.engines.remote`): no weights
  here; the same requests as `vllm`, sent as token ids over HTTP, after exactness checks.

Each engine declares its name, options, capabilities and build steps in the registry
(`decal.engines.registry`); callers ask for capabilities, never for engine names.

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
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..errors import ConfigError
from .base import (
    Engine,
    EngineOptions,
    GeneratedDecision,
    OptionScores,
    check_lengths,
    length_sorted_batches,
    parse_engine_args,
)
from .registry import Capabilities, EngineKind, check_engine_name, check_option_names, engine_kind, engine_names

__all__ = [
    "Capabilities",
    "Engine",
    "EngineKind",
    "EngineOptions",
    "EnginePool",
    "EngineSpec",
    "GeneratedDecision",
    "OptionScores",
    "as_engine",
    "build_engine",
    "check_engine_name",
    "check_engine_options",
    "engine_kind",
    "engine_names",
    "length_sorted_batches",
    "parse_engine_args",
    "prepare_engine",
]

logger = logging.getLogger(__name__)


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


def check_engine_options(engine: str, options: EngineOptions | None = None, *, context: int | None = None,
                         devices: bool = True) -> None:
    """Check an engine name and its options without loading anything heavy (no weights, no network).

    Args:
        engine: a registered engine name (`engine_names()`).
        options: the engine options.
        context: the model's own context length, when known (checks --max-model-len against it).
        devices: check what this machine must have (vLLM installed, enough devices for the
            parallel layout); off for plans made for another machine.

    Raises:
        ConfigError: an unknown engine, an option the engine does not take (naming the engine
            that does), or a bad value (see each engine's `check_options`).
    """
    options = options or EngineOptions()
    check_option_names(engine, list(options.as_dict()))
    engine_kind(engine).check_options(options, context=context, devices=devices)


@dataclass
class EngineSpec:
    """A checked engine recipe: everything needed to build it, with the tokenizer loaded but no weights.

    Attributes:
        engine: a registered engine name.
        model: alias, GGUF file, local folder or hub id (as `decal.models` takes it).
        adapter: the LoRA adapter the engine applies (None: the base model); for the remote
            engine, the name (or folder) of a LoRA module the server serves.
        adapters: further adapters the engine will be asked for (`Engine.with_adapter`); vLLM
            sizes its LoRA slots by all of them.
        dtype, device, trust_remote_code, allow_pickle, offline: as `decal.models.load_model`; dtype
            is already resolved (`decal.dtypes.resolve_dtype`: never "auto" here; "server" for an
            engine that loads no weights).
        dtype_reason: why this dtype (one line, recorded in run.json).
        options: the engine options.
        tokenizer: the model's tokenizer (left padding, with a pad token).
        model_context: the longest prompt + completion the model takes: its config's context, or
            what the engine's preparation found (the remote engine: the server's max_model_len).
        context_name: how messages name `model_context`.
        fallbacks: what the preparation fell back on (one line each); the built engine's
            `Engine.fallbacks` start with them.
        api_key: a credential the engine sends (the remote engine's bearer token); never shown
            in a repr, a log or a file.
        prepared: what the engine's preparation keeps for `build` (the remote engine: its
            checked connection to the servers).
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
    context_name: str = "the model's context"
    fallbacks: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    prepared: Any = field(default=None, repr=False)

    @property
    def kind(self) -> EngineKind:
        """The engine's registry entry (its capabilities, options and build steps)."""
        return engine_kind(self.engine)

    def context_length(self) -> int | None:
        """The longest prompt + completion the engine will accept: --max-model-len, else the model's context."""
        return self.options.max_model_len or self.model_context

    def check_prompt_lengths(self, lengths: Sequence[int], *, reserve: int = 1, names: Sequence[str] | None = None) -> None:
        """Raise ValueError (one line) if a prompt plus `reserve` new tokens exceeds `context_length()`."""
        what = "--max-model-len" if self.options.max_model_len else self.context_name
        check_lengths(self.context_length(), lengths, reserve=reserve, names=names, what=what)

    def release(self) -> None:
        """Free what the preparation holds (the remote engine's connection) when the spec is not built."""
        release = getattr(self.prepared, "release", None)
        if release is not None:
            release()

    def build(self) -> Engine:
        """Load the weights (or connect to the servers) and start the engine."""
        built = self.kind.build(self)
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


def _resolve_dtype(kind: EngineKind, dtype: str | None, device: str):
    """(dtype, reason): resolved from the hardware for an engine that loads weights (None: float32),
    else the server's (None or "auto"; another dtype cannot be checked, so it is refused)."""
    from ..dtypes import resolve_dtype

    if kind.capabilities.loads_weights:
        resolved = resolve_dtype(dtype or "float32", device=device)  # an unknown dtype fails here
        return resolved.dtype, resolved.reason
    if dtype not in (None, "auto"):
        raise ConfigError(
            f"--dtype {dtype} applies to engines that load the weights here; the {kind.name} engine scores in the "
            "server's dtype (start vLLM with --dtype)"
        )
    return "server", "the server's dtype (vLLM's --dtype)"


def prepare_engine(
    engine: str,
    model: str,
    *,
    adapter: str | None = None,
    adapters: Sequence[str] = (),
    dtype: str | None = None,
    device: str = "cpu",
    options: EngineOptions | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool | None = None,
    api_key: str | None = None,
) -> EngineSpec:
    """Check an engine recipe and load the model's tokenizer and config (no weights).

    `dtype` may be "auto": it is resolved here from the hardware (`decal.dtypes.resolve_dtype`);
    None is float32 on an engine that loads weights, and the server's dtype on the remote engine.
    `api_key` is the remote engine's credential (default: $DECAL_SERVER_API_KEY there).

    Raises:
        ConfigError: a bad engine, option or dtype (see `check_engine_options`), or a server
            that fails the remote engine's exactness checks.
        ModelNotFoundError: an unknown model, or a missing or unsafe adapter.
    """
    from ..models import _check_adapter, _is_offline, load_tokenizer, resolve_model

    kind = engine_kind(engine)
    options = options or EngineOptions()
    resolved, reason = _resolve_dtype(kind, dtype, device)
    offline_ = _is_offline(offline)
    if kind.capabilities.loads_weights:
        for a in (adapter, *adapters):
            if a is not None:
                _check_adapter(a, offline=offline_, allow_pickle=allow_pickle)
    if api_key is not None and kind.capabilities.loads_weights:
        raise ConfigError(f"--api-key applies to engines that call a server (remote), not {engine}")
    check_engine_options(engine, options)  # before anything touches the model
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, offline=offline)
    source = resolve_model(model, offline=offline)
    fallbacks: list[str] = []
    config = _model_config(source, trust_remote_code=trust_remote_code, offline=offline_, fallbacks=fallbacks)
    context = _model_context(config)
    check_engine_options(engine, options, context=context)
    extra = tuple(str(a) for a in adapters if a is not None and str(a) != str(adapter))
    spec = EngineSpec(
        engine=engine, model=str(model), adapter=None if adapter is None else str(adapter), adapters=extra,
        dtype=resolved, dtype_reason=reason, device=device, options=options,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, offline=offline, tokenizer=tokenizer,
        model_context=context, api_key=api_key, fallbacks=tuple(fallbacks),
    )
    return kind.prepare(spec, config)


def build_engine(engine: str, model: str, **kwargs) -> Engine:
    """`prepare_engine(engine, model, **kwargs).build()`: check, then load and start the engine."""
    return prepare_engine(engine, model, **kwargs).build()


class EnginePool:
    """Engines shared by several jobs in one process: one engine per base model and engine recipe.

    A job asks for `pool.engine(spec)`; the first request for a (engine, model, dtype, options, ...)
    recipe builds it, with LoRA slots for every adapter `declare`d for that model, and later
    requests get it back (`Engine.with_adapter` for their adapter). On an engine with
    `shared_adapters` (vLLM: a `LoRARequest` on the running engine; remote: the server's LoRA
    modules), base, SFT, GRPO and calibration-aware GRPO of one model start the engine once
    (`decal run` uses this through `decal evaluate-many`).
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
            # A shared-adapter engine serves every adapter from its base; the hf engine keeps its first adapter merged.
            own = None if spec.kind.capabilities.shared_adapters else spec.adapter
            self._engines[key] = dataclasses.replace(spec, adapter=own, adapters=tuple(dict.fromkeys(adapters))).build()
            self.started += 1
        else:
            spec.release()
        base = self._engines[key]
        engine = base.with_adapter(spec.adapter)
        try:
            yield engine
        finally:
            if engine is not base:
                engine.close()  # an hf engine loaded for this adapter; a shared-adapter view closes nothing

    def close(self) -> None:
        """Close every pooled engine."""
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
