"""`decal threshold`: pick a confidence threshold with an accuracy guarantee on one run, apply it to others."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "threshold_runs"]

EPILOG = """Examples:

  decal threshold runs/ours/moderation-val --target-accuracy 0.9 --apply runs/ours/moderation-test runs/ours/xstest

  decal threshold cal/isotonic/moderation --target-accuracy 0.95 --delta 0.1 --out threshold.json
"""


def threshold_runs(calibration_dir: Path, *, target_accuracy: float, delta: float = 0.05, apply_dirs: list[Path] = ()) -> dict:
    """`choose_threshold` on one run and `apply_threshold` on others.

    Returns:
        ``{"calibration_run", "choice": ThresholdChoice.to_dict(), "applied": [{"run", ...SelectiveResult}]}``.
    """
    from ..records import read_records, records_to_arrays
    from ..selective import apply_threshold, choose_threshold

    cal = records_to_arrays(read_records(calibration_dir))
    choice = choose_threshold(cal.confidence, cal.correct, target_accuracy=target_accuracy, delta=delta)
    applied = []
    for run in apply_dirs:
        arrays = records_to_arrays(read_records(run))
        result = apply_threshold(arrays.confidence, arrays.correct, choice.threshold)
        applied.append({"run": str(run), **result.to_dict()})
    return {"calibration_run": str(calibration_dir), "choice": choice.to_dict(), "applied": applied}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _table(report: dict):
    from rich.table import Table

    c = report["choice"]
    thr = "none (defer all)" if c["threshold"] is None else f"{c['threshold']:.6g}"
    table = Table(title=f"threshold {thr} for accuracy >= {_pct(c['target_accuracy'])}% with probability {_pct(1 - c['delta'])}%")
    for col in ("run", "role", "n", "accepted", "coverage %", "accuracy %", "lower bound %"):
        table.add_column(col, justify="left" if col in ("run", "role") else "right")
    table.add_row(report["calibration_run"], "calibration", str(c["n"]), str(c["n_accepted"]), _pct(c["coverage"]),
                  _pct(c["accuracy"]), _pct(c["lower_bound"]))
    for r in report["applied"]:
        table.add_row(r["run"], "applied", str(r["n"]), str(r["n_accepted"]), _pct(r["coverage"]), _pct(r["accuracy"]), "")
    return table


def register(app: typer.Typer) -> None:
    @app.command("threshold", epilog=EPILOG)
    def threshold_command(
        calibration_run: Path = typer.Argument(..., metavar="RUN_DIR", help="Run (a calibration split) the threshold is chosen on."),
        target_accuracy: float = typer.Option(..., "--target-accuracy", metavar="A", help="Accuracy promised on accepted predictions, in (0, 1)."),
        delta: float = typer.Option(0.05, "--delta", metavar="D", help="Probability that the promise may fail (one-sided binomial bound)."),
        apply: Optional[list[Path]] = typer.Option(None, "--apply", metavar="RUN_DIR...", help="Runs to apply the threshold to (several may follow one --apply)."),
        more: Optional[list[Path]] = typer.Argument(None, metavar="[RUN_DIR...]", hidden=True),
        out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="Also write the result as JSON."),
    ) -> None:
        """Lowest confidence threshold whose accepted predictions reach a target accuracy; coverage elsewhere."""
        from ._console import console as rich_console

        from .._io import write_json_atomic

        report = threshold_runs(calibration_run, target_accuracy=target_accuracy, delta=delta, apply_dirs=[*(apply or []), *(more or [])])
        rich_console().print(_table(report))
        if out is not None:
            write_json_atomic(out, report)
            typer.echo(f"threshold: {out}")
