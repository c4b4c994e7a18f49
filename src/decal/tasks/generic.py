"""A user's own decision task from a JSONL or CSV file, and prompt template files.

`load_task("path/to/file.jsonl", "all")` (or `.csv`) reads one example per row:

- `id` (required, unique), the gold `label` (required);
- multiple choice: `question` and `options` (a list of at least two texts); the option labels
  are `labels` when given, else A, B, C, ...;
- classification: `input` (or `question`) and `labels` (at least two), no options;
- optional `fact` (or `context`), shown by templates that use `{fact}`;
- optional `split`: with it, `split="train"` keeps the rows whose split is "train";
  `split="all"` always keeps every row. Without a split field only "all" is accepted;
- optional `reasoning`: a rationale that leads to the label, which the reasoning warm start
  (`decal train --method sft --reasoning`) trains on;
- optional `true_probs`: the true probability of each option, aligned with the labels (a JSON
  list; a CSV cell holds one), when the gold label was drawn from a known distribution; records
  then carry it and `decal metrics` adds the truth metrics.

CSV files have a header with the same names; options come either from one `options` column
holding a JSON list, or from columns `option_a`, `option_b`, ... (or `option1`, `option2`, ...)
in that order; `labels` is a JSON list or `|`-separated. Every row must have the same labels,
since metrics compare classes across examples.

Errors are never skipped: a malformed line, a missing or unknown gold label, a duplicate id, fewer
than two options, an empty question, missing CSV columns, non-UTF-8 bytes or an empty file raise
`DataError` naming the file, the line and the field.

Templates: without `template=`, a short default prompt (multiple choice, with the fact when the
file has facts, or classification) with a reasoning variant that asks for thinking between
<think> and </think>. A template file is `str.format` text with the fields of
`PromptTemplate.user_message` ({question}, {fact}, {input}, {options}, {labels}, {option1}...);
the same text serves both modes.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from ..errors import ConfigError, DataError
from ._files import iter_csv, iter_jsonl, read_template
from .schema import DecisionExample, PromptTemplate, Task

__all__ = ["ALL_SPLIT", "DEFAULT_TEMPLATES", "load_task_file", "load_template_file", "check_template"]

ALL_SPLIT = "all"
_REASONING_TAIL = (
    "Think briefly between <think> and </think>, then output only the label ({labels}) on its own line."
)
_MC = "Answer the following multiple-choice question with the single best option. {how}\n\n{fact}Question: {question}\nOptions:\n{options}"
_CLS = "Classify the following input as one of: {labels}. {how}\n\nInput:\n\"{input}\"\nLabel:"


def _pair(name: str, body: str, how: str, fact_line: str = "") -> PromptTemplate:
    def fill(text: str) -> str:
        return body.replace("{how}", text).replace("{fact}", fact_line)

    return PromptTemplate(name=name, version="1", non_reasoning=fill(how), reasoning=fill(_REASONING_TAIL))


_MC_HOW = "Reply with only the option label ({labels})."
DEFAULT_TEMPLATES = {
    "multiple_choice": _pair("generic-multiple-choice", _MC, _MC_HOW),
    "multiple_choice_fact": _pair("generic-multiple-choice-fact", _MC, _MC_HOW, "Fact: {fact}\n"),
    "classification": _pair("generic-classification", _CLS, "Reply with only the label."),
}
_FIELDS = {"question", "fact", "input", "labels", "options"}


def _text(row: dict, keys: tuple[str, ...], path: Path, line: int, *, required: bool) -> str | None:
    key = next((k for k in keys if row.get(k) not in (None, "")), None)
    if key is None:
        if required:
            raise DataError(f"missing (or empty) {' / '.join(keys)}", path=path, line=line, field=keys[0])
        return None
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"expected text, got {type(value).__name__}", path=path, line=line, field=key)
    if not value.strip():
        raise DataError("empty", path=path, line=line, field=key)
    return value


def _list(value, path: Path, line: int, field: str) -> list[str]:
    """A list of non-empty strings from a JSON list or a CSV cell (JSON list or `|`-separated)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise DataError(f"not a JSON list: {e.msg}", path=path, line=line, field=field) from e
        else:
            value = [v.strip() for v in stripped.split("|")] if stripped else []
    if not isinstance(value, list) or any(not isinstance(v, str) or not v.strip() for v in value):
        raise DataError("must be a list of non-empty texts", path=path, line=line, field=field)
    return value


def _true_probs(value, labels: list[str], path: Path, line: int) -> tuple[float, ...] | None:
    """The optional `true_probs`: one probability per label, summing to 1 (within 1e-6)."""
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"not a JSON list: {e.msg}", path=path, line=line, field="true_probs") from e
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in value
    )
    if not numbers or len(value) != len(labels):
        raise DataError(
            f"must be a list of {len(labels)} probabilities in [0, 1], one per label {labels}; got {value!r}",
            path=path, line=line, field="true_probs",
        )
    if abs(sum(value) - 1.0) > 1e-6:
        raise DataError(f"must sum to 1; got {value!r} (sum {sum(value)!r})", path=path, line=line, field="true_probs")
    return tuple(float(v) for v in value)


def _csv_options(row: dict) -> list[str] | None:
    """Options from option_a.. or option1.. columns, in order; None when there are none."""
    for keys in (
        [f"option_{c}" for c in string.ascii_lowercase],
        [f"option{i}" for i in range(1, 27)],
    ):
        present = [k for k in keys if k in row]
        if present:
            return [row[k] for k in keys[: len(present)] if k in row]
    return None


def _example(row: dict, path: Path, line: int, *, csv_row: bool) -> DecisionExample:
    ex_id = row.get("id")
    if ex_id is None or (isinstance(ex_id, str) and not ex_id.strip()):
        raise DataError("missing id", path=path, line=line, field="id")
    options = row.get("options")
    if csv_row and options in (None, ""):
        options = _csv_options(row)
        if options is not None and any(not o.strip() for o in options):
            raise DataError("empty option text", path=path, line=line, field="options")
    options = None if options in (None, "") else _list(options, path, line, "options")
    labels = _list(row["labels"], path, line, "labels") if row.get("labels") not in (None, "") else None
    if options is not None:
        if len(options) < 2:
            raise DataError(f"needs at least two options; got {len(options)}", path=path, line=line, field="options")
        labels = labels or list(string.ascii_uppercase[: len(options)])
        if len(labels) != len(options):
            raise DataError(f"{len(labels)} labels for {len(options)} options", path=path, line=line, field="labels")
        question = _text(row, ("question", "input"), path, line, required=True)
        text = None
    else:
        if labels is None or len(labels) < 2:
            raise DataError(
                "needs at least two options (`options`) or, for classification, two `labels`",
                path=path, line=line, field="options",
            )
        question = _text(row, ("question",), path, line, required=False)
        text = _text(row, ("input",), path, line, required=question is None)
    if len(set(labels)) != len(labels):
        raise DataError(f"labels must be distinct; got {labels}", path=path, line=line, field="labels")
    gold = row.get("label")
    if gold in (None, ""):
        raise DataError("missing gold label", path=path, line=line, field="label")
    if str(gold) not in labels:
        raise DataError(f"gold label {gold!r} is not one of {labels}", path=path, line=line, field="label")
    return DecisionExample(
        id=str(ex_id).strip(),
        labels=tuple(labels),
        label=str(gold),
        question=question,
        options=tuple(options) if options is not None else None,
        fact=_text(row, ("fact", "context"), path, line, required=False),
        input=text,
        true_probs=_true_probs(row.get("true_probs"), labels, path, line),
        reasoning=_text(row, ("reasoning",), path, line, required=False),
        meta={"split": row.get("split"), "line": line},
    )


def _rows(path: Path):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return iter_jsonl(path), False
    if suffix == ".csv":
        return _csv_rows(path), True
    raise ValueError(f"task file must end in .jsonl or .csv; got {path.name!r}")


def _csv_rows(path: Path):
    rows = iter_csv(path, required=("id", "label"))
    first = next(rows)
    header = set(first[1])
    if not header & {"question", "input"}:
        raise DataError(f"CSV header lacks a 'question' or 'input' column; found {sorted(header)}", path=path, line=1, field="question")
    yield first
    yield from rows


def load_task_file(path: str | os.PathLike, split: str = ALL_SPLIT, *, reasoning: bool = False) -> Task:
    """Load a user's JSONL/CSV task file (see the module docstring for the format).

    Args:
        path: the .jsonl or .csv file.
        split: "all" for every row, or a value of the rows' `split` field.
        reasoning: render the reasoning variant of the prompt.

    Raises:
        DataError: a malformed file (the message names the file, line and field).
        ValueError: a split the file does not have.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    rows, csv_rows = _rows(path)
    examples: list[DecisionExample] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        ex = _example(row, path, line, csv_row=csv_rows)
        if ex.id in seen:
            raise DataError(f"duplicate id {ex.id!r} (first at line {seen[ex.id]})", path=path, line=line, field="id")
        if examples and ex.labels != examples[0].labels:
            raise DataError(
                f"labels {list(ex.labels)} differ from the first row's {list(examples[0].labels)}; "
                f"every row of a task must have the same labels",
                path=path, line=line, field="labels",
            )
        seen[ex.id] = line
        examples.append(ex)
    splits = sorted({str(ex.meta["split"]) for ex in examples if ex.meta["split"] is not None})
    if split != ALL_SPLIT:
        if split not in splits:
            have = ", ".join([ALL_SPLIT, *splits])
            raise ValueError(f"Unknown split {split!r} for task file {path}. Available: {have}")
        examples = [ex for ex in examples if ex.meta["split"] == split]
    if examples[0].options is not None:
        key = "multiple_choice_fact" if any(ex.fact for ex in examples) else "multiple_choice"
    else:
        key = "classification"
    return Task(
        name=str(path), split=split, examples=tuple(examples), template=DEFAULT_TEMPLATES[key],
        reasoning=reasoning, data_files=(str(path),),
    )


def load_template_file(path: str | os.PathLike) -> PromptTemplate:
    """A `PromptTemplate` from a `str.format` text file, used for both modes.

    Raises:
        ConfigError: a field that `PromptTemplate.user_message` does not provide, or bad syntax.
        FileNotFoundError / DataError: a missing, empty or non-UTF-8 file.
    """
    path = Path(path)
    text = read_template(path)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(f"{path}: invalid template syntax: {e} (write literal braces as {{{{ and }}}})") from e
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field not in _FIELDS and not (field.startswith("option") and field[6:].isdigit()):
            raise ConfigError(
                f"{path}: unknown template field {{{field}}}. Available: "
                f"{{question}}, {{fact}}, {{input}}, {{options}}, {{labels}}, {{option1}}..{{optionN}}"
            )
    return PromptTemplate(name=path.stem, version=f"file:{path.name}", non_reasoning=text, reasoning=text)


def check_template(task: Task, *, source: str | os.PathLike) -> None:
    """Render every example once, so a template asking for a missing option fails at load time."""
    for ex in task.examples:
        try:
            task.template.user_message(ex, reasoning=task.reasoning)
        except (KeyError, IndexError) as e:
            raise ConfigError(
                f"{source}: template field {e} is not available for example {ex.id!r} "
                f"(it has {len(ex.options or ())} options)"
            ) from e
