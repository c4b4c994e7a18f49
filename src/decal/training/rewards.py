"""Verifiable rewards for GRPO: 1 when the decision parsed from a completion equals the gold label.

The decision is parsed by `decal.decision.find_decision`, the same function evaluation uses
(issue #5 item 3), so training rewards and evaluation accuracy can never disagree on what a
completion decided. A completion with no valid decision (no end-of-reasoning marker, nothing
after it, a token that is not an option's decision token, or truncated before the decision)
gets reward 0.
"""

from __future__ import annotations

from typing import Sequence

from ..decision import END_OF_REASONING, Decision, DecisionTokens, find_decision, stop_token_ids

__all__ = ["decision_reward", "parse_decision", "stop_token_ids", "DecisionReward"]


def parse_decision(
    completion_ids: Sequence[int],
    tokenizer,
    decision_tokens: DecisionTokens,
    *,
    reasoning: bool,
    stop_ids: Sequence[int] | None = None,
) -> Decision:
    """Where the decision sits in a completion and which option it emitted (`find_decision`).

    Args:
        completion_ids: generated token ids (T,), without the prompt.
        tokenizer: the tokenizer that produced them.
        decision_tokens: from `decal.decision.option_token_ids`.
        reasoning: True when the completion reasons first and decides after ``</think>``; False
            when the first generated token is the decision.
        stop_ids: ids that end the completion; default EOS and padding of `tokenizer`.
    """
    stops = stop_token_ids(tokenizer) if stop_ids is None else list(stop_ids)
    marker = END_OF_REASONING if reasoning else None
    return find_decision(completion_ids, tokenizer, decision_tokens, marker=marker, stop_ids=stops)


def _gold_index(gold, decision_tokens: DecisionTokens) -> int:
    if isinstance(gold, str):
        if gold not in decision_tokens.labels:
            raise ValueError(f"gold label {gold!r} is not one of the options {list(decision_tokens.labels)}")
        return decision_tokens.labels.index(gold)
    index = int(gold)
    if not 0 <= index < len(decision_tokens.labels):
        raise ValueError(f"gold option index must be in [0, {len(decision_tokens.labels)}); got {gold!r}")
    return index


def decision_reward(
    completion_ids: Sequence[int],
    gold,
    tokenizer,
    decision_tokens: DecisionTokens,
    *,
    reasoning: bool,
    stop_ids: Sequence[int] | None = None,
) -> float:
    """1.0 when the completion's valid decision equals the gold label, else 0.0.

    Args:
        completion_ids: generated token ids (T,), without the prompt.
        gold: the gold label (a string among `decision_tokens.labels`) or its option index.
        tokenizer, decision_tokens, reasoning, stop_ids: as in `parse_decision`.

    Raises:
        ValueError: `gold` is not one of the options.
    """
    target = _gold_index(gold, decision_tokens)
    decision = parse_decision(completion_ids, tokenizer, decision_tokens, reasoning=reasoning, stop_ids=stop_ids)
    return 1.0 if decision.valid and decision.option == target else 0.0


class DecisionReward:
    """A TRL reward function (``reward_funcs=[DecisionReward(...)]``) built on `decision_reward`.

    TRL calls it with the local generation batch: ``completion_ids`` (a list of id lists) and
    the dataset's columns, of which it reads ``label`` and, when present, ``option_token_ids``
    (each row's decision token ids, `decal.training.grpo.grpo_dataset`; else every row uses
    `decision_tokens`). It keeps the parsed decisions of the last call in `last_decisions`, the
    gold option indices in `last_gold` and each row's decision token ids in `last_option_ids`, so
    the trainer reuses them for advantages, CE targets and logging instead of parsing every
    completion twice.
    """

    __name__ = "decision_reward"  # TRL names the reward's log keys after it

    def __init__(self, tokenizer, decision_tokens: DecisionTokens, *, reasoning: bool, stop_ids: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.decision_tokens = decision_tokens
        self.reasoning = reasoning
        self.stop_ids = stop_token_ids(tokenizer) if stop_ids is None else list(stop_ids)
        self.last_decisions: list[Decision] = []
        self.last_gold: list[int] = []
        self.last_option_ids: list[list[int]] = []

    def _row_tokens(self, option_token_ids, n: int) -> list[DecisionTokens]:
        if option_token_ids is None:
            return [self.decision_tokens] * n
        if len(option_token_ids) != n:
            raise ValueError(f"`option_token_ids` has {len(option_token_ids)} rows for {n} completions")
        base = self.decision_tokens
        return [base if tuple(ids) == base.token_ids else DecisionTokens(
            labels=base.labels, token_ids=tuple(int(i) for i in ids),
            tokens=tuple(self.tokenizer.convert_ids_to_tokens([int(i) for i in ids]))) for ids in option_token_ids]

    def __call__(self, prompts=None, completions=None, completion_ids=None, label=None, option_token_ids=None,
                 **kwargs) -> list[float]:
        if completion_ids is None or label is None:
            raise ValueError("DecisionReward needs `completion_ids` and the dataset column `label`")
        gold = [_gold_index(g, self.decision_tokens) for g in label]
        rows = self._row_tokens(option_token_ids, len(completion_ids))
        decisions = [
            parse_decision(ids, self.tokenizer, tokens, reasoning=self.reasoning, stop_ids=self.stop_ids)
            for ids, tokens in zip(completion_ids, rows, strict=True)
        ]
        self.last_decisions, self.last_gold = decisions, gold
        self.last_option_ids = [list(t.token_ids) for t in rows]
        return [1.0 if d.valid and d.option == g else 0.0 for d, g in zip(decisions, gold)]
