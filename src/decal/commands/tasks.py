"""`decal tasks list|show`: print the tasks and the rendered prompts a model would see."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]

SHOW_EPILOG = """Examples:

  decal tasks show builtin --split train --n 2

  decal tasks show builtin:difficulty=1,seed=3 --split test --reasoning

  decal tasks show openai_moderation --split eval --n 1 --model ../shared/models/qwen3-tokenizer

  decal tasks show my_task.jsonl --split all --template my_prompt.txt
"""


def _tokenizer(model: str):
    # A local folder is read directly; anything else (hub id, alias, GGUF) goes through the
    # model loader, which knows decal's model names.
    if Path(model).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    from ..models import load_tokenizer

    return load_tokenizer(model)


def _show(task, n: int, model: Optional[str]) -> None:
    from ..tasks.prompts import decision_context, render_chat

    tokenizer = _tokenizer(model) if model else None
    typer.echo(
        f"task {task.name} split {task.split}: {len(task)} examples, labels {', '.join(task.labels)}, "
        f"template {task.template.name} (version {task.template.version}), "
        f"{'reasoning' if task.reasoning else 'non-reasoning'}"
    )
    for ex in task.examples[:n]:
        message = task.user_message(ex)
        truth = "" if ex.true_probs is None else "  true " + ", ".join(f"{lab} {p:g}" for lab, p in zip(ex.labels, ex.true_probs))
        typer.echo(f"\n===== id {ex.id}  gold {ex.label}{truth} =====")
        if ex.reasoning:
            typer.echo(f"(warm-start rationale: {ex.reasoning})")
        if tokenizer is None:
            typer.echo(message)
            continue
        from ..decision import option_token_ids

        prompt = render_chat(tokenizer, message, reasoning=task.reasoning)
        typer.echo(prompt, nl=not prompt.endswith("\n"))
        tokens = option_token_ids(tokenizer, ex.labels, context=decision_context(prompt, reasoning=task.reasoning))
        pairs = ", ".join(f"{lab} -> {tok!r} ({tid})" for lab, tok, tid in zip(tokens.labels, tokens.tokens, tokens.token_ids))
        n_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        typer.echo(f"----- {n_tokens} prompt tokens; decision tokens: {pairs}")


def register(app: typer.Typer) -> None:
    tasks_app = typer.Typer(help="List tasks and show rendered prompts.", no_args_is_help=True)
    app.add_typer(tasks_app, name="tasks")

    @tasks_app.command("list")
    def list_command() -> None:
        """List the named tasks with their splits (sizes) and labels."""
        from ..tasks import list_tasks

        for info in list_tasks():
            splits = ", ".join(f"{name} ({size:,})" for name, size in info.splits.items())
            typer.echo(f"{info.name}\n  splits: {splits}\n  labels: {', '.join(info.labels)}\n  {info.description}")
        typer.echo("\nAlso: a path to your own .jsonl/.csv file (split 'all'); see `decal tasks show --help`.")

    @tasks_app.command("show", epilog=SHOW_EPILOG)
    def show_command(
        name: str = typer.Argument(..., metavar="TASK", help="Task name, spec (builtin:difficulty=1,seed=0) or .jsonl/.csv file."),
        split: Optional[str] = typer.Option(None, "--split", metavar="SPLIT", help="Split to show; default: the task's first split ('all' for files)."),
        n: int = typer.Option(3, "--n", metavar="N", min=0, help="Number of examples to print."),
        reasoning: bool = typer.Option(False, "--reasoning", help="Render the reasoning variant of the prompt."),
        model: Optional[str] = typer.Option(None, "--model", metavar="MODEL", help="Render through this model's chat template (hub id, decal model name or local tokenizer folder)."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", metavar="DIR", help="Folder of the paper datasets; default $DECAL_DATA_DIR, else the hub."),
        template: Optional[str] = typer.Option(None, "--template", metavar="FILE", help="A prompt template file (str.format fields) replacing the task's prompt."),
    ) -> None:
        """Print the prompts a model would see for the first N examples of a task split."""
        from ..tasks import default_split, load_task

        task = load_task(name, split or default_split(name), data_dir=data_dir, reasoning=reasoning, template=template)
        _show(task, n, model)
