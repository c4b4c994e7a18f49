"""The reasoning warm start (`decal train --method sft --reasoning`): SFT on whole reasoning completions.

Each training row is the task's reasoning prompt (`render_chat(..., reasoning=True)`) followed by
the completion

    <think>\\nRATIONALE\\n</think>\\n\\nLABEL<eos>

where RATIONALE is the example's `reasoning` (the `verdicts` task writes one; a user's JSONL/CSV
task gives it in a `reasoning` field) and LABEL follows one of two rules (`warm_start_labels`,
issue #22), which make the two conditions of the paper's diagnosis (Section 4) on one task:

- ``sample`` (the default; the *hedging* condition): LABEL is drawn from the example's true answer
  distribution (`true_probs`, seeded). The warm-started model is calibrated in principle: after a
  rationale whose true P(Positive) is 0.73 it learns to say Positive 73 % of the time, not always.
- ``commit`` (the *committed* condition): LABEL is what the rationale concludes, the option with
  the larger true probability; a tie goes to the first option in the task's label order
  (`verdicts`: Positive). A `verdicts` rationale states the counts ("2 positive, 2 negative.") that
  fix the true probability, so the label is a function of the rationale's text alone, as a real
  reasoning model's answer follows from its trace: the decision inherits the trace's certainty
  (the paper: RL "cannot achieve calibration, since there are no calibrated paths to
  reinforce"). Two examples with the same rationale and different committed labels are refused.

Without `true_probs` both rules use the gold label (a task file whose rows carry `reasoning` but no
`true_probs` is already a committed path). Probabilities are compared as integers out of 10^6,
the precision `verdicts` stores them at, so draws and ties are the same on every platform.

Tokenization. The prompt is tokenized alone, exactly as evaluation and GRPO tokenize it before
generating (`decal.scoring.encode_prompts`), and the completion alone, in one piece; the row is
their concatenation. So the prompt/completion boundary is the one generation sees, and the
completion's tokens are those the model is taught to produce (tokenizing "...</think>\\n\\n" and
"Positive" separately would give other ids for the newlines in SmolLM2's tokenizer). Every row
is checked with `decal.decision.find_decision`: the decision parsed from the trained completion
must be the drawn label, at the position evaluation would read.

Training is TRL's `SFTTrainer` on this pre-tokenized prompt/completion dataset (`input_ids` plus
`completion_mask`) with `completion_only_loss=True`: TRL turns the mask into labels that are -100
on every prompt token, so the loss is the causal-LM cross-entropy of the completion tokens only
(the rationale, the marker, the label and the end-of-turn token).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from ..decision import END_OF_REASONING, find_decision, option_token_ids, stop_token_ids
from ..errors import DataError
from ..scoring import encode_prompts
from ..tasks.prompts import decision_context, render_chat

__all__ = [
    "WARM_START_LABELS",
    "check_rationales",
    "warm_start_completion",
    "draw_warm_start_labels",
    "commit_warm_start_labels",
    "warm_start_labels",
    "warm_start_rule",
    "warm_start_rows",
    "warm_start_dataset",
    "warm_start_arguments",
    "build_warm_start_trainer",
]

logger = logging.getLogger(__name__)

# Probabilities are compared as integers out of 10^6 (the precision `verdicts` stores them at),
# so a label draw is the same on every platform.
_SCALE = 10**6
#: The label rules of the warm start (`TrainConfig.warm_start_labels`; see the module docstring).
WARM_START_LABELS = ("sample", "commit")
_RULES = {
    "sample": "each label drawn from the example's true_probs (seeded); the gold label where there are none",
    "commit": "the option with the larger true probability, ties to the first option in label order; "
              "the gold label where there are no true_probs",
}


def warm_start_completion(rationale: str, label: str, *, marker: str = END_OF_REASONING) -> str:
    """The completion text of one warm-start row (without the end-of-turn token).

    Example:
        >>> warm_start_completion("great +, poor -: 1 positive, 1 negative.", "Positive")
        '<think>\\ngreat +, poor -: 1 positive, 1 negative.\\n</think>\\n\\nPositive'
    """
    return f"<think>\n{rationale}\n{marker}\n\n{label}"


def draw_warm_start_labels(task, *, seed: int) -> list[str]:
    """One label per example: drawn from `true_probs` where the example has them, else the gold label.

    Args:
        task: a `decal.tasks.Task`.
        seed: int; the same seed gives the same labels on every platform.

    Returns:
        The labels, in the task's order.
    """
    rng = np.random.default_rng([int(seed), 0x57A2])  # its own stream: the trainer's seed drives the rest
    labels = []
    for ex in task.examples:
        u = int(rng.integers(_SCALE))  # drawn for every example, so each draw depends on its position only
        if ex.true_probs is None:
            labels.append(ex.label)
            continue
        thresholds = np.cumsum([round(_SCALE * p) for p in ex.true_probs])
        k = int(np.searchsorted(thresholds, u, side="right"))
        labels.append(ex.labels[min(k, len(ex.labels) - 1)])
    return labels


def commit_warm_start_labels(task) -> list[str]:
    """One label per example: what its rationale concludes (the committed condition; module docstring).

    The option with the larger true probability (compared out of 10^6), ties to the first option
    in the example's label order; the gold label where the example has no `true_probs`.

    Args:
        task: a `decal.tasks.Task`.

    Returns:
        The labels, in the task's order.

    Raises:
        DataError: two examples share a rationale but would get different labels (naming the later
            one's file and line for task files), so the label would not follow from the text.

    Example:
        >>> from decal.tasks import load_task
        >>> task = load_task("verdicts", "train", n=3)
        >>> [ex.true_probs[0] for ex in task.examples], commit_warm_start_labels(task)
        ([0.5, 0.047426, 0.5], ['Positive', 'Negative', 'Positive'])
    """
    labels, first = [], {}
    for example in task.examples:
        if example.true_probs is None:
            label = example.label
        else:
            scaled = [round(_SCALE * p) for p in example.true_probs]
            label = example.labels[scaled.index(max(scaled))]  # index() takes the first of tied maxima
        if example.reasoning:
            earlier = first.setdefault(example.reasoning, (example, label))
            if earlier[1] != label:
                raise _conflicting_commit(task, example, label, *earlier)
        labels.append(label)
    return labels


def warm_start_labels(task, *, rule: Literal["sample", "commit"] = "sample", seed: int = 0) -> list[str]:
    """The warm start's label of every example under `rule` ("sample" or "commit"; module docstring)."""
    if rule == "sample":
        return draw_warm_start_labels(task, seed=seed)
    if rule == "commit":
        return commit_warm_start_labels(task)
    raise ValueError(f"`rule` must be one of {', '.join(WARM_START_LABELS)}; got {rule!r}")


def warm_start_rule(rule: str) -> str:
    """The label rule in words, as `env.json` records it.

    Example:
        >>> warm_start_rule("commit")[:44]
        'the option with the larger true probability,'
    """
    if rule not in _RULES:
        raise ValueError(f"`rule` must be one of {', '.join(WARM_START_LABELS)}; got {rule!r}")
    return _RULES[rule]


def _where(task, example) -> tuple[str | None, int | None]:
    line = example.meta.get("line") if isinstance(example.meta, dict) else None
    path = task.data_files[0] if task.data_files and line is not None else None
    return path, line


def _conflicting_commit(task, example, label, earlier, earlier_label) -> DataError:
    path, line = _where(task, example)
    message = (
        f"example {example.id!r} of task {task.name!r} has the same reasoning as {earlier.id!r} but its committed "
        f"label is {label!r}, not {earlier_label!r}; with --warm-start-labels commit the label must follow from the "
        "rationale's text (give the two rows rationales that state their conclusion, or use --warm-start-labels sample)"
    )
    return DataError(message, path=path, line=line, field="reasoning")


def _missing_rationale(task, example) -> DataError:
    path, line = _where(task, example)
    message = (
        f"example {example.id!r} of task {task.name!r} has no reasoning; the reasoning warm start trains on each "
        "example's rationale (give every row a `reasoning` field, or use a task that writes one, e.g. verdicts)"
    )
    return DataError(message, path=path, line=line, field="reasoning")


def check_rationales(task, *, rule: Literal["sample", "commit"] = "sample") -> None:
    """Raise `DataError` (naming the file, line and field for task files) when an example has no `reasoning`,
    or, under the "commit" rule, when two examples share a rationale but not its conclusion.

    Called before any model loads, so a task file that cannot be trained on fails in a second.
    """
    for example in task.examples:
        if not example.reasoning:
            raise _missing_rationale(task, example)
    if rule == "commit":
        commit_warm_start_labels(task)


def warm_start_rows(task, tokenizer, *, seed: int, rule: Literal["sample", "commit"] = "sample",
                    marker: str = END_OF_REASONING) -> list[dict[str, Any]]:
    """Tokenize a task into warm-start rows (see the module docstring).

    Args:
        task: a `decal.tasks.Task` whose examples carry `reasoning`.
        tokenizer: the model's tokenizer (with its chat template).
        seed: seeds the label draw of the "sample" rule (`draw_warm_start_labels`).
        rule: "sample" (labels drawn from the truth) or "commit" (the rationale's conclusion).
        marker: the end-of-reasoning marker.

    Returns:
        One dict per example: `id`, `drawn_label` (the row's label under `rule`), `input_ids`
        (prompt ids + completion ids), `completion_mask` (0 on the prompt, 1 on the completion) and
        `length`.

    Raises:
        DataError: an example has no `reasoning` (names the file, line and field for task files), or
            under "commit" two examples share a rationale but not its conclusion.
        ValueError: the decision parsed from a tokenized completion is not its label.
    """
    check_rationales(task)  # before the labels: a missing rationale is the first thing to fix
    labels = warm_start_labels(task, rule=rule, seed=seed)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stops = stop_token_ids(tokenizer)
    rows, tokens = [], None
    for example, label in zip(task.examples, labels):
        prompt = render_chat(tokenizer, task.template.user_message(example, reasoning=True), reasoning=True)
        if tokens is None:  # one label set per task; the context only matters through its tail
            tokens = option_token_ids(tokenizer, example.labels, context=decision_context(prompt, reasoning=True, marker=marker))
        # 1. the prompt alone, as generation tokenizes it; 2. the completion alone, in one piece
        prompt_ids = encode_prompts(tokenizer, [prompt])[0]
        completion_ids = list(tokenizer(warm_start_completion(example.reasoning, label, marker=marker),
                                        add_special_tokens=False)["input_ids"]) + eos
        decision = find_decision(completion_ids, tokenizer, tokens, marker=marker, stop_ids=stops)
        if not decision.valid or example.labels[decision.option] != label:
            raise ValueError(
                f"example {example.id!r}: the decision parsed from the tokenized warm-start completion is "
                f"{decision!r}, not the label {label!r}; the rationale or label tokenizes across the marker"
            )
        rows.append({
            "id": example.id,
            "drawn_label": label,
            "input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
            "length": len(prompt_ids) + len(completion_ids),
        })
    return rows


def warm_start_dataset(task, tokenizer, *, seed: int, rule: Literal["sample", "commit"] = "sample",
                       marker: str = END_OF_REASONING):
    """`warm_start_rows` as a `datasets.Dataset` (columns id, drawn_label, input_ids, completion_mask, length)."""
    import datasets

    rows = warm_start_rows(task, tokenizer, seed=seed, rule=rule, marker=marker)
    if not rows:
        raise ValueError(f"task {task.name!r} split {task.split!r} has no examples to train on")
    return datasets.Dataset.from_list(rows)


def warm_start_arguments(common: dict[str, Any]):
    """TRL's `SFTConfig` for the warm start, from the trainer arguments every method shares.

    Completion-only loss on the pre-tokenized rows, no truncation (`max_length=None`; a truncated
    row would lose its decision), and batches grouped by length (less padding on a CPU).
    """
    from trl import SFTConfig

    return SFTConfig(**common, completion_only_loss=True, max_length=None,
                     train_sampling_strategy="group_by_length", length_column_name="length")


def build_warm_start_trainer(*, model, tokenizer, task, args, peft_config=None, callbacks=None,
                             labels: Literal["sample", "commit"] = "sample"):
    """A TRL `SFTTrainer` for the reasoning warm start (see the module docstring).

    Args:
        model: a causal LM (float32 recommended: docs/design.md, "Measured costs"), or a `PeftModel` to continue.
        tokenizer: its tokenizer; a missing pad token is set to the EOS token.
        task: the training `Task`; its examples need `reasoning`.
        args: from `warm_start_arguments` (`completion_only_loss=True`, `remove_unused_columns=False`).
        peft_config: a `peft.LoraConfig`, or None to train `model` as given.
        callbacks: extra `TrainerCallback`s.
        labels: the label rule, "sample" or "commit" (module docstring).

    Returns:
        The `SFTTrainer`, ready for `.train(resume_from_checkpoint=...)`.
    """
    from trl import SFTTrainer

    if not getattr(args, "completion_only_loss", False):
        raise ValueError("the warm start needs `completion_only_loss=True` (see warm_start_arguments); "
                         "otherwise the loss would include the prompt tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = warm_start_dataset(task, tokenizer, seed=args.seed, rule=labels)
    differ = sum(lab != ex.label for lab, ex in zip(dataset["drawn_label"], task.examples))
    logger.info("reasoning warm start on %d examples of %s/%s, mean length %.0f tokens; labels: %s (%s), %d of them "
                "differ from the gold ones", len(dataset), task.name, task.split, sum(dataset["length"]) / len(dataset),
                labels, warm_start_rule(labels), differ)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=list(callbacks or []))
