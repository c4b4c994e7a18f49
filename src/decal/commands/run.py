"""`decal run CONFIG`: plan an experiment grid, print the plan, and run (or resume) it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "print_plan", "run_with_progress", "check_inputs"]

EPILOG = """Examples:

  decal run configs/paper.yaml --dry-run

  decal run configs/cpu-small.yaml

  decal run configs/paper.yaml --only 'runs/Qwen3-1.7B/*/commonsense_qa/*'

  decal run configs/demo.yaml --out /tmp/demo   # rerun the same command to resume after a crash
"""


def print_plan(console, steps, root: Path) -> None:
    """A table of the steps with their status (done / partial / pending)."""
    from rich.table import Table

    from ..experiments.runner import plan_status

    table = Table(title=f"Plan: {len(steps)} steps in {root}", show_lines=False)
    table.add_column("#")
    table.add_column("step", overflow="fold")
    table.add_column("kind")
    table.add_column("status")
    counts: dict[str, int] = {}
    for i, step in enumerate(steps, 1):
        status = plan_status(root, step)
        counts[status] = counts.get(status, 0) + 1
        style = {"done": "green", "partial": "yellow", "stale": "red"}.get(status, "")
        table.add_row(str(i), step.id, step.kind, f"[{style}]{status}[/]" if style else status)
    console.print(table)
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def check_inputs(config, source: Path) -> None:
    """Fail before the experiment folder exists when a local model path is missing or a task file is bad.

    Hub ids, aliases and paper tasks are left to the steps (they may need the network or a
    data folder); local paths and task files are cheap to check here, and a bad one would
    otherwise fail only when its step runs (issue #9).
    """
    from ..errors import ConfigError
    from ..tasks import load_task
    from ..tasks.registry import _looks_like_path

    for i, model in enumerate(config.models):
        path = model.path
        local = path.startswith(("/", ".", "~")) or path.lower().endswith(".gguf")
        if local and not Path(path).expanduser().exists():
            raise ConfigError(f"{source}: `models[{i}].path` {path!r}: no such model folder or file")
    for i, train in enumerate(config.train_tasks):
        wanted = [(f"train_tasks[{i}].task", train.task, train.split)]
        wanted += [(f"train_tasks[{i}].evaluations[{j}].task", e.task, e.split) for j, e in enumerate(train.evaluations)]
        for where, task, split in wanted:
            if _looks_like_path(task):
                if not Path(task).is_file():
                    raise ConfigError(f"{source}: `{where}` {task!r}: no such task file")
                try:
                    load_task(task, split)
                except ValueError as e:  # DataError names the task file's line; add the config's field
                    raise ConfigError(f"{source}: `{where}`: {e}") from e


def run_with_progress(config, *, out, only, console, executor=None) -> Path:
    """Run the experiment, printing one line per step; returns the experiment folder.

    `executor` runs each step's commands (default: one `python -m decal` process per command).
    """
    import time

    from ..experiments.runner import experiment_dir, run_experiment

    root = experiment_dir(config, out)
    started: dict[str, float] = {}

    def on_step(step, event: str) -> None:
        if event == "start":
            started[step.id] = time.perf_counter()
            console.print(f"[bold]run[/]  {step.kind:<9} {step.id}")
        elif event == "done":
            console.print(f"[green]done[/] {step.kind:<9} {step.id} ({time.perf_counter() - started[step.id]:.0f} s)")

    run_experiment(config, out=root, only=only, on_step=on_step, executor=executor)
    return root


def register(app: typer.Typer) -> None:
    @app.command("run", epilog=EPILOG)
    def run_command(
        config: Path = typer.Argument(..., metavar="CONFIG", help="Experiment YAML (see configs/)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and what is already done; run nothing."),
        only: Optional[str] = typer.Option(
            None, "--only", metavar="PATTERN", help="Run the steps whose id matches this glob (or substring), with their dependencies."
        ),
        out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Experiment folder (default: the config's output_dir)."),
    ) -> None:
        """Plan the steps (train, select, evaluate, calibrate, analyze), print the plan, run what is not done."""
        from ..experiments.config import load_experiment_config
        from ..experiments.plan import build_plan, select_steps
        from ..experiments.runner import experiment_dir
        from ._console import console as rich_console

        console = rich_console()
        cfg = load_experiment_config(config)
        check_inputs(cfg, config)
        root = experiment_dir(cfg, out)
        steps = select_steps(build_plan(cfg, root), only)
        print_plan(console, steps, root)
        if dry_run:
            return
        run_with_progress(cfg, out=root, only=only, console=console)
        console.print(f"results: {root / 'results.csv'}")
        console.print(f"report:  decal report {root} --format html")
