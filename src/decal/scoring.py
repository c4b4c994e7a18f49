"""Scoring: the option distribution at the decision position, without and with reasoning, on an engine.

- Non-reasoning (`score_prompts`, `score_token_ids`): the option distribution at the first
  position after each prompt; the prediction is the constrained argmax over the options, and
  the unconstrained top token is recorded as well.
- Reasoning (`generate_decisions`, `generate_token_ids`): generation (greedy or sampled), the
  decision found by `decal.decision` on the generated ids, and the option distribution read at
  that position. A completion that never reaches a decision gets the forced decision
  (docs/design.md, "Forced decision": marker and newline appended); `valid=False`.

The work is done by an inference engine (`decal.engines`): `model` may be an `Engine` (hf or
vllm), or a transformers model with its tokenizer, which runs on the `hf` engine.

`option_probs[k]` is always the full-vocabulary probability of option k's decision token at
temperature 1 (no renormalisation), whatever the sampling temperature.
"""

from __future__ import annotations

import logging
from typing import Sequence

from .decision import END_OF_REASONING
from .engines import as_engine
from .engines.base import GeneratedDecision, OptionScores, length_sorted_batches
from .engines.hf import context_length, generation_config, pad_left

__all__ = [
    "OptionScores",
    "GeneratedDecision",
    "context_length",
    "length_sorted_batches",
    "pad_left",
    "score_prompts",
    "score_token_ids",
    "encode_prompts",
    "generation_config",
    "generate_decisions",
    "generate_token_ids",
]

logger = logging.getLogger(__name__)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of full prompt texts, as every scorer here encodes them."""
    # The chat template already holds BOS/role tokens; adding special tokens would double them.
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def score_token_ids(
    model, tokenizer, sequences: Sequence[Sequence[int]], decision_tokens, *, batch_size: int = 8
) -> list[OptionScores]:
    """Like `score_prompts`, on token id lists (the decision position is the one after each list)."""
    return as_engine(model, tokenizer).score(sequences, decision_tokens, batch_size=batch_size)


def score_prompts(
    model, tokenizer, prompts: Sequence[str], decision_tokens, *, batch_size: int = 8
) -> list[OptionScores]:
    """Non-reasoning scoring: the option distribution at the first position after each prompt.

    Args:
        model: an `Engine`, or a causal LM in eval mode (run on the hf engine).
        tokenizer: its tokenizer; prompts are encoded without adding special tokens (the chat
            template already has them). None with an `Engine` (its own tokenizer is used).
        prompts: (N,) full prompt texts (e.g. from `decal.tasks.prompts.render_chat`), or
            prompt + reasoning + marker texts to decide after the marker.
        decision_tokens: one `DecisionTokens` for all prompts, or one per prompt.
        batch_size: prompts per forward pass; batches are grouped by length.

    Returns:
        (N,) `OptionScores`, in the order of `prompts`.

    Raises:
        ValueError: a prompt longer than the model's context.
    """
    engine = as_engine(model, tokenizer)
    sequences = encode_prompts(engine.tokenizer, prompts)
    engine.check_prompt_lengths([len(s) for s in sequences], reserve=1)
    return engine.score(sequences, decision_tokens, batch_size=batch_size)


def generate_decisions(
    model,
    tokenizer,
    prompts: Sequence[str],
    decision_tokens,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    marker: str | None = END_OF_REASONING,
) -> list[list[GeneratedDecision]]:
    """Reasoning scoring: generate, find the decision, and read the option distribution there.

    Args:
        model: an `Engine`, or a causal LM in eval mode whose output head runs once per
            generated token (run on the hf engine).
        tokenizer: its tokenizer (left padding); None with an `Engine`.
        prompts: (N,) full prompt texts.
        decision_tokens: one `DecisionTokens` for all prompts, or one per prompt, computed in the
            context after the marker (`decal.tasks.prompts.decision_context(..., reasoning=True)`).
        num_samples: rollouts per prompt.
        temperature: 0 is greedy; above 0 samples from the full distribution at that temperature.
        max_new_tokens: generation budget; a completion cut off before its decision is forced.
        seed: the seed of this call's sampling (hf: torch's global generator, seeded once
            before the first batch).
        batch_size: sequences generated together (prompts per batch = batch_size // num_samples,
            at least 1); prompts are grouped by length.
        marker: the end-of-reasoning marker; None makes the first generated token the decision.

    Returns:
        For each prompt, its `num_samples` `GeneratedDecision`s.

    Raises:
        ValueError: a prompt plus `max_new_tokens` longer than the model's context; bad settings.
    """
    engine = as_engine(model, tokenizer)
    return generate_token_ids(
        engine, None, encode_prompts(engine.tokenizer, prompts), decision_tokens, num_samples=num_samples,
        temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, marker=marker,
    )


def generate_token_ids(
    model,
    tokenizer,
    sequences: Sequence[Sequence[int]],
    decision_tokens,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    marker: str | None = END_OF_REASONING,
) -> list[list[GeneratedDecision]]:
    """Like `generate_decisions`, on prompts already tokenized (lists of token ids)."""
    return as_engine(model, tokenizer).generate(
        sequences, decision_tokens, num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
        seed=seed, batch_size=batch_size, marker=marker,
    )
