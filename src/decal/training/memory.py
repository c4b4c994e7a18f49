"""Memory bounds of a training run (issue #13 item 2): prompt-length limits and the heap's growth.

A training step's memory grows with the longest prompt in its micro-batch, so one prompt that
cannot fit must stop the run before the first step, not minutes into it with the kernel's
out-of-memory killer. Two limits apply:

- the user's ``max_prompt_length`` (``--max-prompt-length``), when set;
- the model's context (``max_position_embeddings``), which must hold the prompt plus what the
  model reads or writes after it: the decision token (SFT) or ``max_completion_length``
  completion tokens (GRPO).

Prompts are never cut silently: a prompt over a limit is an error (`PromptTooLongError`, from
decal's one prompt-length check, `decal.engines.base.check_lengths`) naming the example and its
length, unless the user asked for truncation (SFT's ``truncate_prompts``, which keeps the end of
the prompt, where the generation prompt sits next to the decision).

On CPUs the C library's allocator can hold far more than the tensors alive: glibc raises its
mmap threshold (up to 32 MiB) each time a large buffer is freed, after which a step's transient
activations (tens of MB each) are carved from the heap between the tensors kept for the backward
pass, and the heap cannot shrink past them. `return_large_buffers` fixes the threshold at 1 MiB,
so such buffers are mapped and unmapped: a 4 x 2,102-token SFT forward + backward on SmolLM2 with
gradient checkpointing grew the process by 1.8 GB instead of 7.0 GB, at the same CPU time.

Gradient checkpointing keeps one decoder layer's activations instead of all of them, for about
30 % more step time. `AutoCheckpointing` turns it on only for the micro-batches that need it: those
whose activations, estimated from the model's shape (`activation_bytes_per_token`), would take
more than a quarter of the device's memory. On SmolLM2 (about 2 MB per token in float32) and this
24 GB machine, SFT micro-batches of 4 x 2,102 tokens are checkpointed and 4 x 300 are not.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from typing import Sequence

from ..errors import PromptTooLongError

__all__ = ["PromptTooLongError", "return_large_buffers", "activation_bytes_per_token", "checkpoint_budget_bytes",
           "AutoCheckpointing"]


logger = logging.getLogger(__name__)

# mallopt(3) parameter number of M_MMAP_THRESHOLD in glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
_LARGE_BUFFER = 1 << 20


def return_large_buffers() -> bool:
    """Make glibc serve buffers of 1 MiB and more with mmap, so each goes back to the system when freed.

    Setting the threshold also stops glibc from raising it (see the module docstring). It applies
    to the whole process and lasts; tensors that small allocators pool (CUDA, pymalloc) are
    unaffected.

    Returns:
        True when set; False where the C library is not glibc (nothing to do).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        done = ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _LARGE_BUFFER) == 1
    except (OSError, AttributeError):
        return False
    logger.debug("glibc mmap threshold %s at %d bytes", "fixed" if done else "not set", _LARGE_BUFFER)
    return done


def activation_bytes_per_token(model) -> int:
    """Estimated bytes a training forward pass keeps per token for the backward, without checkpointing.

    ``layers x (16 x hidden + 5 x intermediate) x bytes per value``: in each decoder layer of a
    Llama-like model with LoRA on every projection, about 16 hidden-sized tensors (norms, attention
    projections and output, LoRA dropout inputs, residuals) and 5 MLP-sized ones. SmolLM2-135M in
    float32: 2.0 MB estimated, 2.2 MB measured (`saved_tensors_hooks`, 4 x 256 tokens).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    element = next(p for p in model.parameters()).element_size()
    return int(config.num_hidden_layers) * (16 * hidden + 5 * intermediate) * element


def checkpoint_budget_bytes(device) -> int:
    """A quarter of the device's memory: the GPU's, else the machine's physical memory."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class AutoCheckpointing:
    """Gradient checkpointing for the micro-batches whose activations would exceed a budget.

    The model must have checkpointing enabled (`gradient_checkpointing_enable`, which the
    trainers do with ``gradient_checkpointing=True``); calling the object before a micro-batch's
    forward pass switches every checkpointed layer on or off for it. The values computed are the
    same either way; only memory and time differ.

    Args:
        model: the model being trained (PEFT or DDP wrappers included).
        budget_bytes: activations allowed without checkpointing; default `checkpoint_budget_bytes`
            of the model's device.
    """

    def __init__(self, model, *, budget_bytes: int | None = None):
        if budget_bytes is None:
            budget_bytes = checkpoint_budget_bytes(next(model.parameters()).device)
        self.per_token = activation_bytes_per_token(model)
        #: micro-batches of more padded tokens than this are checkpointed
        self.max_tokens = budget_bytes // self.per_token
        logger.info("gradient checkpointing for micro-batches over %d tokens (%.1f MB of activations per token, "
                    "budget %.1f GB)", self.max_tokens, self.per_token / 1e6, budget_bytes / 1e9)

    def __call__(self, model, n_tokens: int) -> bool:
        """Switch checkpointing on for a micro-batch of `n_tokens` padded tokens over the budget, off otherwise."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        enabled = n_tokens > self.max_tokens
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer) and hasattr(module, "_gradient_checkpointing_func"):
                module.gradient_checkpointing = enabled
        return enabled
