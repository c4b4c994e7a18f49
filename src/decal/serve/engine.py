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

    def check_lengths(self, lengths: Sequence[int], *, reserve: int, names: Sequence[str]) -> None:
        """Raise ValueError naming the first prompt whose length plus `reserve` exceeds the context."""

    def decide(
        self, task: Task, examples: Sequence[DecisionExample], sequences: Sequence[Sequence[int]],
        tokens: Sequence[DecisionTokens], *, settings: dict,
    ) -> list[PredictionRecord]:
        """The records `decal evaluate` writes for these examples, in their order."""


class HFEngine:
    """transformers forward passes and generation through `decal.scoring`, batched by the server's queue."""

    name = "hf"
    batches_itself = False

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def check_lengths(self, lengths: Sequence[int], *, reserve: int, names: Sequence[str]) -> None:
        from ..scoring import check_prompt_lengths

        check_prompt_lengths(self.model, lengths, reserve=reserve, names=names)

    def decide(self, task, examples, sequences, tokens, *, settings: dict) -> list[PredictionRecord]:
        # decal evaluate's per-batch scorer: one padded forward pass (or one generate call) over
        # the whole batch, then `make_record` per example. Greedy decoding only, so the seed
        # it takes does not change the result.
        from ..evaluation import _score_batch

        return _score_batch(
            self.model, self.tokenizer, task, list(examples), [list(s) for s in sequences], list(tokens),
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
    return HFEngine(model, tokenizer)
