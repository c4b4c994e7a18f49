"""The `hf` engine: transformers' forward pass and `generate`, in this process.

- `score`: one batched forward pass per batch, left padding, batches grouped by length, logits
  for the last position only. The prediction is the constrained argmax over the options, and the
  unconstrained top token is recorded as well.
- `generate`: transformers' `generate` (greedy or sampled). A forward hook on the output head
  keeps, at every generation step, the full-vocabulary temperature-1 log-probability of each
  option's decision token, so the distribution at the decision position comes from the
  generation itself, with no second forward pass. A completion that never reaches a decision
  gets the forced decision (docs/design.md, "Forced decision"): the marker and a newline are appended and one batched
  forward pass over just those completions, reusing the generation's KV cache, reads the option
  distribution; `valid=False`.

Sampling seeds torch's global generator with the call's seed before the first batch, so the
same call gives the same completions.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from ..decision import END_OF_REASONING, stop_token_ids
from .base import (
    Engine,
    GeneratedDecision,
    OptionScores,
    decide,
    forced_suffix_ids,
    length_sorted_batches,
    tokens_per_prompt,
)
from .registry import Capabilities, EngineKind

__all__ = ["KIND", "HFEngine", "load_hf_engine", "context_length", "pad_left", "generation_config"]

logger = logging.getLogger(__name__)


def context_length(model) -> int | None:
    """The model's maximum sequence length, from its config (None when it states none)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


class _OptionCapture:
    """Forward hook on the output head: per call, option log-probs (B, K) and the argmax token (B,)
    at the last position.

    The log-softmax runs on the raw head output in float32, at temperature 1 over the full
    vocabulary, so sampling settings (temperature, top-k) do not change what is captured.
    """

    def __init__(self, option_ids):
        self.option_ids = option_ids  # (B, K) long tensor, one row per generated sequence
        self.steps: list = []
        self.top_ids: list = []

    def __call__(self, module, inputs, output):
        import torch

        logits = output[:, -1].float()  # (B, V)
        # log p(option) = logit(option) - logsumexp(logits): gather first, no full softmax copy.
        picked = logits.gather(1, self.option_ids.to(logits.device))  # (B, K)
        self.steps.append((picked - torch.logsumexp(logits, dim=-1, keepdim=True)).cpu())
        self.top_ids.append(logits.argmax(dim=-1).cpu())  # (B,)
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

    Returns new ids (R, S), captured option log-probs (R, S, K), the argmax token at every step
    (R, S), and, with `keep_cache`, the state a forced decision needs: (past key values, prompt
    attention mask (R, P)).
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
    return new_ids, torch.stack(capture.steps, dim=1), torch.stack(capture.top_ids, dim=1), state  # (R, S), (R, S, K), (R, S)


def _cache_keyword(model) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` in forward(); accept both.
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forced_from_cache(model, state, new_ids, lengths, suffixes, option_ids, captured, captured_top, pad_id):
    """Option log-probs (R, K) and the argmax token (R,) after each forced row's completion + suffix,
    reusing the generation cache.

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
    at = torch.as_tensor(lengths).clamp(max=width_new - 1)
    result = captured[torch.arange(n_rows), at].clone()  # (R, K)
    top = captured_top[torch.arange(n_rows), at].clone()  # (R,)
    if not any(feeds):
        return result, top  # every forced row stopped right after its marker: step L is its decision
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
    top[fed] = logits.argmax(dim=-1).cpu()[fed]
    return result, top

def _dtype_name(model) -> str:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (StopIteration, AttributeError, TypeError):
        return str(getattr(model, "dtype", "")).removeprefix("torch.")


class HFEngine(Engine):
    """A transformers model (from `decal.models.load_model`, or any causal LM in eval mode) as an engine.

    Args:
        model: a causal LM in eval mode whose output head runs once per generated token.
        tokenizer: its tokenizer (left padding, with a pad token).
        model_name: what the model was loaded from (recorded in run.json).
        adapter: the LoRA adapter attached to or merged into `model`, if any.
        load_options: how to load the model again (`with_adapter`); set by `load_hf_engine`.
    """

    name = "hf"

    def __init__(self, model, tokenizer, *, model_name: str = "", adapter: str | None = None,
                 load_options: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapter = None if adapter is None else str(adapter)
        self.dtype = _dtype_name(model)
        self.dtype_reason = getattr(getattr(model, "decal_dtype", None), "reason", None)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self._load_options = dict(load_options or {})

    def context_length(self) -> int | None:
        return context_length(self.model)

    def info(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            engine_version = f"transformers {version('transformers')}"
        except PackageNotFoundError:
            engine_version = None
        return {"engine": "hf", "engine_version": engine_version, "engine_options": {}}

    def with_adapter(self, adapter: str | None) -> "HFEngine":
        if (None if adapter is None else str(adapter)) == self.adapter:
            return self
        if not self._load_options:
            raise ValueError("this hf engine wraps a model object; build it with decal.engines.build_engine to switch adapters")
        return load_hf_engine(self.model_name, adapter=adapter, **self._load_options)

    def close(self) -> None:
        self.model = None

    def score(self, sequences: Sequence[Sequence[int]], decision_tokens, *, batch_size: int = 8) -> list[OptionScores]:
        import torch

        tokenizer = self.tokenizer
        per_prompt = tokens_per_prompt(decision_tokens, len(sequences))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out: list[OptionScores | None] = [None] * len(sequences)
        for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
            logprobs = _forward_last(self.model, [sequences[i] for i in batch], pad_id)  # (B, V)
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

    def generate(
        self,
        sequences: Sequence[Sequence[int]],
        decision_tokens,
        *,
        num_samples: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] = 0,
        batch_size: int = 8,
        marker: str | None = END_OF_REASONING,
    ) -> list[list[GeneratedDecision]]:
        import torch

        if not isinstance(seed, int):
            seeds = [int(s) for s in seed]
            if len(seeds) != len(sequences):
                raise ValueError(f"`seed` must be one int or one per prompt ({len(sequences)}); got {len(seeds)}")
            per_prompt = tokens_per_prompt(decision_tokens, len(sequences))
            # One global generator: a prompt samples as if alone only when generated alone.
            return [
                self.generate([seq], dt, num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                              seed=s, batch_size=batch_size, marker=marker)[0]
                for seq, dt, s in zip(sequences, per_prompt, seeds)
            ]
        model, tokenizer = self.model, self.tokenizer
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be at least 1; got {num_samples!r}")
        config = generation_config(model, tokenizer, temperature=temperature, max_new_tokens=max_new_tokens)
        sequences = [list(s) for s in sequences]
        lengths = [len(s) for s in sequences]
        self.check_prompt_lengths(lengths, reserve=max_new_tokens)
        per_prompt = tokens_per_prompt(decision_tokens, len(sequences))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stops = self.stop_ids
        torch.manual_seed(seed)
        results: list[list[GeneratedDecision | None]] = [[None] * num_samples for _ in sequences]
        for batch in length_sorted_batches(lengths, max(1, batch_size // num_samples)):
            rows = [(i, s) for i in batch for s in range(num_samples)]
            option_ids = torch.as_tensor([per_prompt[i].token_ids for i, _ in rows], dtype=torch.long)  # (R, K)
            new_ids, option_logprobs, top_ids, state = _generate_batch(
                model, [sequences[i] for i in batch for _ in range(num_samples)], option_ids, config, pad_id,
                keep_cache=True,
            )
            decided = [decide(tokenizer, new_ids[r].tolist(), per_prompt[i], marker, stops) for r, (i, _) in enumerate(rows)]
            suffixes = [None if d.index >= 0 else forced_suffix_ids(tokenizer, text, marker) for ids, text, d in decided]
            if any(x is not None for x in suffixes):
                forced_logprobs, forced_top = _forced_from_cache(
                    model, state, new_ids, [len(ids) for ids, _, _ in decided], suffixes, option_ids, option_logprobs,
                    top_ids, pad_id,
                )
            del state  # the KV cache: free it before the next batch
            for r, ((i, s), (ids, text, decision)) in enumerate(zip(rows, decided)):
                forced = decision.index < 0
                logprobs = forced_logprobs[r] if forced else option_logprobs[r, decision.index]
                top = int(forced_top[r] if forced else top_ids[r, decision.index])
                results[i][s] = GeneratedDecision(
                    completion_ids=ids,
                    completion=text,
                    decision=decision,
                    option_probs=logprobs.exp().tolist(),
                    emitted_token=None if forced else tokenizer.convert_ids_to_tokens(ids[decision.index]),
                    valid=decision.valid,
                    forced=forced,
                    top_token=tokenizer.convert_ids_to_tokens(top),
                    top_token_id=top,
                )
        return results  # type: ignore[return-value]


def load_hf_engine(
    model: str,
    *,
    adapter: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool | None = None,
) -> HFEngine:
    """Load `model` with `decal.models.load_model` as an hf engine.

    The adapter is merged into the weights where that is exact (`merges_adapter_exactly`, float32)
    and attached otherwise.
    """
    from ..models import load_model, merges_adapter_exactly

    net, tokenizer = load_model(
        model, adapter=adapter, merge_adapter=merges_adapter_exactly(dtype), dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, offline=offline,
    )
    options = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code,
               "allow_pickle": allow_pickle, "offline": offline}
    return HFEngine(net, tokenizer, model_name=str(model), adapter=adapter, load_options=options)


def _build(spec) -> HFEngine:
    return load_hf_engine(spec.model, adapter=spec.adapter, dtype=spec.dtype, device=spec.device,
                          trust_remote_code=spec.trust_remote_code, allow_pickle=spec.allow_pickle, offline=spec.offline)


KIND = EngineKind(
    name="hf",
    summary="transformers in this process (default)",
    capabilities=Capabilities(local_forward=True),
    build=_build,
)
