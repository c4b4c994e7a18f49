"""The decision example and the task: what every loader returns and every scorer reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["DecisionExample", "PromptTemplate", "Task"]


@dataclass(frozen=True, kw_only=True)
class DecisionExample:
    """One decision to make (docs/design.md, "Decision example").

    id: unique within its task and split.
    labels: the option labels, e.g. ("A", "B", "C", "D", "E") or ("Safe", "Unsafe").
    label: the gold label, one of `labels`; None for an input to decide without gold (a request
        to `decal serve`), whose record then has no `label` and no `correct`.
    question, options, fact, input: the prompt fields a template may use; `options` holds the
        option texts in the order of `labels` (multiple choice), `input` the text to classify.
    true_probs: the true probability of each option, aligned with `labels`, for a task whose gold
        label is drawn from a known distribution (docs/design.md, "Prediction record"); else None.
    reasoning: a rationale that leads to the decision, for the reasoning warm start; else None.
    """

    id: str
    labels: tuple[str, ...]
    label: str | None
    question: str | None = None
    options: tuple[str, ...] | None = None
    fact: str | None = None
    input: str | None = None
    true_probs: tuple[float, ...] | None = None
    reasoning: str | None = None
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def label_index(self) -> int:
        if self.label is None:
            raise ValueError(f"example {self.id!r} has no gold label")
        return self.labels.index(self.label)


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """A user-message template with a non-reasoning and a reasoning variant.

    Templates use `str.format` fields: {question}, {fact}, {input}, {options} (rendered
    "A. text" lines), {labels} ("A, B, C"), and {option1}..{optionN}. `version` goes into
    every prediction record.
    """

    name: str
    version: str
    non_reasoning: str
    reasoning: str

    def user_message(self, example: DecisionExample, *, reasoning: bool) -> str:
        text = self.reasoning if reasoning else self.non_reasoning
        options = example.options or ()
        fields = {
            "question": example.question or "",
            "fact": example.fact or "",
            "input": example.input or "",
            "labels": ", ".join(example.labels),
            "options": "\n".join(f"{lab}. {opt}" for lab, opt in zip(example.labels, options)),
            **{f"option{i + 1}": opt for i, opt in enumerate(options)},
        }
        return text.format(**fields)


@dataclass(frozen=True, kw_only=True)
class Task:
    """A split of a task: its examples, in a fixed order, and the template that renders them.

    data_files: the files the examples were read from (for checksums in run records); empty for
    generated tasks and hub datasets.
    """

    name: str
    split: str
    examples: tuple[DecisionExample, ...]
    template: PromptTemplate
    reasoning: bool = False
    data_files: tuple[str, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.examples[0].labels if self.examples else ()

    def user_message(self, example: DecisionExample) -> str:
        return self.template.user_message(example, reasoning=self.reasoning)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[DecisionExample]:
        return iter(self.examples)
