"""`decal demo`: the packaged demo grid (SmolLM2 on the `verdicts` task, known truth), then its report.

base -> SFT -> GRPO and cal-GRPO (from the SFT adapter) -> evaluate (in-domain and OOD) -> Platt and
isotonic -> report, offline, sized for a 2-core CPU. The report opens with accuracy, ECE and the true
calibration error (TCE) with intervals, and the reliability diagrams against the truth side by side
(`decal.experiments.headline`). Rerunning resumes; finished steps are not redone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import typer

__all__ = ["register", "demo_config_path", "in_process_executor"]

EPILOG = """Examples:

  decal demo

  decal demo --out /tmp/demo-runs

  decal demo --dry-run
"""


def demo_config_path() -> Path:
    """The demo config shipped inside the package (`decal/configs/demo.yaml`)."""
    from importlib.resources import files

    return Path(str(files("decal") / "configs" / "demo.yaml"))


def in_process_executor(argv: Sequence[str], log_path: Path) -> int:
    """Run one step's `decal` command in this process, its output appended to the step's log.

    The demo's steps are small, and a new interpreter per step (importing torch, transformers and
    TRL again) cost about 8 s of the 2-core budget each, about 2 minutes over the demo's 15
    commands. Logging goes to the step's log for the step's duration (a root handler, so the
    commands' own `logging.basicConfig` adds none). Exit codes are the CLI's.
    """
    from ..cli import main

    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with log_path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        log.write(f"\n$ decal {' '.join(argv)}  (in process)\n")
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            return main(list(argv))
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


def register(app: typer.Typer) -> None:
    @app.command("demo", epilog=EPILOG)
    def demo_command(
        out: Path = typer.Option(Path("demo-runs"), "--out", metavar="DIR", help="Experiment folder."),
        config: Optional[Path] = typer.Option(None, "--config", metavar="FILE", help="Another experiment YAML (default: the packaged demo)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan only."),
    ) -> None:
        """Run the demo grid and write its Markdown and HTML reports (under 12 minutes on 2 CPU cores)."""
        from ._console import console as rich_console

        from ..experiments.config import load_experiment_config
        from ..experiments.plan import build_plan
        from ..experiments.report import write_report
        from .report import results_table
        from .run import print_plan, run_with_progress

        console = rich_console()
        cfg = load_experiment_config(config or demo_config_path())
        root = out.resolve()
        print_plan(console, build_plan(cfg, root), root)
        if dry_run:
            return
        started = time.perf_counter()
        run_with_progress(cfg, out=root, only=None, console=console, executor=in_process_executor)
        write_report(root, format="md")
        html_path = write_report(root, format="html")
        # the truth metrics beside the usual ones (intervals: the report's opening table)
        console.print(results_table(root, metrics=("accuracy", "ece", "tce", "mean_overconfidence", "auroc",
                                                   "invalid_rate")))
        console.print(f"finished in {(time.perf_counter() - started) / 60:.1f} min")
        console.print(f"HTML report: {html_path}")
