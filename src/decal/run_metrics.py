"""The metrics of one run folder: `metrics.json` and the reliability figure, from its predictions.

`decal metrics` and experiment grids both call `run_metrics`; it lives below the command layer
so that library code never imports `decal.commands`.
"""

from __future__ import annotations

from pathlib import Path

from ._io import write_json_atomic
from .metrics import metrics_report
from .records import read_records

__all__ = ["run_metrics"]


def _run_folder(run_dir: Path) -> tuple[Path, Path]:
    """(folder for outputs, predictions file) from a run folder or a predictions file.

    Raises:
        FileNotFoundError: `run_dir` is neither.
    """
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        return run_dir, run_dir / "predictions.jsonl"
    if run_dir.is_file():
        return run_dir.parent, run_dir
    raise FileNotFoundError(f"{run_dir}: no such run folder (expected a folder holding predictions.jsonl)")


def run_metrics(
    run_dir: Path, *, n_bins: int = 10, binning: str = "equal_mass", bootstrap: int = 1000, seed: int = 0,
    level: float = 0.95, figure: bool = True,
) -> dict:
    """Compute `metrics_report` for a run, write `metrics.json` (and the figure); return the report.

    Args:
        run_dir: a run folder holding `predictions.jsonl`, or the predictions file itself.
        n_bins, binning, bootstrap, seed, level: see `decal.metrics.metrics_report`.
        figure: also write `reliability.png`/`.svg` into the folder.
    """
    folder, predictions = _run_folder(run_dir)
    records = read_records(predictions)
    report = metrics_report(records, n_bins=n_bins, binning=binning, n_resamples=bootstrap, seed=seed, level=level)
    write_json_atomic(folder / "metrics.json", report)
    if figure:
        from .plots import plot_reliability

        first = records[0]
        title = f"{first.model or folder.name}: {first.task}/{first.split}"
        plot_reliability(records, folder / "reliability", title=title, n_bins=n_bins)
    return report
