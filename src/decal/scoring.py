"""Scoring: the option distribution at the decision position, without and with reasoning.

- Non-reasoning (`score_prompts`): one batched forward pass per batch, left padding, batches
  grouped by length, logits for the last position only. The option distribution is read at the
  first position after the prompt; the prediction is the constrained argmax over the options,
  and the unconstrained top token is recorded as well.
- Reasoning (`generate_decisions`): generation (greedy or sampled). A forward hook on the
  output head keeps, at every generation step, the full-vocabulary temperature-1 log-probability
  of each option's decision token, so the distribution at the decision position comes from the
  generation itself, with no second forward pass. A completion that never reaches a decision
  gets the forced decision of DESIGN.md: the marker and a newline are appended and one batched
  forward pass over just those completions reads the option distribution; `valid=False`.

`option_probs[k]` is always the full-vocabulary probability of option k's decision token at
temperature 1 (no renormalisation), whatever the sampling temperature.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from .decision import END_OF_REASONING, Decision, DecisionTokens, find_decision, forced_decision_suffix, stop_token_ids

__all__ = [
    "OptionScores",
    "GeneratedDecision",
    "context_length",
    "check_prompt_lengths",
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


@dataclass(frozen=True)
class OptionScores:
    """The distribution at a decision position (non-reasoning scoring).

    option_probs: (K,) full-vocabulary probabilities of the options' decision tokens.
    top_token, top_token_id: the unconstrained argmax token there.
    top_is_option: whether that token is one of the options' decision tokens.
    """

    option_probs: list[float]
    top_token: str
    top_token_id: int
    top_is_option: bool


@dataclass(frozen=True)
class GeneratedDecision:
    """One reasoning rollout and its decision.

    completion_ids: generated ids, cut at the first stop token (EOS/padding).
    completion: their text (special tokens kept, so `</think>` shows in Qwen3).
    decision: where the decision sits in `completion_ids` (`Decision.index == -1` if nowhere).
    option_probs: (K,) at the decision position, or at the forced decision when `forced`.
    emitted_token: the token emitted at the decision position, None when forced.
    valid: a decision position exists and its token is an option's decision token.
    forced: no decision position; `option_probs` come from appending the marker.
    """

    completion_ids: list[int]
    completion: str
    decision: Decision
    option_probs: list[float]
    emitted_token: str | None
    valid: bool
    forced: bool


def context_length(model) -> int | None:
    """The model's maximum sequence length, from its config (None when it states none)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(model, lengths: Sequence[int], *, reserve: int = 1, names: Sequence[str] | None = None) -> None:
    """Raise ValueError if a prompt of `lengths` tokens plus `reserve` new tokens exceeds the context.

    `names` (one per prompt, e.g. example ids) goes into the message.
    """
    limit = context_length(model)
    if limit is None:
        return
    for i, n in enumerate(lengths):
        if n + reserve > limit:
            what = f"example {names[i]!r}" if names is not None else f"prompt {i}"
            raise ValueError(
                f"{what} has {n} tokens, plus {reserve} to generate, which exceeds the model's context of "
                f"{limit} tokens; shorten the prompt or lower --max-new-tokens"
            )


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so the peak memory shows early).

    The sort is stable, so equal lengths keep their order and the batches are deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1; got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, *, device="cpu"):
    """Left-pad token id lists into `input_ids` (B, T) and `attention_mask` (B, T) tensors."""
    import torch

    width = max(len(s) for s in sequences)
    # One tensor from padded Python lists: far fewer small allocations than row-wise copies.
    input_ids = torch.tensor([[int(pad_id)] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)
    return input_ids.to(device), attention_mask.to(device)


def _model_device(model):
    return next(model.parameters()).device


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of full prompt texts, as every scorer here encodes them."""
    # The chat template already holds BOS/role tokens; adding special tokens would double them.
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def _token_ids_per_prompt(decision_tokens, n: int) -> list[DecisionTokens]:
    if isinstance(decision_tokens, DecisionTokens):
        return [decision_tokens] * n
    decision_tokens = list(decision_tokens)
    if len(decision_tokens) != n:
        raise ValueError(f"`decision_tokens` must be one DecisionTokens or one per prompt ({n}); got {len(decision_tokens)}")
    return decision_tokens


def _forward_last(model, sequences: Sequence[Sequence[int]], pad_id: int):
    """Float32 log-probabilities (B, V) at the position after each sequence; one forward pass."""
    import torch

    input_ids, attention_mask = pad_left(sequences, pad_id, device=_model_device(model))
    # Left padding: position ids count from each row's first real token.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1, use_cache=False
        ).logits  # (B, 1, V)
    return torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)


def score_token_ids(
    model, tokenizer, sequences: Sequence[Sequence[int]], decision_tokens, *, batch_size: int = 8
) -> list[OptionScores]:
    """Like `score_prompts`, on token id lists (the decision position is the one after each list)."""
    import torch

    per_prompt = _token_ids_per_prompt(decision_tokens, len(sequences))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[OptionScores | None] = [None] * len(sequences)
    for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
        logprobs = _forward_last(model, [sequences[i] for i in batch], pad_id)  # (B, V)
        option_ids = torch.tensor([per_prompt[i].token_ids for i in batch], device=logprobs.device)  # (B, K)
        option_probs = logprobs.gather(1, option_ids).exp().tolist()  # (B, K)
        top_ids = logprobs.argmax(dim=-1).tolist()  # (B,)
        for row, i in enumerate(batch):
            top = int(top_ids[row])
            out[i] = OptionScores(
                option_probs=[float(p) for p in option_probs[row]],
                top_token=tokenizer.convert_ids_to_tokens(top),
                top_token_id=top,
                top_is_option=top in per_prompt[i].token_ids,
            )
    return out  # type: ignore[return-value]


def score_prompts(
    model, tokenizer, prompts: Sequence[str], decision_tokens, *, batch_size: int = 8
) -> list[OptionScores]:
    """Non-reasoning scoring: the option distribution at the first position after each prompt.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer; prompts are encoded without adding special tokens (the chat
            template already has them).
        prompts: (N,) full prompt texts (e.g. from `decal.tasks.prompts.render_chat`), or
            prompt + reasoning + marker texts to decide after the marker.
        decision_tokens: one `DecisionTokens` for all prompts, or one per prompt.
        batch_size: prompts per forward pass; batches are grouped by length.

    Returns:
        (N,) `OptionScores`, in the order of `prompts`.

    Raises:
        ValueError: a prompt longer than the model's context.
    """
    sequences = encode_prompts(tokenizer, prompts)
    check_prompt_lengths(model, [len(s) for s in sequences], reserve=1)
    return score_token_ids(model, tokenizer, sequences, decision_tokens, batch_size=batch_size)


class _OptionCapture:
    """Forward hook on the output head: per call, option log-probs (B, K) at the last position.

    The log-softmax runs on the raw head output in float32, at temperature 1 over the full
    vocabulary, so sampling settings (temperature, top-k) do not change what is captured.
    """

    def __init__(self, option_ids):
        self.option_ids = option_ids  # (B, K) long tensor, one row per generated sequence
        self.steps: list = []

    def __call__(self, module, inputs, output):
        import torch

        logits = output[:, -1].float()  # (B, V)
        # log p(option) = logit(option) - logsumexp(logits): gather first, no full softmax copy.
        picked = logits.gather(1, self.option_ids.to(logits.device))  # (B, K)
        self.steps.append((picked - torch.logsumexp(logits, dim=-1, keepdim=True)).cpu())
        return None


@contextmanager
def _capture_options(model, option_ids) -> Iterator[_OptionCapture]:
    capture = _OptionCapture(option_ids)
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(capture)
    try:
        yield capture
    finally:
        handle.remove()


def generation_config(model, tokenizer, *, temperature: float, max_new_tokens: int):
    """The `GenerationConfig` decal samples with: full-vocabulary sampling (no top-k/top-p) or greedy.

    Benchmarks pass the same object to a bare `model.generate` so the two do the same work.
    """
    from transformers import GenerationConfig

    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 is greedy); got {temperature!r}")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1; got {max_new_tokens!r}")
    sample = temperature > 0
    return GenerationConfig(
        do_sample=sample,
        temperature=float(temperature) if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
    )


def _generate_batch(model, sequences, option_ids, config, pad_id, *, keep_cache: bool = False):
    """Generate for one batch.

    Returns new ids (R, S), captured option log-probs (R, S, K), and, with `keep_cache`, the
    state a forced decision needs: (past key values, prompt attention mask (R, P)).
    """
    import torch

    input_ids, attention_mask = pad_left(sequences, pad_id, device=_model_device(model))
    with _capture_options(model, option_ids) as capture, torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            return_dict_in_generate=True,
        )
    new_ids = out.sequences[:, input_ids.shape[1] :].cpu()  # (R, S)
    # One head call per generated token: call s gives the distribution that produced token s.
    if len(capture.steps) != new_ids.shape[1]:
        raise RuntimeError(
            f"captured {len(capture.steps)} head calls for {new_ids.shape[1]} generated tokens; "
            f"this model's generate does not call its output head once per token"
        )
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    state = (cache, attention_mask) if keep_cache else None
    return new_ids, torch.stack(capture.steps, dim=1), state  # (R, S), (R, S, K)


def _cache_keyword(model) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` in forward(); accept both.
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forced_from_cache(model, state, new_ids, lengths, suffixes, option_ids, captured, pad_id):
    """Option log-probs (R, K) after each forced row's completion + suffix, reusing the generation cache.

    The cache holds the prompt and all generated tokens but the last. Each row feeds what is
    missing (its last token if it was cut by the budget, then the suffix); positions after a
    row's stop token are masked, so the result equals a forward pass over prompt + completion +
    suffix alone (checked against teacher forcing in the tests). Rows in `suffixes` set to None
    are not forced and get a masked dummy feed.
    """
    import torch

    cache, prompt_mask = state
    n_rows, width_new = new_ids.shape
    feeds, starts = [], []
    for r in range(n_rows):
        if suffixes[r] is None:
            feeds.append([])
        else:
            feeds.append(new_ids[r, width_new - 1 : lengths[r]].tolist() + list(suffixes[r]))
        starts.append(int(prompt_mask[r].sum()) + min(lengths[r], width_new - 1))
    result = captured[torch.arange(n_rows), torch.as_tensor(lengths).clamp(max=width_new - 1)].clone()  # (R, K)
    if not any(feeds):
        return result  # every forced row stopped right after its marker: step L is its decision
    width = max(len(f) for f in feeds)
    device = prompt_mask.device
    feed_ids, feed_mask = pad_left([f if f else [pad_id] for f in feeds], pad_id, device=device)
    feed_mask[[r for r, f in enumerate(feeds) if not f]] = 0
    feed_ids, feed_mask = feed_ids[:, -width:], feed_mask[:, -width:]
    generated_mask = (torch.arange(width_new - 1) < torch.as_tensor(lengths)[:, None]).long().to(device)  # (R, S-1)
    offsets = (feed_mask.cumsum(-1) - 1).clamp(min=0)
    position_ids = torch.as_tensor(starts, device=device)[:, None] + offsets  # (R, W)
    with torch.inference_mode():
        logits = model(
            input_ids=feed_ids,
            attention_mask=torch.cat([prompt_mask, generated_mask, feed_mask], dim=-1),
            position_ids=position_ids,
            **{_cache_keyword(model): cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1].float()  # (R, V)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, option_ids.to(logits.device)).cpu()  # (R, K)
    fed = torch.as_tensor([bool(f) for f in feeds])
    result[fed] = logprobs[fed]
    return result


def _forced_suffix_ids(tokenizer, completion: str, marker: str | None) -> list[int]:
    suffix = forced_decision_suffix(completion, marker)
    return list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else []


def _decide(tokenizer, new_ids: list[int], decision_tokens: DecisionTokens, marker, stops):
    """(completion ids cut at the first stop token, its text, its `Decision`)."""
    decision = find_decision(new_ids, tokenizer, decision_tokens, marker=marker, stop_ids=stops)
    end = next((j for j, t in enumerate(new_ids) if t in stops), len(new_ids))
    return new_ids[:end], tokenizer.decode(new_ids[:end], skip_special_tokens=False), decision


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
        model: a causal LM in eval mode whose output head runs once per generated token.
        tokenizer: its tokenizer (left padding).
        prompts: (N,) full prompt texts.
        decision_tokens: one `DecisionTokens` for all prompts, or one per prompt, computed in the
            context after the marker (`decal.tasks.prompts.decision_context(..., reasoning=True)`).
        num_samples: rollouts per prompt.
        temperature: 0 is greedy; above 0 samples from the full distribution at that temperature.
        max_new_tokens: generation budget; a completion cut off before its decision is forced.
        seed: seeds torch's global generator once, before the first batch.
        batch_size: sequences generated together (prompts per batch = batch_size // num_samples,
            at least 1); prompts are grouped by length.
        marker: the end-of-reasoning marker; None makes the first generated token the decision.

    Returns:
        For each prompt, its `num_samples` `GeneratedDecision`s.

    Raises:
        ValueError: a prompt plus `max_new_tokens` longer than the model's context; bad settings.
    """
    return generate_token_ids(
        model,
        tokenizer,
        encode_prompts(tokenizer, prompts),
        decision_tokens,
        num_samples=num_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        marker=marker,
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
    import torch

    if num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1; got {num_samples!r}")
    config = generation_config(model, tokenizer, temperature=temperature, max_new_tokens=max_new_tokens)
    sequences = [list(s) for s in sequences]
    lengths = [len(s) for s in sequences]
    check_prompt_lengths(model, lengths, reserve=max_new_tokens)
    per_prompt = _token_ids_per_prompt(decision_tokens, len(sequences))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer, model)
    torch.manual_seed(seed)
    results: list[list[GeneratedDecision | None]] = [[None] * num_samples for _ in sequences]
    for batch in length_sorted_batches(lengths, max(1, batch_size // num_samples)):
        rows = [(i, s) for i in batch for s in range(num_samples)]
        option_ids = torch.as_tensor([per_prompt[i].token_ids for i, _ in rows], dtype=torch.long)  # (R, K)
        new_ids, option_logprobs, state = _generate_batch(
            model, [sequences[i] for i in batch for _ in range(num_samples)], option_ids, config, pad_id, keep_cache=True
        )
        decided = [_decide(tokenizer, new_ids[r].tolist(), per_prompt[i], marker, stops) for r, (i, _) in enumerate(rows)]
        suffixes = [None if d.index >= 0 else _forced_suffix_ids(tokenizer, text, marker) for ids, text, d in decided]
        if any(x is not None for x in suffixes):
            forced_logprobs = _forced_from_cache(
                model, state, new_ids, [len(ids) for ids, _, _ in decided], suffixes, option_ids, option_logprobs, pad_id
            )
        del state  # the KV cache: free it before the next batch
        for r, ((i, s), (ids, text, decision)) in enumerate(zip(rows, decided)):
            forced = decision.index < 0
            logprobs = forced_logprobs[r] if forced else option_logprobs[r, decision.index]
            results[i][s] = GeneratedDecision(
                completion_ids=ids,
                completion=text,
                decision=decision,
                option_probs=logprobs.exp().tolist(),
                emitted_token=None if forced else tokenizer.convert_ids_to_tokens(ids[decision.index]),
                valid=decision.valid,
                forced=forced,
            )
    return results  # type: ignore[return-value]
