"""The engine registry: each inference engine declares its name, options, capabilities and build steps.

An `EngineKind` is everything decal knows about an engine without running it:

- `name` (`--engine NAME`) and a one-line `summary` for the CLI's help;
- `options`: the option names it takes, each with the CLI flag that sets it (`EngineOption`);
  options outside that list go through `--engine-arg KEY=VALUE` when the engine accepts any
  (`open_options`, e.g. vLLM's engine arguments) and are refused otherwise;
- `capabilities` (`Capabilities`): what callers may rely on. Callers ask for a capability
  (`engine_kind(name).capabilities.shared_adapters`), never compare engine names;
- `check_options`, `prepare` and `build`: check the options (no weights, no network), finish an
  `EngineSpec` (engine-specific checks, e.g. the vLLM CPU build's head sizes, or the remote
  engine's exactness checks against its server), and build the engine.

The engines of decal (`hf`, `vllm`, `remote`) declare themselves in their own modules
(`decal.engines.hf.KIND`, ...), which are imported here on first use; `register_engine` adds
another.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError

__all__ = [
    "Capabilities",
    "EngineKind",
    "EngineOption",
    "register_engine",
    "engine_kind",
    "engine_kinds",
    "engine_names",
    "check_engine_name",
    "check_option_names",
    "option_flag",
    "option_args",
]

# The modules of decal's own engines; each defines `KIND`.
_BUILTIN = ("decal.engines.hf", "decal.engines.vllm", "decal.engines.remote")
_KINDS: dict[str, "EngineKind"] = {}
_LOADED = False


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What an engine guarantees, for callers that must choose how to use it.

    exact_probabilities: option probabilities are full-vocabulary probabilities at temperature 1
        (docs/design.md, "Inference engines"); an engine without it is not registered.
    per_request_seeds: each prompt samples with its own seed, whatever else is in the call, so a
        rerun or a regrouped call gives the same completions.
    adapters: LoRA adapters can be applied (`--adapter`).
    shared_adapters: adapters are served from one running engine of the base model
        (`Engine.with_adapter` costs nothing), so jobs on one model and its adapters share it.
    data_parallel: `--data-parallel-size` runs several copies.
    continuous_batching: the engine schedules its own batches; callers hand it everything that
        is waiting (up to `Engine.call_size`) rather than forming batches.
    loads_weights: the weights load in this process (`--dtype`, `--device`, `--trust-remote-code`,
        `--allow-pickle` apply); False for an engine that calls a server.
    local_forward: the forward pass is transformers' in this process, so torch's thread count and
        decal's shared prompt-prefix cache (`decal.serve.prefix`) apply.
    rl_sampler: the engine samples GRPO's completions for `decal train` (`training.engine`,
        `decal.training.vllm_sampler`: the LoRA adapter served each step); without it TRL's own
        generation in the trainer samples.
    """

    exact_probabilities: bool = True
    per_request_seeds: bool = False
    adapters: bool = True
    shared_adapters: bool = False
    data_parallel: bool = False
    continuous_batching: bool = False
    loads_weights: bool = True
    local_forward: bool = False
    rl_sampler: bool = False


@dataclass(frozen=True)
class EngineOption:
    """One named engine option: its key in `EngineOptions` / `engine_options`, its CLI flag, and
    whether the flag repeats (a list value, e.g. `--server-url` once per replica)."""

    key: str
    flag: str
    repeated: bool = False


@dataclass(frozen=True, kw_only=True)
class EngineKind:
    """An inference engine as the registry knows it (see the module docstring).

    check_options(options, context, devices): raise ConfigError for a bad option value;
        `context` is the model's own context length when known, `devices` whether to check the
        devices of this machine. Option names are checked by the registry before it is called.
    prepare(spec, model_config) -> EngineSpec: engine-specific checks once the tokenizer and
        the model's config (None if unreadable) are loaded, no weights; returns the spec, with
        fields filled in where the engine knows more (the remote engine: the server's context).
    build(spec) -> Engine: load the weights (or connect) and return the engine.
    """

    name: str
    summary: str
    capabilities: Capabilities
    options: tuple[EngineOption, ...] = ()
    open_options: bool = False
    open_options_hint: str = ""
    check_options: Callable[..., None] = field(default=lambda options, *, context=None, devices=True: None)
    prepare: Callable[[Any, Any], Any] = field(default=lambda spec, model_config: spec)
    build: Callable[[Any], Any] | None = None

    def flag(self, key: str) -> str | None:
        """The CLI flag of a named option, or None when `key` is not one of this engine's."""
        return next((o.flag for o in self.options if o.key == key), None)


def register_engine(kind: EngineKind) -> EngineKind:
    """Add an engine to the registry (an engine of the same name is replaced)."""
    if not kind.capabilities.exact_probabilities:
        raise ConfigError(
            f"engine {kind.name!r} does not give full-vocabulary option probabilities; decal refuses approximations "
            "(docs/design.md, 'Inference engines')"
        )
    _KINDS[kind.name] = kind
    return kind


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in _BUILTIN:
            register_engine(importlib.import_module(module).KIND)


def engine_kinds() -> list[EngineKind]:
    """Every registered engine, decal's own first."""
    _load()
    return list(_KINDS.values())


def engine_names() -> tuple[str, ...]:
    """The names `--engine` takes."""
    return tuple(k.name for k in engine_kinds())


def check_engine_name(name: str) -> str:
    """`name` if it is a registered engine, else a ConfigError naming the choices."""
    if name not in engine_names():
        close = difflib.get_close_matches(str(name), engine_names(), n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ConfigError(f"unknown engine {name!r}; choose one of: {', '.join(engine_names())}.{hint}".rstrip("."))
    return name


def engine_kind(name: str) -> EngineKind:
    """The registered engine called `name` (ConfigError naming the choices if there is none)."""
    return _KINDS[check_engine_name(name)]


def option_flag(key: str) -> str:
    """The CLI flag that sets option `key` on whichever engine names it, else `--engine-arg key`."""
    for kind in engine_kinds():
        if kind.flag(key):
            return kind.flag(key)  # type: ignore[return-value]
    return f"--engine-arg {key}"


def check_option_names(name: str, keys: Sequence[str]) -> None:
    """Refuse an option the engine does not take, naming the engine that does when there is one."""
    kind = engine_kind(name)
    own = {o.key for o in kind.options}
    for key in keys:
        if key in own:
            continue
        if "api_key" in key or "token" in key or "password" in key:
            raise ConfigError(f"{key} is never an engine option (options are recorded in run.json and configs): "
                              "pass --api-key, or set $DECAL_SERVER_API_KEY")
        owners = [k.name for k in engine_kinds() if k.name != name and k.flag(key)]
        if owners:
            raise ConfigError(f"{option_flag(key)} applies to --engine {' or '.join(owners)} only, not {name}")
        if not kind.open_options:
            close = difflib.get_close_matches(key, sorted(own), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            takes = f"; it takes {', '.join(sorted(own))}" if own and not close else ""
            if not own:
                raise ConfigError(f"--engine-arg {key}: the {name} engine takes no engine options")
            raise ConfigError(f"--engine-arg {key} is not an option of the {name} engine{hint}{takes}")


def option_args(name: str, options: Mapping[str, Any]) -> list[str]:
    """Command-line arguments that set `options` on engine `name` (the inverse of the CLI's parsing).

    Named options become their flags (a repeated flag once per list item); any other key becomes
    `--engine-arg KEY=VALUE`, its value written as a YAML scalar that `parse_engine_args` reads back.
    """
    import json

    import yaml

    kind = engine_kind(name)
    named = {o.key: o for o in kind.options}
    args: list[str] = []
    for key, value in options.items():
        option = named.get(key)
        if option is not None and option.repeated:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                args += [option.flag, str(item)]
        elif option is not None:
            args += [option.flag, str(value)]
        else:
            text = value if isinstance(value, str) and yaml.safe_load(value) == value else json.dumps(value)
            args += ["--engine-arg", f"{key}={text}"]
    return args
