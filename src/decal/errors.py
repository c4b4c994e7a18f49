"""Error types that the CLI turns into one-line messages with a non-zero exit."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "DecalError",
    "DataError",
    "ConfigError",
    "DecisionTokenCollisionError",
    "DecisionPositionError",
    "PromptTooLongError",
    "NotFittedError",
    "did_you_mean",
]


class DecalError(Exception):
    """Base class of decal's own errors; the CLI prints `error: <message>` and exits 1."""


class DataError(DecalError, ValueError):
    """A data file (task rows, prediction records, calibrator JSON) is malformed.

    The message names the file and, where known, the line and the field.
    """

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            if field is not None:
                where += f": field '{field}'"
            where += ": "
        elif field is not None:
            where = f"field '{field}': "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class ConfigError(DecalError, ValueError):
    """An experiment, training or task configuration is invalid (unknown key, wrong type, bad value)."""


class DecisionTokenCollisionError(DecalError, ValueError):
    """Two options share their decision token under a tokenizer (docs/design.md, "Decision token")."""


class DecisionPositionError(DecalError, ValueError):
    """A prompt's decision token would not be read where it sits: the prompt's token ids are not a
    prefix of the tokenization of the prompt plus a label, or the label's decision token is not the
    first token after them (docs/design.md, "Decision position"). The message names the example,
    and `name` holds it (an example id, or ``inputs[3]`` in a request)."""

    def __init__(self, message: str, *, name: str | None = None):
        super().__init__(message)
        self.name = name


class PromptTooLongError(DataError):
    """A prompt, with the tokens that must follow it, does not fit a length limit (the model's
    context, the engine's --max-model-len, or a training run's ``max_prompt_length``)."""


class NotFittedError(DecalError, ValueError, AttributeError):
    """A calibrator was used before `fit`."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """The hint of an "Unknown ..." message: ' Did you mean: x?' for the choice closest to `name`, or ''.

    >>> did_you_mean("lerning_rate", ["learning_rate", "seed"])
    ' Did you mean: learning_rate?'
    """
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" Did you mean: {close[0]}?" if close else ""
