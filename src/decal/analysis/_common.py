"""Helpers shared by the rollout and swap analyses: run settings, seeds, JSONL rows, progress, plots.

Both resume with `decal evaluate`'s rule (`decal.records.check_resume`); their records come from
`decal.recording`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import DataError

__all__ = [
    "derive_seed",
    "read_rows",
    "LEGACY_SETTINGS",
    "engine_settings",
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
        engine: None (not known yet), an engine name ("hf", "vllm", "remote"; the CLI's early
            check), or the `Engine`: its `info()` (`engine`, `engine_version`, `engine_options`,
            and the remote engine's `engine_servers`) and its `fallbacks`. The version and the
            servers are recorded but never compared: a rerun after an upgrade, or on other
            replicas, resumes.
    """
    if engine is None:
        return {}, ("engine", "engine_version", "engine_options", "fallbacks")
    if isinstance(engine, str):
        return {"engine": engine}, ("engine_version", "engine_options", "fallbacks", "engine_servers")
    return {**engine.info(), "fallbacks": list(engine.fallbacks)}, ("engine_version", "engine_servers")


# run.json fields of runs made before they were recorded: engines ran on transformers, with no fallback.
LEGACY_SETTINGS = {"engine": "hf", "engine_options": {}, "fallbacks": []}


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

