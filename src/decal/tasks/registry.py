"""`load_task` and `list_tasks`: one entry point for named tasks, spec strings and task files.

A task is named by:

- a built-in name: `commonsense_qa`, `openbookqa`, `openai_moderation`, `xstest`, `builtin`,
  `verdicts`;
- a spec string `NAME:key=value,...` (for `builtin`: `builtin:difficulty=1,seed=3,n=50`; for
  `verdicts`: `verdicts:variant=ood,seed=3,n=50`);
- a path to a JSONL or CSV file of the user's own examples (see `decal.tasks.generic`).

Paper datasets are read from `data_dir`, else the environment variable `DECAL_DATA_DIR`, else the
Hugging Face hub (`decal.tasks.paper`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from .schema import Task

__all__ = ["TaskInfo", "default_split", "list_tasks", "load_task", "parse_spec"]


@dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """What `decal tasks list` prints for one named task."""

    name: str
    splits: dict[str, int]
    labels: tuple[str, ...]
    description: str


def list_tasks() -> list[TaskInfo]:
    """The named tasks with their splits (name -> size) and labels, generated tasks last."""
    from . import builtin, paper, verdicts

    infos = [
        TaskInfo(name=name, splits=dict(spec.splits), labels=spec.labels, description=spec.description)
        for name, spec in paper.PAPER_TASKS.items()
    ]
    infos.append(
        TaskInfo(
            name=builtin.BUILTIN_NAME,
            splits=dict(builtin.BUILTIN_SPLITS),
            labels=builtin.BUILTIN_LABELS,
            description=builtin.DESCRIPTION,
        )
    )
    infos.append(
        TaskInfo(
            name=verdicts.VERDICTS_NAME,
            splits=dict(verdicts.VERDICTS_SPLITS),
            labels=verdicts.VERDICTS_LABELS,
            description=verdicts.DESCRIPTION,
        )
    )
    return infos


def default_split(name: str) -> str:
    """The split a command uses when none is given: a named task's first split, else "all" (task files).

    >>> default_split("xstest"), default_split("builtin:seed=3"), default_split("my_task.jsonl")
    ('test', 'train', 'all')
    """
    from .generic import ALL_SPLIT

    base = parse_spec(name)[0] if not _looks_like_path(name) else name
    info = next((i for i in list_tasks() if i.name == base), None)
    return next(iter(info.splits)) if info is not None else ALL_SPLIT


def _task_names() -> list[str]:
    return [info.name for info in list_tasks()]


def _parse_value(raw: str):
    raw = raw.strip()
    try:
        return int(raw)
    except ValueError:
        return raw


def parse_spec(spec: str) -> tuple[str, dict]:
    """Split `NAME:key=value,...` into the name and a dict of options (ints where they parse).

    >>> parse_spec("builtin:difficulty=1,seed=3")
    ('builtin', {'difficulty': 1, 'seed': 3})
    >>> parse_spec("xstest")
    ('xstest', {})
    """
    name, _, rest = spec.partition(":")
    options: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"task spec option must be key=value; got {part!r} in {spec!r}. "
                f"Example: builtin:difficulty=1,seed=0"
            )
        options[key.strip()] = _parse_value(value)
    return name.strip(), options


def _unknown(name: str) -> ValueError:
    names = _task_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"Unknown task {name!r}.{hint} Available: {', '.join(names)}, "
        f"or a path to a .jsonl/.csv file of your own examples"
    )


def _check_options(task: str, options: dict, allowed: tuple[str, ...]) -> None:
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ValueError(
                f"Unknown option {key!r} for task {task!r}.{hint} Available: {', '.join(allowed) or 'none'}"
            )


def _looks_like_path(name: str) -> bool:
    return name.endswith((".jsonl", ".csv", ".json")) or os.sep in name or "/" in name


def load_task(
    name: str | os.PathLike,
    split: str,
    data_dir: str | os.PathLike | None = None,
    reasoning: bool = False,
    *,
    template: str | os.PathLike | None = None,
    **options,
) -> Task:
    """Load one split of a task, with its prompt template.

    Args:
        name: a task name (see `list_tasks()`), a spec string such as
            "builtin:difficulty=1,seed=0", or a path to a JSONL/CSV task file.
        split: the split name, e.g. "train", "validation", "test"; task files take "all" (or
            any split name when their rows carry a `split` field).
        data_dir: folder of the paper datasets in their release layout; default: the
            environment variable DECAL_DATA_DIR, else the Hugging Face hub.
        reasoning: render the reasoning variant of the prompt.
        template: a template file (`str.format` fields of `PromptTemplate.user_message`) that
            replaces the task's prompt, used for both modes.
        **options: task options, e.g. `difficulty=`, `seed=`, `n=` for "builtin", `variant=`,
            `seed=`, `n=` for "verdicts" (the same keys as in a spec string; keyword arguments win).

    Returns:
        A `Task`: examples in a fixed order, the template and the reasoning flag.

    Raises:
        ValueError: unknown task name (with suggestions), unknown split or option.
        DataError: a malformed data file (message names the file, line and field).
        FileNotFoundError: a missing task, data or template file.
    """
    from dataclasses import replace

    from . import builtin, verdicts

    text = os.fspath(name)
    # 1. the built-in task first: it is what the demo and fast tests use, and needs no files
    base, spec_options = parse_spec(text) if not _looks_like_path(text) else (text, {})
    if base == builtin.BUILTIN_NAME:
        merged = {**spec_options, **options}
        _check_options(base, merged, builtin.BUILTIN_OPTIONS)
        task = builtin.load_builtin(split, reasoning=reasoning, **merged)
    elif base == verdicts.VERDICTS_NAME:
        merged = {**spec_options, **options}
        _check_options(base, merged, verdicts.VERDICTS_OPTIONS)
        task = verdicts.load_verdicts(split, reasoning=reasoning, **merged)
    elif _looks_like_path(text) or Path(text).is_file():
        from . import generic

        _check_options(text, options, ())
        task = generic.load_task_file(Path(text), split, reasoning=reasoning)
    else:
        from . import paper

        if base not in paper.PAPER_TASKS:
            raise _unknown(base)
        _check_options(base, {**spec_options, **options}, ())
        task = paper.load_paper_task(base, split, data_dir=data_dir, reasoning=reasoning)
    if template is not None:
        from . import generic

        task = replace(task, template=generic.load_template_file(template))
        generic.check_template(task, source=template)
    return task
