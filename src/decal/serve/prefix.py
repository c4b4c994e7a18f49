"""The prompt prefix every request of a task shares, computed once and reused by every forward pass.

Every prompt of a task starts with the same tokens: the chat template's system turn and the
task's instructions up to the first field (for XSTest on SmolLM2, 111 of about 131 tokens). A
causal model's keys and values for those tokens do not depend on what follows, so they are
computed once (`SharedPrefix.for_task`) and each batch runs only on its suffixes, attending to
the cached prefix: 2-4x less work per request on the CPU (`benchmarks/bench_serve.py`).

`PrefixCachedModel` stands in for the model inside the hf engine (`decal.engines.hf`), whose
scorer calls ``model(input_ids, attention_mask, position_ids, logits_to_keep=1, use_cache=False)``
on left-padded prompts: when every row starts with the shared prefix, the call runs on the
suffixes (left-padded after the prefix) with the prefix cache expanded to the batch (a view, no
copy) and returns the same last-position logits; any other call (other rows, generation, the
forced decision's cached forward) goes to the model unchanged. The engine's scorer, the prepared
prompts and the records (`decal.recording`) are `decal evaluate`'s own, so only the forward pass
differs, by float rounding (max 2e-7 on SmolLM2's option probabilities). `with_shared_prefix` checks this on the
task's first prompts and leaves the engine as it is when it does not hold.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

__all__ = ["SharedPrefix", "PrefixCachedModel", "with_shared_prefix"]

logger = logging.getLogger(__name__)

_MIN_PREFIX = 8  # shorter shared prefixes save too little to be worth a second code path


class SharedPrefix:
    """Token ids of a shared prompt prefix and the model's key/value cache for them (batch 1)."""

    def __init__(self, model, prefix_ids: Sequence[int]):
        import torch

        self.ids = tuple(int(i) for i in prefix_ids)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([self.ids], device=next(model.parameters()).device), use_cache=True)
        self.cache = out.past_key_values

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def common_ids(tokenizer, task) -> list[int]:
        """The token prefix two prompts of `task` with different field texts share, less one token.

        The last shared token is dropped: a byte-pair merge across the boundary could tie it to
        the field's first characters for some inputs. Every batch still checks its rows' ids.
        """
        from ..scoring import encode_prompts
        from ..tasks.prompts import render_chat

        example = task.examples[0]

        def variant(text: str):
            fields = {k: text for k in ("input", "question", "fact") if getattr(example, k) is not None}
            if example.options is not None:
                fields["options"] = tuple(f"{text} {j}" for j in range(len(example.options)))
            return replace(example, **fields)

        prompts = [render_chat(tokenizer, task.user_message(variant(t)), reasoning=task.reasoning) for t in ("x", "7 q")]
        a, b = encode_prompts(tokenizer, prompts)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[: max(0, n - 1)]

    @classmethod
    def for_task(cls, model, tokenizer, task) -> "SharedPrefix | None":
        """The shared prefix of `task`'s prompts, or None when it is short or the model's cache does not fit."""
        ids = cls.common_ids(tokenizer, task)
        if len(ids) < _MIN_PREFIX:
            return None
        prefix = cls(model, ids)
        layers = getattr(prefix.cache, "layers", None)
        # Only plain growing caches: a sliding-window or quantized layer cannot be expanded this way.
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            logger.info("no shared-prefix cache: the model's cache layers are not plain DynamicLayers")
            return None
        return prefix

    def expanded(self, batch_size: int, config):
        """A fresh cache holding the prefix once per row (views of the stored tensors)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys.expand(batch_size, -1, -1, -1), layer.values.expand(batch_size, -1, -1, -1), i)
        return cache


class PrefixCachedModel:
    """The model as `decal.scoring` sees it, with forward passes over shared-prefix prompts cut short.

    Args:
        model: a causal LM in eval mode.
        prefix: its `SharedPrefix` for the served task.
    """

    def __init__(self, model, prefix: SharedPrefix):
        self.model, self.prefix = model, prefix
        self.config = model.config
        self.hits = self.misses = 0

    def parameters(self):
        return self.model.parameters()

    def __getattr__(self, name: str):  # generation_config, generate, get_output_embeddings, ...
        if name == "model":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def _suffix_lengths(self, input_ids, attention_mask) -> list[int] | None:
        """Each row's length after the prefix, or None when some row does not start with it."""
        p = len(self.prefix)
        lengths = attention_mask.sum(dim=1).tolist()
        width = input_ids.shape[1]
        rows = input_ids.tolist()
        out = []
        for row, n in zip(rows, lengths):
            start = width - int(n)
            if n <= p or tuple(row[start : start + p]) != self.prefix.ids:
                return None
            out.append(int(n) - p)
        return out

    def __call__(self, *, input_ids, attention_mask, position_ids=None, logits_to_keep=1, use_cache=False, **kwargs):
        import torch

        suffix_lengths = None if kwargs else self._suffix_lengths(input_ids, attention_mask)
        if suffix_lengths is None:
            self.misses += 1
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep, use_cache=use_cache, **kwargs)
        self.hits += 1
        p, width = len(self.prefix), max(suffix_lengths)
        batch = input_ids.shape[0]
        # Rows are left-padded, so each suffix ends the row: the last `width` columns hold every
        # suffix, with padding or prefix tokens before the shorter ones, masked out here.
        suffix_ids = input_ids[:, -width:]  # (B, S)
        starts = torch.tensor([width - n for n in suffix_lengths], device=input_ids.device)[:, None]
        suffix_mask = (torch.arange(width, device=input_ids.device)[None, :] >= starts).long()  # (B, S)
        mask = torch.cat([torch.ones(batch, p, dtype=torch.long, device=input_ids.device), suffix_mask], dim=1)  # (B, P+S)
        positions = p + (suffix_mask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
        return self.model(
            input_ids=suffix_ids, attention_mask=mask, position_ids=positions,
            past_key_values=self.prefix.expanded(batch, self.config), use_cache=True, logits_to_keep=logits_to_keep,
        )


def with_shared_prefix(engine, task, *, tolerance: float = 1e-5):
    """An hf engine for `task` whose forward passes reuse the shared prompt prefix, or `engine` itself.

    The cached engine must score the task's first four prompts (one batch) as `engine` does, to
    `tolerance`; otherwise, or when the prefix is short or the cache cannot be shared, `engine`
    is returned unchanged.
    """
    from ..engines.hf import HFEngine
    from ..recording import prepare_prompts

    prefix = SharedPrefix.for_task(engine.model, engine.tokenizer, task)
    if prefix is None:
        return engine
    wrapped = PrefixCachedModel(engine.model, prefix)
    cached = HFEngine(wrapped, engine.tokenizer, model_name=engine.model_name, adapter=engine.adapter)
    prepared = prepare_prompts(engine.tokenizer, replace(task, reasoning=False), task.examples[:4])
    sequences, tokens = [p.ids for p in prepared], [p.tokens for p in prepared]
    plain = engine.score(sequences, tokens, batch_size=len(sequences))
    fast = cached.score(sequences, tokens, batch_size=len(sequences))
    diff = max(abs(a - b) for x, y in zip(plain, fast) for a, b in zip(x.option_probs, y.option_probs))
    if wrapped.hits != 1 or diff > tolerance:
        logger.warning("shared-prefix cache off: it changed option probabilities by %.3g (hits %d)", diff, wrapped.hits)
        return engine
    cached.shared_prefix_tokens = len(prefix)
    logger.info("shared-prefix cache on: %d prompt tokens computed once (max difference %.2g)", len(prefix), diff)
    return cached
