"""`decal metrics RUN_DIR`: the metric table, `metrics.json` and the reliability figure of one run."""

from __future__ import annotations

import math
from pathlib import Path

import typer

__all__ = ["register", "metrics_table"]

EPILOG = """Examples:

  decal metrics runs/base/moderation

  decal metrics runs/grpo/xstest --n-bins 15 --binning equal_width --bootstrap 0
"""


def _unit(key: str) -> float:
    """Percent like the paper, except NLL (nats) and set sizes (labels)."""
    return 1.0 if key == "nll" or key.startswith("mean_set_size") else 100.0


def metrics_table(report: dict, *, title: str):
    """A rich table of a `metrics_report` (percent, like the paper; NLL in nats, set sizes in
    labels), with the scale each metric reads (calibrated or raw; `decal.metrics`, "Scales")."""
    from rich.table import Table

    from ..experiments.report import UNDEFINED

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    with_ci = report["bootstrap"] > 0
    if with_ci:
        table.add_column(f"{100 * report['level']:.0f}% CI", justify="right")
    table.add_column("scale")
    for key, m in report["metrics"].items():
        unit = _unit(key)
        value = UNDEFINED if m["value"] is None or math.isnan(m["value"]) else f"{unit * m['value']:.2f}"
        row = [key, value]
        if with_ci:
            row.append("–" if m["ci_low"] is None else f"[{unit * m['ci_low']:.2f}, {unit * m['ci_high']:.2f}]")
        row.append(m.get("scale") or "")
        table.add_row(*row)
    return table


def register(app: typer.Typer) -> None:
    @app.command("metrics", epilog=EPILOG)
    def metrics_command(
        run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run folder holding predictions.jsonl."),
        n_bins: int = typer.Option(10, "--n-bins", metavar="M", help="Bins of every binned metric."),
        binning: str = typer.Option("equal_mass", "--binning", metavar="equal_mass|equal_width", help="Binning of ECE (the paper: equal_mass)."),
        bootstrap: int = typer.Option(1000, "--bootstrap", metavar="N", help="Bootstrap resamples for the intervals; 0 for none."),
        seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of the bootstrap."),
        level: float = typer.Option(0.95, "--level", metavar="P", help="Coverage of the bootstrap intervals."),
        figure: bool = typer.Option(True, "--figure/--no-figure", help="Write reliability.png/.svg into the run folder."),
    ) -> None:
        """Print the metrics of a run (percent) and write metrics.json and the reliability figure."""
        from ._console import console as rich_console

        from ..run_metrics import run_metrics

        if bootstrap < 0:
            raise typer.BadParameter(f"must be >= 0; got {bootstrap}", param_hint="--bootstrap")
        report = run_metrics(run_dir, n_bins=n_bins, binning=binning, bootstrap=bootstrap, seed=seed, level=level, figure=figure)
        rich_console().print(metrics_table(report, title=f"{run_dir} (n={report['n']}, %)"))
