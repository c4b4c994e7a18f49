"""The engine a server runs on: `decal.engines` (hf, vllm or remote), prepared before the socket is bound.

`prepare_serving_engine` checks the engine, its options, the model and the adapter and loads the
tokenizer (`decal.engines.prepare_engine`): no weights, so a bad flag fails in one line before
the server starts; for the remote engine it runs the exactness checks against the vLLM servers,
so decal serves as a gateway in front of a fleet only once they pass. `build_serving_engine` loads
the weights (or takes the checked connection); on an engine whose forward pass runs here (hf) it
adds the shared prompt-prefix cache (`decal.serve.prefix`) for non-reasoning tasks.

How requests reach the engine (`batching_defaults`): the hf engine runs what it is handed as one
padded batch, so the server's queue forms batches of at most `--max-batch-size` inputs. An engine
with continuous batching (vllm, remote) schedules its own batches, with its own prefix caching, so
the queue hands it everything waiting, up to the engine's `call_size`, without waiting for a batch
to fill.
"""

from __future__ import annotations

import logging

from ..engines import Engine, EngineSpec, prepare_engine
from ..tasks.schema import Task

__all__ = ["prepare_serving_engine", "build_serving_engine", "batching_defaults"]

logger = logging.getLogger(__name__)


def prepare_serving_engine(config) -> EngineSpec:
    """Check `config`'s engine and model and load the tokenizer (no weights).

    Raises:
        ConfigError: an unknown engine, an option it does not take, vLLM missing.
        ModelNotFoundError: an unknown model or a missing or unsafe adapter.
    """
    return prepare_engine(
        config.engine, config.model, adapter=config.adapter, dtype=config.dtype, device=config.device,
        options=config.engine_options, trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle, offline=config.offline or None, api_key=config.server_api_key,
    )


def build_serving_engine(spec: EngineSpec, task: Task, *, prefix_cache: bool = True, threads: int | None = None) -> Engine:
    """Load the weights and start the engine; where the forward pass runs here, cache the task's shared prompt prefix."""
    local = spec.kind.capabilities.local_forward
    if threads is not None and local:
        import torch

        torch.set_num_threads(threads)
    engine = spec.build()
    logger.info("loaded %s (%s) on the %s engine", spec.model, spec.dtype, engine.name)
    if local and prefix_cache and not task.reasoning:
        from .prefix import with_shared_prefix

        engine = with_shared_prefix(engine, task)
    return engine


def batching_defaults(engine_name: str, *, max_batch_size: int, max_wait_ms: float, call_size: int) -> tuple[int, float]:
    """(inputs per engine call, seconds the oldest input waits for more) for the server's queue.

    An engine with continuous batching (vllm, remote) batches inside each call, so the queue never
    waits and hands over up to `call_size` inputs; the hf engine gets batches of `max_batch_size`
    after up to `max_wait_ms`.
    """
    from ..engines import engine_kind

    if engine_kind(engine_name).capabilities.continuous_batching:
        return max(max_batch_size, call_size), 0.0
    return max_batch_size, max_wait_ms / 1000.0
