"""The one place where decal touches TRL's private GRPO API (pinned: trl==1.16.0).

`DecalGRPOTrainer` overrides two private hooks of `trl.GRPOTrainer` and reads a few private
attributes. Each of them is named here, with the signature or the keys decal relies on, and
`check_trl()` verifies them when a trainer is built, so a TRL upgrade that changes them fails
loudly at construction instead of silently training something else. `tests/test_grpo.py`
asserts the same facts.

What decal relies on, as read in TRL 1.16.0 `trl/trainer/grpo_trainer.py`:

- ``_generate_and_score_completions(self, inputs)`` returns a dict holding at least
  `GENERATION_KEYS`; ``advantages`` is (B,), ``completion_ids`` (B, T) right-padded. It calls
  the reward functions exactly once, on the process-local rows, in order.
- ``_compute_loss(self, model, inputs)`` accepts (B, T) advantages (it only unsqueezes when
  ``advantages.dim() == 1``), runs one forward through ``_get_per_token_logps_and_entropies``,
  whose fused LM head calls the backbone ``model.base_model`` and projects its
  ``last_hidden_state[:, :-1]``, and scales the bnpo/grpo/dr_grpo loss by
  ``current_gradient_accumulation_steps`` in train mode.
- ``_generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, ...)``
  returns ``(completion_ids, logprobs)``, lists with one entry per row of ``prompt_ids`` (logprobs
  None on the transformers path), and generates all its rows in one ``generate`` call there.
- ``_metrics[mode][name]`` lists are averaged by ``log``; ``num_generations`` and
  ``num_generations_eval`` give the group size.
- ``self.use_vllm`` is read, besides ``__init__`` (which builds TRL's vLLM client when it is set),
  only by ``_generate_single_turn`` and ``_generate`` (TRL's own vLLM sampling, which decal's
  override bypasses), ``_tool_call_loop`` (tools; with ``vllm_mode == "colocate"`` only),
  ``_generate_and_score_completions`` (the old log-probabilities and the importance-sampling
  ratio against the sampler's log-probabilities) and ``_compute_loss`` (applying that ratio).
  `sample_externally` sets it after construction for decal's own vLLM sampler
  (`decal.training.vllm_sampler`), so TRL corrects for the sampler exactly as it does for its own.
- ``trl.trainer.utils.add_fused_lm_head``'s forward decides ``compact = _use_triton(device)``:
  compact, it projects only the positions whose label is scored (the completion tokens); else
  every position of prompt + completion (so tile shapes stay fixed for graph compilers such as
  Neuron's). `completion_positions_only` makes it compact on a CPU too (issue #13).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

__all__ = [
    "TRL_VERSION",
    "GENERATION_KEYS",
    "HOOK_SIGNATURES",
    "check_trl",
    "generate_and_score",
    "compute_loss",
    "accumulation_normalizer",
    "backbone",
    "output_head",
    "log_metric",
    "group_size",
    "completion_positions_only",
    "USE_VLLM_READERS",
    "sample_externally",
]

TRL_VERSION = "1.16.0"

#: Keys of `_generate_and_score_completions`'s output that decal reads.
GENERATION_KEYS: tuple[str, ...] = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")

#: Parameter names of the private methods decal overrides or calls.
HOOK_SIGNATURES: dict[str, tuple[str, ...]] = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_compute_loss": ("self", "model", "inputs"),
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep"),
    "_generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations"),
}


def check_trl() -> None:
    """Raise RuntimeError when the installed TRL differs from the pinned one in anything decal uses."""
    import trl
    from trl import GRPOTrainer

    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(
            f"decal's GRPO trainer is written against trl=={TRL_VERSION}; found trl {trl.__version__}. "
            f"Install the pinned version (pip install trl=={TRL_VERSION})."
        )
    for name, expected in HOOK_SIGNATURES.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            raise RuntimeError(f"trl.GRPOTrainer has no `{name}`; decal needs trl=={TRL_VERSION}.")
        params = tuple(inspect.signature(method).parameters)[: len(expected)]
        if params != expected:
            raise RuntimeError(f"trl.GRPOTrainer.{name} takes {params}, decal expects {expected}; pin trl=={TRL_VERSION}.")
    source = inspect.getsource(GRPOTrainer._compute_loss)
    if "advantages.dim() == 1" not in source:
        raise RuntimeError("trl.GRPOTrainer._compute_loss no longer accepts (B, T) advantages; pin trl==1.16.0.")
    from trl.trainer import utils

    if _COMPACT_SOURCE not in inspect.getsource(utils.add_fused_lm_head) or not callable(getattr(utils, "_use_triton", None)):
        raise RuntimeError("trl.trainer.utils.add_fused_lm_head no longer chooses its compact projection with "
                           f"`{_COMPACT_SOURCE}`; pin trl=={TRL_VERSION}.")


#: The GRPOTrainer methods whose source reads `self.use_vllm` (see the module docstring).
USE_VLLM_READERS: tuple[str, ...] = ("__init__", "_compute_loss", "_generate", "_generate_and_score_completions",
                                     "_generate_single_turn", "_tool_call_loop")
#: What `_generate_and_score_completions` must test before computing the importance-sampling ratio.
_IS_SOURCE = "self.use_vllm and self.vllm_importance_sampling_correction"


def _use_vllm_readers() -> tuple[str, ...]:
    from trl import GRPOTrainer

    names = []
    for name, fn in inspect.getmembers(GRPOTrainer, inspect.isfunction):
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if "self.use_vllm" in source:
            names.append(name)
    return tuple(sorted(names))


def sample_externally(trainer) -> None:
    """Run TRL's vLLM bookkeeping for completions that decal's own sampler draws (`training.vllm_sampler`).

    Sets the trainer's ``use_vllm`` after construction (TRL built no vLLM client, as ``args.use_vllm``
    is False): TRL then computes the policy's log-probabilities of the sampled tokens and, with
    ``vllm_importance_sampling_correction``, reweights the loss by their ratio to the sampler's. The
    trainer's `_generate_single_turn` must sample itself and never reach TRL's vLLM branch.
    ``vllm_mode`` gets a value no TRL branch tests for, so TRL's colocate-only code stays off.

    Raises:
        RuntimeError: TRL reads ``use_vllm`` elsewhere than this module knows, or no longer gates
            the importance-sampling correction on it (pin trl==1.16.0).
        ValueError: the trainer was built with TRL's own vLLM (``args.use_vllm``).
    """
    from trl import GRPOTrainer

    if trainer.args.use_vllm:
        raise ValueError("decal's vLLM sampler and TRL's use_vllm are two routes to one thing; choose one")
    readers = _use_vllm_readers()
    if readers != tuple(sorted(USE_VLLM_READERS)):
        raise RuntimeError(f"trl.GRPOTrainer reads `use_vllm` in {readers}, decal expects {USE_VLLM_READERS}; "
                           f"pin trl=={TRL_VERSION}.")
    if _IS_SOURCE not in inspect.getsource(GRPOTrainer._generate_and_score_completions):
        raise RuntimeError(f"trl.GRPOTrainer no longer gates its importance-sampling correction on `{_IS_SOURCE}`; "
                           f"pin trl=={TRL_VERSION}.")
    trainer.use_vllm = True
    trainer.vllm_mode = "decal-engine"


#: The line of TRL's fused LM head that `completion_positions_only` acts on.
_COMPACT_SOURCE = "compact = _use_triton(hidden_states.device)"


@contextlib.contextmanager
def completion_positions_only():
    """Within the block, TRL's fused LM head projects only the scored positions on a CPU too.

    Without it, a CPU runs the (V, H) head and its chunked log-softmax over every prompt position
    and keeps them for the backward pass: with 2,102-token prompts and 64-token completions, 33
    times the rows that are scored. The log-probabilities are the same; only the rows computed
    differ. CUDA and XPU already run compact; other devices keep TRL's choice.
    """
    from trl.trainer import utils

    original = utils._use_triton
    utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        utils._use_triton = original


def generate_and_score(trainer, inputs: list[dict]) -> dict:
    """Call the parent's generation + scoring hook (a subclass override included)."""
    return trainer._generate_and_score_completions(inputs)


def compute_loss(trainer, model, inputs: dict) -> torch.Tensor:
    """Call the trainer's loss hook on a prepared batch dict (used by tests and benchmarks)."""
    return trainer._compute_loss(model, inputs)


def accumulation_normalizer(trainer) -> float:
    """What TRL divides the bnpo/grpo/dr_grpo loss by: the accumulation steps in train, 1 in eval."""
    return float(trainer.current_gradient_accumulation_steps) if trainer.model.training else 1.0


def _peft_base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(trainer, model) -> torch.nn.Module:
    """The module whose ``last_hidden_state`` TRL's fused head projects (``model.base_model``)."""
    causal_lm = _peft_base(trainer.accelerator.unwrap_model(model))
    return causal_lm.base_model


def output_head(trainer, model) -> torch.nn.Module:
    """The output embedding (LM head) module, LoRA layers included when it carries any."""
    return _peft_base(trainer.accelerator.unwrap_model(model)).get_output_embeddings()


def log_metric(trainer, name: str, value: float) -> None:
    """Append a value that TRL's ``log`` averages over the logging window."""
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode][name].append(float(value))


def group_size(trainer) -> int:
    """Rollouts per prompt in the current mode."""
    return int(trainer.num_generations if trainer.model.training else trainer.num_generations_eval)
