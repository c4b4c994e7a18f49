"""`decal tasks list|show`: print the tasks and the rendered prompts a model would see."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    tasks_app = typer.Typer(help="List tasks and show rendered prompts.", no_args_is_help=True)
    app.add_typer(tasks_app, name="tasks")

    @tasks_app.command("list")
    def list_tasks() -> None:
        """List the built-in task names and their splits."""
        raise NotImplementedError("being written in issue 2")
