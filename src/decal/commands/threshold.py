"""`decal threshold`: thresholds with guarantees (accuracy, per-class precision and recall) chosen on one run, applied to others.

The rule and the procedure are `decal.selective`'s: answer a prediction of label L when its
confidence (calibrated, on a calibrated run) is at least ``thresholds[L]``, defer otherwise;
Learn-then-Test on MAPIE's p-values makes every ``--target`` hold jointly with probability at
least ``1 - delta`` over the calibration run. ``--out`` writes the threshold file `decal serve
--threshold` reads: thresholds, abstention band, each guarantee with delta, the calibration-set
size and its deferral rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "threshold_runs"]

EPILOG = """Examples:

  decal threshold cal/platt/moderation --target 'precision(Safe)>=0.99' --target 'recall(Unsafe)>=0.95' \\
      --delta 0.05 --apply cal/platt/xstest --out threshold.json

  decal threshold runs/ours/moderation-val --target-accuracy 0.9 --apply runs/ours/moderation-test runs/ours/xstest

  decal threshold cal/isotonic/csqa --target 'accuracy>=0.8' --target 'precision(A)>=0.9' --fwer bonferroni
"""


def _arrays(run: Path):
    from ..records import read_records, records_to_arrays

    return records_to_arrays(read_records(run))


def threshold_runs(calibration_dir: Path, *, targets: list[str], delta: float = 0.05, fwer: str = "auto",
                   apply_dirs: list[Path] = ()) -> dict:
    """`control_risks` on one run and `apply_risk_control` on others.

    Every run is read (and its labels checked) before anything is chosen, so a bad run fails first.

    Returns:
        The threshold file: `RiskControl.to_dict()` plus ``calibration_run``, ``scale`` (which
        confidence the thresholds compare) and ``applied`` (per run: deferral rate and targets).
    """
    from ..errors import DataError
    from ..metrics import input_scales
    from ..selective import apply_risk_control, control_risks, parse_target

    cal = _arrays(calibration_dir)
    others = [(run, _arrays(run)) for run in apply_dirs]
    for run, arrays in others:
        if arrays.labels != cal.labels:
            raise DataError(f"labels {list(arrays.labels)} differ from the calibration run's {list(cal.labels)}", path=run)
    parsed = [parse_target(t, cal.labels) for t in targets]
    rc = control_risks(cal.confidence, cal.prediction_index, cal.correct, cal.label_index, labels=cal.labels,
                       targets=parsed, delta=delta, fwer=fwer)
    applied = [{"run": str(run), **apply_risk_control(rc, a.confidence, a.prediction_index, a.correct, a.label_index)}
               for run, a in others]
    report = {**rc.to_dict(), "calibration_run": str(calibration_dir),
              "scale": input_scales(calibrated=cal.calibrated)["confidence"], "applied": applied}
    report["calibrated"] = bool(cal.calibrated)
    report["mean_label_mass"] = float(cal.label_mass.mean())
    return report


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _tables(report: dict):
    from rich.table import Table

    thresholds = ", ".join(f"{lab} >= {'none (always deferred)' if t is None else f'{t:.6g}'}"
                           for lab, t in report["thresholds"].items())
    head = Table(title=f"thresholds on {report['scale']}: {thresholds}; delta {report['delta']:g} ({report['method']})")
    names = [g["target"] for g in report["guarantees"]]
    for col in ("run", "role", "n", "deferred %", *[f"{t} %" for t in names]):
        head.add_column(col, justify="left" if col in ("run", "role") else "right")
    head.add_row(report["calibration_run"], "calibration", str(report["n_calibration"]), _pct(report["deferral_rate"]),
                 *[_pct(g["calibration"]["value"]) for g in report["guarantees"]])
    for r in report["applied"]:
        head.add_row(r["run"], "applied", str(r["n"]), _pct(r["deferral_rate"]), *[_pct(t["value"]) for t in r["targets"]])
    return head


def register(app: typer.Typer) -> None:
    @app.command("threshold", epilog=EPILOG)
    def threshold_command(
        calibration_run: Path = typer.Argument(..., metavar="RUN_DIR", help="Run (a calibration split) the thresholds are chosen on."),
        target: Optional[list[str]] = typer.Option(None, "--target", metavar="TARGET", help="A promise, repeatable: 'accuracy>=A', 'precision(LABEL)>=P' or 'recall(LABEL)>=R'; all hold jointly."),
        target_accuracy: Optional[float] = typer.Option(None, "--target-accuracy", metavar="A", help="Same as --target 'accuracy>=A': accuracy promised on answered predictions."),
        delta: float = typer.Option(0.05, "--delta", metavar="D", help="Probability that some target fails (over the draw of the calibration run)."),
        fwer: str = typer.Option("auto", "--fwer", metavar="auto|holm|bonferroni|fixed_sequence", help="Family-wise error control over the candidate thresholds (MAPIE's); auto: a fixed sequence upwards for recall-only labels, Bonferroni-Holm otherwise."),
        apply: Optional[list[Path]] = typer.Option(None, "--apply", metavar="RUN_DIR...", help="Runs to apply the thresholds to (several may follow one --apply)."),
        more: Optional[list[Path]] = typer.Argument(None, metavar="[RUN_DIR...]", hidden=True),
        out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="Write the threshold file (for `decal serve --threshold`)."),
    ) -> None:
        """Thresholds that defer, so that accuracy, per-class precision or recall targets hold; deferral elsewhere."""
        from ._console import console as rich_console

        from .._io import write_json_atomic

        targets = [*(target or []), *([f"accuracy>={target_accuracy}"] if target_accuracy is not None else [])]
        if not targets:
            raise typer.BadParameter("give at least one --target (or --target-accuracy A)", param_hint="--target")
        report = threshold_runs(calibration_run, targets=targets, delta=delta, fwer=fwer,
                                apply_dirs=[*(apply or []), *(more or [])])
        rich_console().print(_tables(report))
        from ..metrics import LOW_LABEL_MASS

        if not report["calibrated"] and report["mean_label_mass"] < LOW_LABEL_MASS:
            typer.echo(f"warning: the options hold {100 * report['mean_label_mass']:.1f}% of the probability on average, so "
                       "these thresholds compare small full-vocabulary confidences; calibrate the run first (decal calibrate)",
                       err=True)
        for g in report["guarantees"]:
            if not g["certified"]:
                typer.echo(f"warning: {g['target']} cannot be guaranteed on this calibration run: no threshold passes", err=True)
        if out is not None:
            write_json_atomic(out, report)
            typer.echo(f"threshold: {out}")
