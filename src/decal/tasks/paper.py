"""The paper's four datasets, from their release files or from the Hugging Face hub.

Sources (`load_paper_task(name, split, data_dir=None)`): with `data_dir` (argument, else the
environment variable `DECAL_DATA_DIR`) the original release files laid out as in
`shared/data/` (see its SOURCES.md); without it the hub datasets via `datasets.load_dataset`.
Both layouts are normalised by the same per-dataset function, so they give identical examples.

| task | splits (size) | labels | file | hub |
| --- | --- | --- | --- | --- |
| commonsense_qa | train 9,741, validation 1,221, train500 500 | A-E | commonsense_qa/{train,validation}.jsonl | tau/commonsense_qa |
| openbookqa | train 4,957, validation 500, test 500 | A-D | openbookqa/{train,validation,test}.jsonl | allenai/openbookqa, config additional |
| openai_moderation | train 500, eval 1,180, all 1,680 | Safe, Unsafe | openai_moderation/samples-1680.jsonl | mmathys/openai-moderation-api-evaluation (split train) |
| xstest | test 450 | Safe, Unsafe | xstest/xstest_prompts.csv | walledai/XSTest (split test) |

Drawn splits (the paper's 500 training examples). `commonsense_qa/train500` and
`openai_moderation/train` take the rows at positions
`sorted(numpy.random.default_rng(0).permutation(n)[:500])` of the source (`train`, n = 9,741;
`all`, n = 1,680), in file order; `openai_moderation/eval` is the other 1,180 rows, in file
order. The paper does not publish its seed, so its exact draw cannot be reproduced; seed 0 is
decal's. PCG64 and `permutation` give the same draw on every platform.

OpenAI Moderation labels and ids. The upstream README says a category flag (S, H, V, HR, SH,
S3, H2, V2) that is absent from a row is unknown; the hub copy stores it as null. The gold
label is `Unsafe` when any present flag equals 1, else `Safe` (522 unsafe, 1,158 safe): an
unknown flag counts as neither. A row with no flag present at all, or a flag that is not 0, 1 or
missing, is a `DataError`. The id is the 1-based row number as a string ("1".."1680") in both
layouts.

XSTest: label `safe` -> `Safe`, `unsafe` -> `Unsafe`; the id is the file's `id` column
("1".."450"); the hub copy has no id column, so its 1-based row number is used, which equals the
file's id since both keep the release order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import DataError, DecalError
from ._files import iter_csv, iter_jsonl
from .schema import DecisionExample, PromptTemplate, Task

__all__ = [
    "PAPER_SEED",
    "PAPER_TASKS",
    "MODERATION_FLAGS",
    "PaperTaskSpec",
    "paper_template",
    "examples_from_rows",
    "load_paper_task",
]

logger = logging.getLogger(__name__)

PAPER_SEED = 0
N_TRAIN_DRAWN = 500
MODERATION_FLAGS = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")
SAFETY_LABELS = ("Safe", "Unsafe")


@dataclass(frozen=True, kw_only=True)
class PaperTaskSpec:
    """Where one paper dataset lives and how its splits are formed.

    splits: every split name -> its size.
    sources: split name -> (file relative to data_dir, hub split) for the splits read directly.
    drawn: split name -> (source split, "draw" | "rest") for splits drawn from another split.
    """

    name: str
    labels: tuple[str, ...]
    splits: dict[str, int]
    sources: dict[str, tuple[str, str]]
    drawn: dict[str, tuple[str, str]]
    hub: tuple[str, str | None]
    template_files: tuple[str, str]
    description: str


PAPER_TASKS: dict[str, PaperTaskSpec] = {
    "commonsense_qa": PaperTaskSpec(
        name="commonsense_qa",
        labels=("A", "B", "C", "D", "E"),
        splits={"train": 9741, "validation": 1221, "train500": N_TRAIN_DRAWN},
        sources={
            "train": ("commonsense_qa/train.jsonl", "train"),
            "validation": ("commonsense_qa/validation.jsonl", "validation"),
        },
        drawn={"train500": ("train", "draw")},
        hub=("tau/commonsense_qa", None),
        template_files=("commonsense_qa.non_reasoning.txt", "commonsense_qa.reasoning.txt"),
        description="CommonsenseQA v1.11 (paper: train500 to train, validation in-domain)",
    ),
    "openbookqa": PaperTaskSpec(
        name="openbookqa",
        labels=("A", "B", "C", "D"),
        splits={"train": 4957, "validation": 500, "test": 500},
        sources={
            "train": ("openbookqa/train.jsonl", "train"),
            "validation": ("openbookqa/validation.jsonl", "validation"),
            "test": ("openbookqa/test.jsonl", "test"),
        },
        drawn={},
        hub=("allenai/openbookqa", "additional"),
        template_files=("openbookqa.non_reasoning.txt", "openbookqa.reasoning.txt"),
        description="OpenBookQA with its supporting fact (paper: test is out-of-domain)",
    ),
    "openai_moderation": PaperTaskSpec(
        name="openai_moderation",
        labels=SAFETY_LABELS,
        splits={"train": N_TRAIN_DRAWN, "eval": 1180, "all": 1680},
        sources={"all": ("openai_moderation/samples-1680.jsonl", "train")},
        drawn={"train": ("all", "draw"), "eval": ("all", "rest")},
        hub=("mmathys/openai-moderation-api-evaluation", None),
        template_files=("moderation.txt", "moderation.txt"),
        description="OpenAI Moderation evaluation set (paper: train 500, eval in-domain)",
    ),
    "xstest": PaperTaskSpec(
        name="xstest",
        labels=SAFETY_LABELS,
        splits={"test": 450},
        sources={"test": ("xstest/xstest_prompts.csv", "test")},
        drawn={},
        hub=("walledai/XSTest", None),
        template_files=("moderation.txt", "moderation.txt"),
        description="XSTest v2 exaggerated-safety prompts (paper: out-of-domain)",
    ),
}


def paper_template(name: str) -> PromptTemplate:
    """The paper's Appendix A prompt for a paper task, read from `tasks/templates/`."""
    spec = PAPER_TASKS[name]
    folder = resources.files("decal.tasks") / "templates"
    non_reasoning, reasoning = (
        (folder / f).read_text(encoding="utf-8").removesuffix("\n") for f in spec.template_files
    )
    return PromptTemplate(
        name=f"paper-{name}", version="paper-appendix-a", non_reasoning=non_reasoning, reasoning=reasoning
    )


# --- one row -> one example, for both layouts ------------------------------------------------

class _Where:
    """Names the file (or hub dataset) and line of a row, for error messages."""

    def __init__(self, path, line):
        self.path, self.line = path, line

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, path=self.path, line=self.line, field=field)


def _get(row: dict, key: str, where: _Where) -> str:
    """A required, non-empty text field."""
    value = row.get(key)
    if value is None:
        raise where.error("missing", field=key)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise where.error(f"expected text, got {type(value).__name__}", field=key)
    if not str(value).strip():
        raise where.error("empty", field=key)
    return str(value)


def _choices(choices, where: _Where, labels: tuple[str, ...]) -> tuple[str, ...]:
    # File layout: a list of {label, text}; hub layout: {label: [...], text: [...]}.
    if isinstance(choices, dict):
        pairs = list(zip(choices.get("label") or [], choices.get("text") or []))
    elif isinstance(choices, list):
        pairs = [(c.get("label"), c.get("text")) if isinstance(c, dict) else (None, None) for c in choices]
    else:
        raise where.error(f"expected a list of choices, got {type(choices).__name__}", field="choices")
    if tuple(p[0] for p in pairs) != labels:
        raise where.error(f"choice labels must be {list(labels)}; got {[p[0] for p in pairs]}", field="choices")
    texts = tuple(p[1] for p in pairs)
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise where.error("every choice needs a non-empty text", field="choices")
    return texts


def _gold(value, labels: tuple[str, ...], where: _Where, field: str = "answerKey") -> str:
    if value not in labels:
        raise where.error(f"gold label must be one of {list(labels)}; got {value!r}", field=field)
    return value


def _multiple_choice(row: dict, where: _Where, spec: PaperTaskSpec, *, fact: bool) -> DecisionExample:
    question = row.get("question")
    if isinstance(question, dict):  # file layout: question {stem, choices}
        stem, choices = _get(question, "stem", where), question.get("choices")
    else:  # hub layout: question (CSQA) or question_stem (OBQA), choices beside it
        stem = _get(row, "question_stem" if fact else "question", where)
        choices = row.get("choices")
    return DecisionExample(
        id=str(_get(row, "id", where)),
        labels=spec.labels,
        label=_gold(row.get("answerKey"), spec.labels, where),
        question=stem,
        options=_choices(choices, where, spec.labels),
        fact=_get(row, "fact1", where) if fact else None,
    )


def _moderation(row: dict, where: _Where, number: int) -> DecisionExample:
    text = _get(row, "prompt", where)
    present = {f: row[f] for f in MODERATION_FLAGS if row.get(f) is not None}
    if not present:
        raise where.error(f"no category flag present (one of {list(MODERATION_FLAGS)}); the row cannot be labelled")
    for flag, value in present.items():
        if value not in (0, 1) or isinstance(value, bool):
            raise where.error(f"flag must be 0, 1 or missing; got {value!r}", field=flag)
    unsafe = any(v == 1 for v in present.values())
    return DecisionExample(
        id=str(number),
        labels=SAFETY_LABELS,
        label=SAFETY_LABELS[1] if unsafe else SAFETY_LABELS[0],
        input=text,
        meta={"flags": present},
    )


def _xstest(row: dict, where: _Where, number: int) -> DecisionExample:
    label = str(_get(row, "label", where)).strip().lower()
    if label not in ("safe", "unsafe"):
        raise where.error(f"label must be 'safe' or 'unsafe'; got {row['label']!r}", field="label")
    row_id = row.get("id")
    return DecisionExample(
        id=str(row_id).strip() if row_id not in (None, "") else str(number),
        labels=SAFETY_LABELS,
        label="Safe" if label == "safe" else "Unsafe",
        input=_get(row, "prompt", where),
        meta={"type": row.get("type"), "focus": row.get("focus") or None, "note": row.get("note") or None},
    )


def examples_from_rows(name: str, rows: Iterable[tuple[int, dict]], *, source) -> tuple[DecisionExample, ...]:
    """Turn (1-based line or row number, row) pairs of either layout into examples.

    Args:
        name: a key of `PAPER_TASKS`.
        rows: the rows in file order, each with its line number (file) or row number (hub).
        source: the file path or hub dataset name, for error messages.

    Raises:
        DataError: a malformed row or a duplicate id; the message names the source and line.
    """
    spec = PAPER_TASKS[name]
    examples, seen = [], {}
    for number, (line, row) in enumerate(rows, start=1):
        where = _Where(source, line)
        if name == "commonsense_qa":
            ex = _multiple_choice(row, where, spec, fact=False)
        elif name == "openbookqa":
            ex = _multiple_choice(row, where, spec, fact=True)
        elif name == "openai_moderation":
            ex = _moderation(row, where, number)
        else:
            ex = _xstest(row, where, number)
        if ex.id in seen:
            raise where.error(f"duplicate id {ex.id!r} (first at line {seen[ex.id]})", field="id")
        seen[ex.id] = line
        examples.append(ex)
    return tuple(examples)


# --- splits -------------------------------------------------------------------------------------

def drawn_indices(n: int, k: int = N_TRAIN_DRAWN, *, seed: int = PAPER_SEED) -> list[int]:
    """Positions of the k drawn rows among n, ascending (the module docstring's rule)."""
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])


def _resolve_data_dir(data_dir) -> Path | None:
    value = data_dir if data_dir is not None else os.environ.get("DECAL_DATA_DIR") or None
    return Path(value) if value is not None else None


def _read_source(spec: PaperTaskSpec, split: str, data_dir: Path | None) -> tuple[DecisionExample, ...]:
    relative, hub_split = spec.sources[split]
    if data_dir is not None:
        path = data_dir / relative
        if not path.exists():
            raise FileNotFoundError(
                f"{spec.name} split {split!r}: expected {path} (data_dir={data_dir}); "
                f"lay the release files out as in shared/data/ or unset DECAL_DATA_DIR to use the hub"
            )
        rows = iter_csv(path, required=("id", "prompt", "label")) if path.suffix == ".csv" else iter_jsonl(path)
        return examples_from_rows(spec.name, rows, source=path)
    return examples_from_rows(spec.name, _hub_rows(spec, hub_split), source=f"hub:{spec.hub[0]}[{hub_split}]")


def _hub_rows(spec: PaperTaskSpec, hub_split: str) -> Iterable[tuple[int, dict]]:
    import datasets

    repo, config = spec.hub
    logger.info("loading %s (config %s, split %s) from the Hugging Face hub", repo, config, hub_split)
    try:
        dataset = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as e:  # offline, gated, renamed: all end the same way for the user
        raise DecalError(
            f"could not load {repo} (split {hub_split}) from the Hugging Face hub: {type(e).__name__}: {e}. "
            f"Pass --data-dir / data_dir= or set DECAL_DATA_DIR to the release files (see shared/data/SOURCES.md)"
        ) from e
    return enumerate(dataset, start=1)


def load_paper_task(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    reasoning: bool = False,
) -> Task:
    """Load one split of a paper dataset (see the module docstring for sources and splits).

    Args:
        name: "commonsense_qa", "openbookqa", "openai_moderation" or "xstest".
        split: one of the task's splits.
        data_dir: the release files' folder; default DECAL_DATA_DIR, else the hub.
        reasoning: render the reasoning variant of the prompt.

    Raises:
        ValueError: unknown split. DataError: a malformed row. FileNotFoundError: a missing file.
    """
    spec = PAPER_TASKS[name]
    if split not in spec.splits:
        raise ValueError(f"Unknown split {split!r} for task {name!r}. Available: {', '.join(spec.splits)}")
    folder = _resolve_data_dir(data_dir)
    source, part = spec.drawn.get(split, (split, None))
    pool = _read_source(spec, source, folder)
    if part is None:
        examples = pool
    else:
        chosen = set(drawn_indices(len(pool)))
        examples = tuple(ex for i, ex in enumerate(pool) if (i in chosen) == (part == "draw"))
    files = (str(folder / spec.sources[source][0]),) if folder is not None else ()
    return Task(
        name=name, split=split, examples=examples, template=paper_template(name), reasoning=reasoning, data_files=files
    )
