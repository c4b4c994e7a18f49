"""From engine outputs to prediction records: the one path every scorer takes (issue #20 items 2 and 6).

`decal evaluate`, the rollout and swap analyses and `decal serve` all build their records here,
so a decision means the same everywhere (docs/design.md, "Prediction and validity" and "Prediction record"):

- `prepare_prompts` renders each example's prompt, tokenizes it, finds its decision tokens in
  its own context (`decal.decision.option_token_ids`, cached) and checks that the decision token
  sits where it will be read (`decal.decision.check_decision_positions`), before any scoring;
- `record_from_scores` (a read at a fixed position: non-reasoning scoring, the swap's spliced
  prompt) and `record_from_generation` (a reasoning rollout) turn an engine's `OptionScores` or
  `GeneratedDecision` into a `PredictionRecord`; `score_records` runs the engine on prepared
  prompts and does both.

Decision after leading whitespace (issue #23 item 4). Some models start their answer with
whitespace or a header (users report "\n\n" as Llama Guard 3's first token under some chat
templates), so the first position after the prompt is not where they decide, and its label mass
is near 0. With ``decision_after_whitespace`` a non-reasoning read generates greedily up to
`LEADING_WHITESPACE_BUDGET` tokens and reads the option distribution at the first one that is
not whitespace (`decal.decision.find_decision` with an empty marker): the record is that
generation's (`record_from_generation`), so valid means the token there is an option's, and
``extra["decision_index"]`` says how many tokens came before it (``extra["forced"]``: the whole
budget was whitespace, read after the last).

The rules, each written once, in `_record`:

- valid: the token the model emits at the decision position is an option's decision token. In a
  rollout that is the token after the end-of-reasoning marker (`decal.decision.find_decision`).
  Where the decision is read at a fixed position the model's token there is its greedy one, the
  unconstrained argmax, so ``valid == argmax_is_option``. (Before issue #20 such reads were always
  valid, so a model whose top token is "You" had an invalid rate of 0.)
- prediction: the emitted option when valid; otherwise the forced decision, the option with the
  largest `option_probs` (the constrained argmax).
- confidence: ``option_probs[prediction]``, the full-vocabulary probability of the emitted decision
  token, or of the forced decision's.
- correct: ``valid and prediction == label``; None when the example has no gold label (serving).
- label_mass: ``sum(option_probs)``; argmax_is_option: whether the unconstrained top token at the
  position read is an option's decision token.

Probabilities are clipped at 1: exp of a float32 log-softmax can pass 1 by an ulp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from .decision import END_OF_REASONING, DecisionTokens, check_decision_positions, option_token_ids
from .engines.base import GeneratedDecision, OptionScores
from .records import PredictionRecord
from .tasks.schema import DecisionExample, Task

__all__ = [
    "RunFields",
    "PreparedPrompt",
    "prepare_prompts",
    "record_from_scores",
    "record_from_generation",
    "score_records",
    "record_row",
    "LEADING_WHITESPACE_BUDGET",
]

# Tokens generated at most to find the first non-whitespace one (module docstring).
LEADING_WHITESPACE_BUDGET = 8


@dataclass(frozen=True, kw_only=True)
class RunFields:
    """What every record of one run carries besides its decision (docs/design.md, "Prediction record")."""

    task: str
    split: str
    model: str | None = None
    adapter: str | None = None
    seed: int | None = None
    prompt_version: str | None = None

    @classmethod
    def of(cls, task: Task, *, model: str | None, adapter: str | None = None, seed: int | None = None) -> "RunFields":
        return cls(task=task.name, split=task.split, model=model, adapter=None if adapter is None else str(adapter),
                   seed=seed, prompt_version=task.template.version)


@dataclass(frozen=True)
class PreparedPrompt:
    """One example ready for an engine.

    example: the decision example.
    prompt: its rendered prompt text.
    ids: the prompt's token ids (what the engine reads).
    tokens: its decision tokens, found in its own context.
    """

    example: DecisionExample
    prompt: str
    ids: list[int]
    tokens: DecisionTokens


def prepare_prompts(tokenizer, task: Task, examples: Sequence[DecisionExample], *, marker: str = END_OF_REASONING,
                    names: Sequence[str] | None = None) -> list[PreparedPrompt]:
    """Render, tokenize, find the decision tokens and check their position, for each example.

    The position check reads after the prompt's ids (non-reasoning) or after the decision
    context, the prompt plus a reasoning and the marker (reasoning: the tokens a completion's
    decision is compared with).

    Args:
        tokenizer: the engine's tokenizer.
        task: gives the template and the mode (`task.reasoning`).
        examples: the examples to prepare.
        marker: the end-of-reasoning marker.
        names: what errors call each example (default its id).

    Raises:
        DecisionTokenCollisionError: two options share a decision token.
        DecisionPositionError: a decision token would not be read where it sits (one line naming
            the example).
    """
    from .scoring import encode_prompts
    from .tasks.prompts import decision_context, render_chat

    prompts = [render_chat(tokenizer, task.user_message(ex), reasoning=task.reasoning) for ex in examples]
    ids = encode_prompts(tokenizer, prompts)
    contexts = [decision_context(p, reasoning=task.reasoning, marker=marker) for p in prompts]
    tokens = [option_token_ids(tokenizer, ex.labels, context=c) for ex, c in zip(examples, contexts, strict=True)]
    read_after = encode_prompts(tokenizer, contexts) if task.reasoning else ids
    check_decision_positions(tokenizer, read_after, contexts, tokens,
                             names=[str(ex.id) for ex in examples] if names is None else names)
    return [PreparedPrompt(ex, p, i, t) for ex, p, i, t in zip(examples, prompts, ids, tokens, strict=True)]


def _record(example: DecisionExample, option_probs: Sequence[float], tokens: DecisionTokens, *, emitted_option: int,
            emitted_token: str | None, top_token: str, top_token_id: int, run: RunFields, completion: str | None,
            seconds: float | None, extra: Mapping | None) -> PredictionRecord:
    """The record rules of the module docstring, in one place."""
    if tuple(tokens.labels) != tuple(example.labels):
        raise ValueError(f"decision tokens of {list(tokens.labels)} for example {example.id!r} with labels "
                         f"{list(example.labels)}")
    raw = [float(p) for p in option_probs]
    if len(raw) != len(example.labels):
        raise ValueError(f"`option_probs` must have {len(example.labels)} values; got {len(raw)}")
    probs = [min(1.0, p) for p in raw]
    valid = emitted_option >= 0
    chosen = emitted_option if valid else max(range(len(probs)), key=probs.__getitem__)
    prediction = example.labels[chosen]
    return PredictionRecord(
        id=str(example.id),
        task=run.task,
        split=run.split,
        label=example.label,
        prediction=prediction,
        correct=None if example.label is None else bool(valid and prediction == example.label),
        valid=valid,
        confidence=probs[chosen],
        option_probs=probs,
        labels=list(example.labels),
        label_mass=min(1.0, sum(raw)),
        argmax_is_option=tokens.option_of(top_token_id) >= 0,
        true_probs=None if example.true_probs is None else [float(p) for p in example.true_probs],
        emitted_token=emitted_token,
        completion=completion,
        model=run.model,
        adapter=run.adapter,
        seed=run.seed,
        prompt_version=run.prompt_version,
        top_token=top_token,
        seconds=seconds,
        extra=dict(extra or {}),
    )


def record_from_scores(example: DecisionExample, scores: OptionScores, tokens: DecisionTokens, *, run: RunFields,
                       seconds: float | None = None, extra: Mapping | None = None) -> PredictionRecord:
    """The record of a read at a fixed position: the model's (greedy) token there is its top token.

    Args:
        example: the example (its gold label may be None).
        scores: the engine's `OptionScores` at the position.
        tokens: the example's decision tokens (the ones `scores` was read for).
        run: the run's fields.
        seconds: scoring time per example, if measured.
        extra: extra fields, kept in `PredictionRecord.extra`.
    """
    return _record(example, scores.option_probs, tokens, emitted_option=tokens.option_of(scores.top_token_id),
                   emitted_token=scores.top_token, top_token=scores.top_token, top_token_id=scores.top_token_id,
                   run=run, completion=None, seconds=seconds, extra=extra)


def record_from_generation(example: DecisionExample, generation: GeneratedDecision, tokens: DecisionTokens, *,
                           run: RunFields, seconds: float | None = None, extra: Mapping | None = None) -> PredictionRecord:
    """The record of one reasoning rollout; `extra` gets `decision_index`, `forced` and
    `n_completion_tokens` (and the caller's `extra`). Arguments as `record_from_scores`."""
    facts = {"decision_index": generation.decision.index, "forced": generation.forced,
             "n_completion_tokens": len(generation.completion_ids)}
    return _record(example, generation.option_probs, tokens,
                   emitted_option=generation.decision.option if generation.valid else -1,
                   emitted_token=generation.emitted_token, top_token=generation.top_token,
                   top_token_id=generation.top_token_id, run=run, completion=generation.completion, seconds=seconds,
                   extra={**facts, **(extra or {})})


def score_records(engine, prepared: Sequence[PreparedPrompt], *, run: RunFields, reasoning: bool,
                  temperature: float = 0.0, max_new_tokens: int = 256, seed: int | Sequence[int] = 0,
                  marker: str = END_OF_REASONING, decision_after_whitespace: bool = False) -> list[PredictionRecord]:
    """Score prepared prompts in one engine call and build one record each, in order.

    Args:
        engine: a `decal.engines.Engine`.
        prepared: from `prepare_prompts`.
        run: the run's fields.
        reasoning: generate and decide after the marker; else read the position after the prompt.
        temperature, max_new_tokens, marker: reasoning mode's generation settings.
        seed: the call's seed, or one per prompt (`Engine.generate`).
        decision_after_whitespace: non-reasoning only: read at the first generated token that is
            not whitespace (module docstring).
    """
    start = time.perf_counter()
    sequences, tokens = [p.ids for p in prepared], [p.tokens for p in prepared]
    if not reasoning and decision_after_whitespace:
        return _records_after_whitespace(engine, prepared, run=run, start=start)
    if not reasoning:
        scores = engine.score(sequences, tokens, batch_size=len(sequences))
        seconds = (time.perf_counter() - start) / max(1, len(prepared))
        return [record_from_scores(p.example, s, p.tokens, run=run, seconds=seconds)
                for p, s in zip(prepared, scores, strict=True)]
    rollouts = engine.generate(sequences, tokens, num_samples=1, temperature=temperature, max_new_tokens=max_new_tokens,
                               seed=seed, batch_size=len(sequences), marker=marker)
    seconds = (time.perf_counter() - start) / max(1, len(prepared))
    return [record_from_generation(p.example, g, p.tokens, run=run, seconds=seconds)
            for p, (g,) in zip(prepared, rollouts, strict=True)]


def _records_after_whitespace(engine, prepared: Sequence[PreparedPrompt], *, run: RunFields,
                              start: float) -> list[PredictionRecord]:
    """Non-reasoning records read at the first generated token that is not whitespace (module docstring)."""
    rollouts = engine.generate([p.ids for p in prepared], [p.tokens for p in prepared], num_samples=1, temperature=0.0,
                               max_new_tokens=LEADING_WHITESPACE_BUDGET, seed=0, batch_size=len(prepared), marker="")
    seconds = (time.perf_counter() - start) / max(1, len(prepared))
    # A forced read sits after the whole budget (`Decision.index` is -1 there).
    return [record_from_generation(p.example, g, p.tokens, run=run, seconds=seconds,
                                   extra={"decision_index": len(g.completion_ids) if g.forced else g.decision.index})
            for p, (g,) in zip(prepared, rollouts, strict=True)]


def record_row(record: PredictionRecord, **extras) -> dict:
    """An analysis row: the record's fields flat, its `extra` fields and `extras` beside them
    (rollouts and swaps keep their own fields on top of the record's)."""
    row = record.as_dict()
    extra = row.pop("extra")
    return {**row, **extra, **extras}
