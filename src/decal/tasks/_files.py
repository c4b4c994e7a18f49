"""Strict readers for task files: every problem becomes a `DataError` naming the file and line.

Nothing is skipped: a blank line inside a JSONL file, a malformed line, non-UTF-8 bytes or an
empty file stops the load with a one-line message.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterator

from ..errors import DataError

__all__ = ["read_text", "iter_jsonl", "iter_csv", "read_template"]


def read_text(path: str | os.PathLike) -> str:
    """The file's text; raises FileNotFoundError, or DataError on non-UTF-8 bytes or no content."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a file, got a folder: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8", path=path, line=line) from e
    if not text.strip():
        raise DataError("the file is empty; it must hold at least one example", path=path, line=1)
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is harmless, not data


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number from 1, object) for each line of a JSONL file.

    Raises:
        DataError: non-UTF-8 bytes, an empty file, a blank line in the middle of the file, a line
            that is not valid JSON, or a JSON value that is not an object.
    """
    path = Path(path)
    lines = read_text(path).split("\n")
    # A final newline (or several) ends the file; blank lines before data are errors, since
    # silently skipping them would hide a truncated or concatenated file.
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError("blank line; every line must be one JSON object", path=path, line=number)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=number) from e
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", path=path, line=number)
        yield number, row


def iter_csv(path: str | os.PathLike, *, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number of the row, row dict) for each data row of a CSV file with a header.

    Args:
        path: the CSV file (UTF-8, comma-separated, header in the first line).
        required: column names that must be in the header.

    Raises:
        DataError: non-UTF-8 bytes, an empty file, no data rows, missing required columns, or a
            row with more or fewer fields than the header.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", path=path, line=1) from e
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"CSV header lacks column(s) {missing}; found {header}", path=path, line=1, field=missing[0]
        )
    n_rows = 0
    while True:
        line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e}", path=path, line=line) from e
        if not values:  # the csv module reports a blank line as an empty list
            raise DataError("blank line; every line must be one row", path=path, line=line)
        if len(values) != len(header):
            raise DataError(
                f"row has {len(values)} fields but the header has {len(header)}", path=path, line=line
            )
        n_rows += 1
        yield line, dict(zip(header, values))
    if n_rows == 0:
        raise DataError("the CSV file has a header but no rows", path=path, line=1)


def read_template(path: str | os.PathLike) -> str:
    """A prompt template file's text, without the one newline that ends the file."""
    text = read_text(path)
    return text[:-1] if text.endswith("\n") else text
