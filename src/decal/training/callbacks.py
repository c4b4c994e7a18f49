"""Trainer callbacks: the append-only training log `OUT/train_log.jsonl` and its reader.

Every `on_log` dict of the transformers/TRL trainer (loss, learning rate, and for GRPO the
reward and decision-token statistics) becomes one JSON line with the global `step`, `epoch` and
wall-clock `time` and
the process's CPU seconds so far `cpu_s` (step costs that hold on a shared, busy machine). A `{"event": "train_begin", "step": N, "resumed": ...}` line opens each
(re)start. After a crash, steps logged past the checkpoint the run resumes from are replayed,
so `read_train_log` keeps, for each step, only the lines written after the last restart that
precedes them: the log stays append-only (issue #9) and readers still see one history.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import DataError

__all__ = ["TRAIN_LOG_NAME", "JsonlLogCallback", "read_train_log"]

TRAIN_LOG_NAME = "train_log.jsonl"


def _plain(value: Any) -> Any:
    # Tensors and numpy scalars from the trainers' logs become plain JSON numbers.
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonlLogCallback(TrainerCallback):
    """Append every logged dict to a JSONL file, flushed per line (main process only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_plain(record)) + "\n")
            f.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._append({"event": "train_begin", "step": state.global_step, "resumed": state.global_step > 0,
                          "max_steps": state.max_steps, "time": time.time(), "cpu_s": time.process_time()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._append({"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                          "cpu_s": time.process_time(), **logs})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._append({"event": "save", "step": state.global_step, "time": time.time()})


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read `train_log.jsonl` as one history, dropping lines that a later restart replayed.

    Args:
        path: the log file (or the training output folder holding it).

    Returns:
        The log lines in order; a line of step s written before a restart at step r < s is
        dropped (the resumed run logs step s again). A torn last line (crash mid-write) is skipped.

    Raises:
        FileNotFoundError: no log.
        DataError: a malformed line other than the last.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TRAIN_LOG_NAME
    lines = path.read_text(encoding="utf-8").splitlines()
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise DataError(f"invalid JSON: {e.msg}", path=path, line=number) from e
        if entry.get("event") == "train_begin":
            restart = int(entry.get("step", 0))
            entries = [e for e in entries if int(e.get("step", 0)) <= restart
                       and not (e.get("event") == "save" and int(e.get("step", 0)) > restart)]
        entries.append(entry)
    return entries
