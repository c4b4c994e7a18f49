"""`decal report EXPERIMENT_DIR`: the paper's tables and reliability grids as Markdown or one HTML file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "results_table"]

EPILOG = """Examples:

  decal report runs/paper

  decal report demo-runs --format html --out demo.html

  decal report runs/cpu-small --ci --no-figures
"""


def results_table(root: Path, *, metrics=("accuracy", "ece", "auroc", "invalid_rate")):
    """A rich table of the main (uncalibrated) results: one row per model, method and dataset."""
    from rich.table import Table

    from ..experiments.report import MISSING, UNDEFINED
    from ..experiments.results import RESULTS_FILE, read_results

    rows = read_results(root / RESULTS_FILE)
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["calibrator"] != "none":
            continue
        key = (r["model"], r["method"] + (f" ({r['variant']})" if r["variant"] else ""), f"{r['eval_task']}/{r['eval_split']}", r["domain"])
        cells.setdefault(key, {})[r["metric"]] = r
    table = Table(title=f"Results (%) in {root}")
    for col in ("model", "method", "dataset", "domain", *metrics):
        table.add_column(col, justify="right" if col in metrics else "left")
    for key, by_metric in cells.items():
        values = []
        for m in metrics:
            r = by_metric.get(m)
            # Values only: the intervals are in results.csv and the reports' cells.
            if r is None:
                values.append(MISSING)
            elif r["value"] is None or math.isnan(r["value"]):
                values.append(UNDEFINED)
            else:
                values.append(f"{100 * r['value']:.2f}")
        table.add_row(*key, *values)
    return table


def register(app: typer.Typer) -> None:
    @app.command("report", epilog=EPILOG)
    def report_command(
        experiment_dir: Path = typer.Argument(..., metavar="EXPERIMENT_DIR", help="Folder written by `decal run`."),
        format: str = typer.Option("md", "--format", metavar="md|html", help="Markdown (figures beside it) or one offline HTML file."),
        out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="Report file (default: EXPERIMENT_DIR/report.<format>)."),
        ci: bool = typer.Option(False, "--ci", help="Print bootstrap intervals in the Markdown cells too."),
        figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the Figure 1/4 reliability grids."),
    ) -> None:
        """Tables 1, 4-9 and the Figure 1/4 grids of an experiment folder."""
        from ..experiments.report import write_report

        if format not in ("md", "html"):
            raise typer.BadParameter(f"must be md or html; got {format!r}", param_hint="--format")
        path = write_report(experiment_dir, format=format, out=out, ci=ci, figures=figures)
        typer.echo(f"report: {path}")
