"""Helpers shared by the rollout and swap analyses: run folders, seeds, JSONL rows, progress, plots."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .._io import read_json, write_json_atomic
from ..errors import ConfigError, DataError

__all__ = [
    "derive_seed",
    "read_rows",
    "check_run_config",
    "engine_settings",
    "decision_confidence",
    "progress_bar",
    "fraction",
    "percent",
    "save_histogram",
]

logger = logging.getLogger(__name__)


def derive_seed(seed: int, key: str) -> int:
    """A 31-bit seed that depends only on `seed` and `key` (stable across processes and platforms).

    Python's `hash` of a string changes per process, so sha256 is used; the result fits
    `torch.manual_seed` and `random.Random`.
    """
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All JSON objects of an analysis JSONL file (empty list when it does not exist).

    Raises:
        DataError: a line that is not a JSON object with an `id`, naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", path=path, line=lineno) from e
            if not isinstance(row, dict) or "id" not in row:
                raise DataError("expected a JSON object with an 'id'", path=path, line=lineno)
            rows.append(row)
    return rows


def engine_settings(engine) -> tuple[dict, tuple[str, ...]]:
    """The run.json fields of an inference engine, and those not known yet (left out of the comparison).

    Args:
        engine: None (not known yet), an engine name ("hf", "vllm"; the CLI's early check), or
            `Engine.info()` (`engine`, `engine_version`, `engine_options`, and the remote engine's
            `engine_servers`). The version and the servers are recorded but never compared: a
            rerun after an upgrade, or on other replicas, resumes.
    """
    if engine is None:
        return {}, ("engine", "engine_version", "engine_options")
    if isinstance(engine, str):
        return {"engine": engine}, ("engine_version", "engine_options")
    return dict(engine), ("engine_version", "engine_servers")


# run.json fields of runs made before engines existed: they ran on transformers.
_LEGACY = {"engine": "hf", "engine_options": {}}


def check_run_config(out_dir: Path, config: dict, *, write: bool = True, unknown: tuple[str, ...] = ()) -> None:
    """Write `run.json` on the first run; on a rerun, refuse settings that differ from it.

    Resuming with other settings (more samples, another model) would mix two experiments in
    one JSONL file, so it is an error that names the differing keys.

    Args:
        out_dir: the run folder.
        config: the settings that must match.
        write: write `run.json` when missing; False for an early check (the CLI's, before the
            model is loaded).
        unknown: keys not known yet (left out of the comparison).
    """
    path = out_dir / "run.json"
    if path.exists():
        # run.json written before a setting existed holds its default (runs from older versions resume)
        old, config = {**_LEGACY, **read_json(path)}, {**_LEGACY, **config}
        diff = sorted(k for k in set(old) | set(config) if k not in unknown and old.get(k) != config.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise ConfigError(
                f"{out_dir} holds a run with other settings ({details}); "
                f"rerun with the same options to resume, or pass another --out"
            )
        return
    if write:
        write_json_atomic(path, config)


def decision_confidence(option_probs: Sequence[float], option: int) -> float:
    """The confidence of a decision (DESIGN.md): the emitted option's probability when the
    decision is valid (`option >= 0`), else the largest option probability (forced decision)."""
    if option >= 0:
        return float(option_probs[option])
    return float(max(option_probs))


def fraction(numerator: int, denominator: int) -> float:
    """`numerator / denominator`, or nan for an empty denominator (reported as "n/a")."""
    return numerator / denominator if denominator else float("nan")


def percent(value: float) -> str:
    """A fraction as the paper prints it ("97.62%"), or "n/a" for nan."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when `enabled`; yields `advance(n)`. Silent otherwise."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        handle = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(handle, n)


def save_histogram(
    groups: dict[str, Sequence[float]],
    stem: Path,
    *,
    title: str,
    xlabel: str,
    bins: int = 20,
    threshold: float | None = None,
) -> list[str]:
    """A stacked histogram of confidences in [0, 1], saved as `<stem>.png` and `<stem>.svg`.

    Args:
        groups: legend label -> values in [0, 1]; empty groups are drawn as empty.
        stem: output path without suffix.
        title, xlabel: figure texts.
        bins: number of equal-width bins over [0, 1].
        threshold: draws a dashed vertical line there when given.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    try:
        edges = [i / bins for i in range(bins + 1)]
        values = [list(map(float, v)) for v in groups.values()]
        ax.hist(values, bins=edges, stacked=True, label=list(groups), edgecolor="white", linewidth=0.5)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = []
        for suffix in (".png", ".svg"):
            path = stem.with_suffix(suffix)
            fig.savefig(path, dpi=150)
            paths.append(str(path))
    finally:
        plt.close(fig)
    return paths

