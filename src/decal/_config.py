"""Config files validated by pydantic into frozen dataclasses: one mechanism for every decal config.

Experiment configs (`decal.experiments.config`) and training configs (`decal.training.config`)
are plain frozen dataclasses declared with `config_dataclass`. Their field annotations are the
schema: `validate_config` hands a decoded YAML (or JSON, or CLI) mapping to pydantic's
`TypeAdapter` and turns the first problem into one `ConfigError` line that names the file, the
key path (`methods[1].train.cal_lambda`) and, for a misspelt key or choice, the closest name:

    Unknown key `methods[1].methd`. Did you mean: method? Available: name, method, ...
    `calibrators[0].fit_fraction` must be a number; got 'half'.
    Unknown `cal_target` 'unifrom'. Did you mean: uniform? Available: uniform, group-accuracy.
    `models[0].path` is required (What `decal evaluate/train --model` receives: ...).

A new setting is one annotated field with `metadata={"help": ...}`; a new choice is one more
value in its `Literal[...]`. Cross-field rules stay in the dataclass's `__post_init__`, which
raises `ConfigError`; the message gains the path of the object that broke the rule.

Types are checked as JSON would have them (pydantic's strict JSON mode): an integer field takes
an integer (not `true`, not `2.5`), a boolean field `true` or `false` (not `"yes"`), a string
field a non-empty string, a float field any finite number. One exception, for YAML: PyYAML reads YAML
1.1, where `1e-3` (no dot) is a string, so a float field given a string written as a number
takes that number. Lists become the tuples the dataclasses declare.

    >>> @config_dataclass
    ... class Demo:
    ...     lr: float = 1e-3
    ...     steps: int = 10
    >>> validate_config(Demo, {"lr": "5e-4", "steps": 3})
    Demo(lr=0.0005, steps=3)
    >>> validate_config(Demo, {"step": 3}, source="demo.yaml")
    Traceback (most recent call last):
    ...
    decal.errors.ConfigError: demo.yaml: Unknown key `step`. Did you mean: steps? Available: lr, steps.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import functools
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from typing_extensions import dataclass_transform

from ._io import read_text
from .errors import ConfigError, did_you_mean

__all__ = ["config_dataclass", "validate_config", "load_yaml"]

# pydantic's settings for every config dataclass: unknown keys are errors, strings non-empty, numbers finite.
# A plain dict: pydantic's `ConfigDict` is a TypedDict, and pydantic is imported only to validate.
_PYDANTIC_CONFIG = {"extra": "forbid", "str_min_length": 1, "allow_inf_nan": False}
# Numbers as YAML 1.2 writes them; YAML 1.1 (PyYAML) reads `1e-3` or `5E+2` as strings.
_YAML_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")
_MISSING = ("missing", "missing_keyword_argument")
_RULE_BROKEN = ("value_error", "assertion_error")


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(dataclasses.field,))
def config_dataclass(cls: type) -> type:
    """`@dataclass(frozen=True, kw_only=True)` for a config class that `validate_config` validates.

    Every dataclass a config nests must be declared with it, so that an unknown key inside it is
    an error too.
    """
    cls.__pydantic_config__ = _PYDANTIC_CONFIG
    return dataclass(frozen=True, kw_only=True)(cls)


def validate_config(cls: type, data: Any, *, source: str | None = None, where: str = "", partial: bool = False):
    """Validate a decoded mapping into the config dataclass `cls` (see the module docstring).

    Args:
        cls: a `config_dataclass`.
        data: the mapping (from `load_yaml`, `json.load` or command-line flags); not modified.
        source: what the values came from (a file path), put first in every message; None: nothing.
        where: the key path of `data` inside a larger config (e.g. `methods[2].train`), put before
            every key path in the messages.
        partial: check the keys and the type of each value given, and return them as a dict of the
            converted values, without requiring the others or running `__post_init__` (for one
            layer of settings that is merged with others before the whole config exists).

    Returns:
        The validated `cls` instance, or with `partial` the dict of converted values.

    Raises:
        ConfigError: the first problem, in one line: an unknown key before anything else.
    """
    from pydantic import ValidationError

    adapter = _adapter(cls, partial)
    for _ in range(2):  # a second pass only after YAML-1.1 number strings were converted
        try:
            # YAML's other scalars (dates) as the text they were written as.
            return adapter.validate_json(json.dumps(data, default=str), strict=True)
        except ValidationError as e:
            errors = e.errors(include_url=False)
        fixed = _numbers_from_strings(cls, data, errors)
        if fixed is None:
            break
        data = fixed
    first = next((e for e in errors if e["type"] in _UNKNOWN_KEY), errors[0])
    message = _message(cls, first, data, where)
    raise ConfigError(f"{source}: {message}" if source else message) from None


def load_yaml(path: str | Path, *, what: str) -> Any:
    """Read a YAML file with `yaml.safe_load` (plain data only: no Python objects).

    Args:
        path: the file.
        what: what the file holds, for the messages ("experiment config").

    Returns:
        The decoded data (None for an empty file).

    Raises:
        FileNotFoundError: no such file.
        DataError: the file is not UTF-8 (naming the line).
        ConfigError: invalid YAML, naming the file and line.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(" ".join(f"{path}{line}: invalid YAML ({problem})".split())) from e


# --- building the validators ---------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _adapter(cls: type, partial: bool):
    from pydantic import TypeAdapter

    if not partial:
        return TypeAdapter(cls)
    from typing_extensions import TypedDict

    hints = _field_types(cls)
    values = TypedDict(f"{cls.__name__}Values", {f.name: hints[f.name] for f in dataclasses.fields(cls)}, total=False)
    values.__pydantic_config__ = _PYDANTIC_CONFIG
    return TypeAdapter(values)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --- reading pydantic's errors against the dataclasses ---------------------------------------


def _non_none(tp: Any) -> Any:
    """`X` for `X | None`; a union of several types stays a union."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _resolve(cls: type, loc: tuple) -> tuple[list, Any]:
    """The data path of an error location and the declared type there.

    pydantic puts the member's name into the location of an error inside a union
    (`lora_target_modules`, `list[str]`, 0); such an error is reported at the union itself.
    """
    tp: Any = cls
    path: list = []
    for item in loc:
        tp = _non_none(tp)
        if _is_union(tp):
            break
        path.append(item)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            tp = _field_types(tp).get(item, Any)
        elif origin in (tuple, list) and isinstance(item, int):
            tp = typing.get_args(tp)[0]
        else:
            tp = Any
    return path, _non_none(tp)


def _key_path(path: list, where: str) -> str:
    out = where
    for item in path:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def _value_at(data: Any, path: list) -> Any:
    for item in path:
        data = data[item]
    return data


def _describe(tp: Any) -> str:
    """What a value of type `tp` is, for "must be ..." messages."""
    tp = _non_none(tp)
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (tuple, list):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is dict or (isinstance(origin, type) and issubclass(origin, collections.abc.Mapping)):
        return "a mapping of settings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}.get(tp, str(tp))


def _message(cls: type, error: dict, data: Any, where: str) -> str:
    loc, kind = error["loc"], error["type"]
    if loc and loc[-1] == "[key]":  # a mapping's key, not its value
        name = _key_path(_resolve(cls, loc[:-2])[0], where)
        return f"`{name}` must have non-empty string keys; got {error['input']!r}."
    path, tp = _resolve(cls, loc)
    name = _key_path(path, where)
    if kind in _UNKNOWN_KEY:
        allowed = [f.name for f in dataclasses.fields(_resolve(cls, error["loc"][:-1])[1])]
        key = str(path[-1])
        return (f"Unknown key `{name}`.{did_you_mean(key.replace('-', '_'), allowed)} "
                f"Available: {', '.join(allowed)}.")
    if kind in _MISSING:
        owner = _resolve(cls, error["loc"][:-1])[1]
        help_text = next((f.metadata.get("help", "") for f in dataclasses.fields(owner) if f.name == path[-1]), "")
        return f"`{name}` is required" + (f" ({help_text})" if help_text else "") + "."
    if kind in _RULE_BROKEN:
        rule = str(error.get("ctx", {}).get("error", error["msg"]))
        return f"{name}: {rule}" if name else rule
    # An error inside a union is reported at the union, with the whole value there.
    value = _value_at(data, path) if len(path) < len(loc) else error["input"]
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return (f"Unknown `{name}` {value!r}.{did_you_mean(str(value), [str(c) for c in choices])} "
                f"Available: {', '.join(map(str, choices))}.")
    rule = "a finite number" if kind == "finite_number" else _describe(tp)
    return f"`{name or 'config'}` must be {rule}; got {value!r}."


def _numbers_from_strings(cls: type, data: Any, errors: list[dict]) -> Any:
    """A copy of `data` with each YAML-1.1 number string that a float field rejected converted,
    or None when there is none."""
    fixes = []
    for error in errors:
        value = error.get("input")
        if error["type"] != "float_type" or not isinstance(value, str) or not _YAML_NUMBER.fullmatch(value.strip()):
            continue
        path, tp = _resolve(cls, error["loc"])
        if tp is float and len(path) == len(error["loc"]):
            fixes.append((path, float(value)))
    if not fixes:
        return None
    data = copy.deepcopy(data)
    for path, number in fixes:
        _value_at(data, path[:-1])[path[-1]] = number
    return data
