"""Small file helpers shared by run folders: atomic writes and safe names."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_text_atomic", "write_json_atomic", "read_text", "read_json", "safe_name"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename.

    A reader (or a rerun after a crash) sees either the old file or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file readable by its owner only; give it the mode a plain open()
        # would (0666 less the umask), so reports and configs stay shareable.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; other bytes raise `DataError` naming the file and line."""
    from .errors import DataError

    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8", path=path, line=line) from e


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a malformed file raises `DataError` naming the file and line."""
    from .errors import DataError

    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=e.lineno) from e


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(name: str) -> str:
    """Turn a model id, task path or run name into one path component that cannot leave its folder.

    >>> safe_name("Qwen/Qwen3-1.7B")
    'Qwen--Qwen3-1.7B'
    >>> safe_name("../../etc")
    'etc'
    """
    name = name.replace("/", "--").replace("\\", "--")
    name = _UNSAFE.sub("_", name).strip("._-")
    name = re.sub(r"^(-+)", "", name)
    return name or "unnamed"
