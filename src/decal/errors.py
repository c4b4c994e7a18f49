"""Error types that the CLI turns into one-line messages with a non-zero exit."""

from __future__ import annotations

__all__ = ["DecalError", "DataError", "ConfigError", "DecisionTokenCollisionError", "NotFittedError"]


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
    """Two options share their decision token under a tokenizer (see DESIGN.md, Decision token)."""


class NotFittedError(DecalError, ValueError, AttributeError):
    """A calibrator was used before `fit`."""
