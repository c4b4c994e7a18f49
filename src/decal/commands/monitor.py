"""`decal monitor STATE_DIR`: the decision log's figures over time, with the alarms marked (`decal.serve.monitor_report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]

EPILOG = """Examples:

  decal monitor state                      # state/report/monitor.md, monitor.png, monitor.json

  decal monitor state --format html --out reports/monitor-today
"""


def register(app: typer.Typer) -> None:
    @app.command("monitor", epilog=EPILOG)
    def monitor_command(
        state_dir: Path = typer.Argument(..., metavar="STATE_DIR", help="The --state-dir of a decal serve (it may still be running)."),
        format: str = typer.Option("md", "--format", metavar="md|html", help="Markdown with the figure beside it, or one self-contained HTML file."),
        out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Output folder (default: STATE_DIR/report)."),
        points: int = typer.Option(200, "--points", metavar="N", help="Points of the time series (plus one at each alarm)."),
    ) -> None:
        """The monitor's figures over time: accuracy against the promise, label-free estimate, drift, alarms."""
        from ..serve.monitor_report import write_monitor_report

        if points < 2:
            raise typer.BadParameter(f"must be >= 2; got {points}", param_hint="--points")
        path = write_monitor_report(state_dir, format=format, out=out, points=points)
        typer.echo(f"report: {path}")
