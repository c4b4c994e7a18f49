"""The seam between `decal serve` and the code that runs the model.

`decal serve` needs three things from an engine: its tokenizer, a check of prompt lengths
against the model's context, and one call that turns a batch of tokenized examples into the
prediction records `decal evaluate` would write for them. `HFEngine` provides them on the
transformers path by calling `decal.evaluation`'s per-batch scorer, the very code `decal
evaluate` runs, so a served answer and an evaluated record come from one implementation.

`load_engine` picks the engine by name. Only "hf" exists on this branch; "vllm" waits for the
`decal.engines` package (DESIGN.md, "Inference engines"), and asking for it says so.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

from ..decision import DecisionTokens
from ..errors import ConfigError
from ..records import PredictionRecord
from ..tasks.schema import DecisionExample, Task

__all__ = ["ServeEngine", "HFEngine", "ENGINES", "check_engine", "load_engine"]

ENGINES = ("hf",)  # the engines this install can serve on

logger = logging.getLogger(__name__)


class ServeEngine(Protocol):
    """What the server calls; one instance per process, used from one worker thread.

    name: "hf" or "vllm". batches_itself: True when the engine schedules concurrent requests
    on its own (vLLM's continuous batching), so the server hands requests over as they come.
    """

    name: str
    batches_itself: bool
    tokenizer: object

    def prepare(self, task: Task) -> None:
        """Get ready to serve `task` (e.g. cache its shared prompt prefix)."""

    def describe(self) -> dict:
        """What GET /v1/info shows about the engine once loaded."""

    def check_lengths(self, lengths: Sequence[int], *, reserve: int, names: Sequence[str]) -> None:
        """Raise ValueError naming the first prompt whose length plus `reserve` exceeds the context."""

    def decide(
        self, task: Task, examples: Sequence[DecisionExample], sequences: Sequence[Sequence[int]],
        tokens: Sequence[DecisionTokens], *, settings: dict,
    ) -> list[PredictionRecord]:
        """The records `decal evaluate` writes for these examples, in their order."""


class HFEngine:
    """transformers forward passes and generation through `decal.scoring`, batched by the server's queue.

    Non-reasoning scoring runs on `PrefixCachedModel` once `prepare` has found the task's shared
    prompt prefix (`decal.serve.prefix`), unless `prefix_cache` is False.
    """

    name = "hf"
    batches_itself = False

    def __init__(self, model, tokenizer, *, prefix_cache: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.prefix_cache = prefix_cache
        self.scoring_model = model  # what the non-reasoning scorer calls
        self.prefix_tokens = 0

    def prepare(self, task: Task) -> None:
        """Cache the task's shared prompt prefix, if it scores the task's first prompts as the plain model does."""
        from ..decision import option_token_ids
        from ..scoring import encode_prompts, score_token_ids
        from ..tasks.prompts import decision_context, render_chat
        from .prefix import PrefixCachedModel, SharedPrefix

        if not self.prefix_cache or task.reasoning:
            return
        prefix = SharedPrefix.for_task(self.model, self.tokenizer, task)
        if prefix is None:
            return
        wrapped = PrefixCachedModel(self.model, prefix)
        prompts = [render_chat(self.tokenizer, task.user_message(ex), reasoning=False) for ex in task.examples[:4]]
        sequences = encode_prompts(self.tokenizer, prompts)
        tokens = [option_token_ids(self.tokenizer, task.labels, context=decision_context(p, reasoning=False)) for p in prompts]
        plain = score_token_ids(self.model, self.tokenizer, sequences, tokens, batch_size=len(sequences))
        cached = score_token_ids(wrapped, self.tokenizer, sequences, tokens, batch_size=len(sequences))
        diff = max(abs(a - b) for x, y in zip(plain, cached) for a, b in zip(x.option_probs, y.option_probs))
        if wrapped.hits != 1 or diff > 1e-5:
            logger.warning("shared-prefix cache off: it changed option probabilities by %.3g (hits %d)", diff, wrapped.hits)
            return
        self.scoring_model, self.prefix_tokens = wrapped, len(prefix)
        logger.info("shared-prefix cache on: %d prompt tokens computed once (max difference %.2g)", len(prefix), diff)

    def describe(self) -> dict:
        return {"engine": self.name, "shared_prefix_tokens": self.prefix_tokens}

    def check_lengths(self, lengths: Sequence[int], *, reserve: int, names: Sequence[str]) -> None:
        from ..scoring import check_prompt_lengths

        check_prompt_lengths(self.model, lengths, reserve=reserve, names=names)

    def decide(self, task, examples, sequences, tokens, *, settings: dict) -> list[PredictionRecord]:
        # decal evaluate's per-batch scorer: one padded forward pass (or one generate call) over
        # the whole batch, then `make_record` per example. Greedy decoding only, so the seed
        # it takes does not change the result.
        from ..evaluation import _score_batch

        model = self.model if task.reasoning else self.scoring_model
        return _score_batch(
            model, self.tokenizer, task, list(examples), [list(s) for s in sequences], list(tokens),
            settings=settings, batch_seed=settings["seed"],
        )


def check_engine(name: str) -> None:
    """Raise ConfigError unless this install can serve on engine `name`."""
    if name not in ENGINES:
        raise ConfigError(
            f"engine {name!r} is not available in this install: decal serve runs on {', '.join(ENGINES)} until the "
            f"decal.engines package provides {name!r}"
        )


def load_engine(config) -> ServeEngine:
    """Load the model for `config` (a `ServeConfig`) behind the engine it names.

    Raises:
        ConfigError: an engine this install does not have.
        ModelNotFoundError: as `decal.models.load_model`.
    """
    check_engine(config.engine)
    import torch

    from ..models import load_model, merges_adapter_exactly

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(
        config.model, adapter=config.adapter, merge_adapter=merges_adapter_exactly(config.dtype), dtype=config.dtype,
        device=config.device, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle,
        offline=config.offline or None,
    )
    logger.info("loaded %s (%s, %s) on the hf engine", config.model, config.dtype, config.device)
    return HFEngine(model, tokenizer, prefix_cache=config.prefix_cache)
