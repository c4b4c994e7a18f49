"""The training configuration of `decal train`: one frozen dataclass, its YAML loader and merge.

Precedence is CLI flags > YAML file (`--config FILE`) > dataclass defaults, merged with
`is not None`. Fields left at None take the method's paper default (docs/design.md, "Paper
settings"), which `TrainConfig.resolve()` fills in; each default is written exactly once, either
as a field default or in `_METHOD_DEFAULTS`. Keys and types are validated by pydantic
(`decal._config`: the YAML keys are the field names, an unknown key gets a "Did you mean"), value
rules in `__post_init__`, so a bad config fails with one line before any model or dataset is
loaded.

Effective batch sizes of the paper: SFT 32 examples = 8 per device x 4 accumulation steps; GRPO
256 completions = 32 completions per device x 8 accumulation steps (with 32 generations per
prompt, 8 prompts per optimizer step). Under `accelerate launch` with N processes the effective
batch is N times larger; divide `grad_accum` by N to keep the paper's.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Mapping

from .._config import config_dataclass, load_yaml, validate_config
from ..errors import ConfigError, did_you_mean

__all__ = ["TrainConfig", "METHODS", "CAL_TARGETS", "load_config_file", "merge_config", "config_to_dict"]

Method = Literal["sft", "grpo", "cal-grpo"]
CalTarget = Literal["uniform", "group-accuracy"]
VllmMode = Literal["server", "colocate"]
SamplerEngine = Literal["hf", "vllm"]
SelectCriterion = Literal["accuracy", "last"]
Dtype = Literal["float32", "bfloat16", "float16", "auto"]
# TRL 1.16 GRPO loss types (trl/trainer/grpo_config.py).
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]
METHODS = typing.get_args(Method)
CAL_TARGETS = typing.get_args(CalTarget)
_DTYPES = typing.get_args(Dtype)
_LOSS_TYPES = typing.get_args(LossType)

# Paper defaults that differ by method (docs/design.md, "Paper settings"); None fields take these.
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 2e-4, "epochs": 5.0, "batch_size": 8, "grad_accum": 4, "reasoning": False},
    "grpo": {"learning_rate": 1e-3, "epochs": 20.0, "batch_size": 32, "grad_accum": 8, "reasoning": True},
}
_METHOD_DEFAULTS["cal-grpo"] = _METHOD_DEFAULTS["grpo"]


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@config_dataclass
class TrainConfig:
    """What `decal train` runs. YAML keys are exactly these field names."""

    method: Method = _help(
        "Training method: sft (cross-entropy on the decision token; with reasoning: the reasoning warm start, "
        "SFT on whole <think> completions), grpo, or cal-grpo (GRPO with the decision-token advantage zeroed "
        "plus cal_lambda * CE).", default="sft")
    model: str = _help("Base model: hub id, local folder or .gguf file.", default="")
    task: str = _help("Task name (see `decal tasks list`) or a JSONL/CSV task file.", default="")
    split: str = _help("Training split of the task.", default="train")
    data_dir: str | None = _help("Folder with the paper datasets (default: $DECAL_DATA_DIR).", default=None)
    reasoning: bool | None = _help(
        "Prompt with the reasoning template; None: True for grpo/cal-grpo, False for sft. sft with reasoning is "
        "the warm start: it trains on <think>RATIONALE</think> LABEL completions, labels drawn from the "
        "task's true probabilities.", default=None)
    warm_start_labels: Literal["sample", "commit"] = _help(
        "Labels of the reasoning warm start (sft with reasoning): sample (each drawn from the task's true "
        "probabilities: hedging paths) or commit (what the rationale concludes, the option with the larger true "
        "probability, ties to the first option: committed paths, issue #22). Tasks without true probabilities "
        "use the gold label either way.", default="sample")
    init_adapter: str | None = _help(
        "LoRA adapter folder to continue training (e.g. a warm start's adapter); its LoRA settings replace the "
        "lora_* fields. None starts a new adapter.", default=None)
    out: str = _help("Output folder: adapter/, checkpoint-N/, config.resolved.yaml, train_log.jsonl.", default="")
    learning_rate: float | None = _help("AdamW learning rate; None: 2e-4 (sft) or 1e-3 (grpo).", default=None)
    epochs: float | None = _help("Training epochs; None: 5 (sft) or 20 (grpo). Ignored when max_steps > 0.",
                                 default=None)
    max_steps: int = _help("Optimizer steps to run; -1 runs `epochs` epochs.", default=-1)
    batch_size: int | None = _help(
        "Per-device micro-batch: examples (sft) or completions (grpo); None: 8 (sft) or 32 (grpo).", default=None)
    grad_accum: int | None = _help("Gradient accumulation steps; None: 4 (sft) or 8 (grpo).", default=None)
    num_generations: int = _help("GRPO completions per prompt (at least 2).", default=32)
    max_completion_length: int = _help("GRPO maximum new tokens per completion.", default=256)
    max_prompt_length: int | None = _help(
        "Longest prompt allowed, in tokens: a longer one stops the run before training, naming the example "
        "(None: only the model's context limits prompts). Prompts are never cut unless truncate_prompts is set.",
        default=None)
    truncate_prompts: bool = _help(
        "SFT: cut prompts longer than max_prompt_length to their last max_prompt_length tokens (the end holds "
        "the generation prompt, next to the decision) instead of failing. 128 tokens made CPU runs ~2x faster "
        '(docs/design.md, "Measured costs").',
        default=False)
    temperature: float = _help("GRPO sampling temperature.", default=1.0)
    beta: float = _help("GRPO KL coefficient (0 loads no reference model).", default=0.0)
    epsilon: float = _help("GRPO clipping epsilon.", default=0.2)
    loss_type: LossType = _help(f"TRL GRPO loss type, one of {', '.join(_LOSS_TYPES)}.", default="bnpo")
    save_steps: int = _help("Save a checkpoint-N folder every N optimizer steps.", default=50)
    seed: int = _help("Random seed (data order, LoRA init, sampling).", default=0)
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA alpha.", default=32)
    lora_dropout: float = _help("LoRA dropout, in [0, 1).", default=0.1)
    lora_target_modules: list[str] | str = _help(
        "LoRA target modules: a list of module names or 'all-linear'.", default="all-linear")
    cal_lambda: float = _help("cal-grpo weight of the decision-token CE term (>= 0).", default=0.001)
    cal_target: CalTarget = _help(
        "cal-grpo CE target for a wrong sampled decision: uniform over options, or the group's accuracy.",
        default="uniform")
    engine: SamplerEngine = _help(
        "Where GRPO samples its completions: hf (transformers' generate in the trainer) or vllm (decal's vLLM "
        "engine, CPU or GPU: the LoRA adapter is saved each step and served as a new LoRA request; TRL's "
        "importance-sampling correction covers the sampler/trainer difference). Training is the same either way.",
        default="hf")
    use_vllm: bool = _help("Generate GRPO completions with TRL's own vLLM integration (GPU only; needs the vllm "
                           "package). On CPUs use engine: vllm.", default=False)
    vllm_mode: VllmMode = _help(
        "vLLM mode: colocate (same process and GPUs) or server (a separate `trl vllm-serve`).", default="colocate")
    vllm_server_base_url: str | None = _help("vLLM server URL in server mode (None: TRL's default host/port).",
                                             default=None)
    vllm_importance_sampling_correction: bool = _help(
        "Reweight the policy gradient by the trainer/vLLM token-probability ratio, capped (TRL's correction "
        "for the sampler/trainer mismatch); only acts with use_vllm.", default=True)
    report_to: str = _help("Trackers to log to: none, tensorboard, wandb, mlflow (comma-separated).",
                           default="none")
    gradient_checkpointing: bool | None = _help(
        "Recompute each layer's activations in the backward pass: a step holds one layer's activations, not all, "
        "for about 30% more time. None (auto): only for micro-batches whose activations would take more than a "
        "quarter of the memory (GPU, else RAM), estimated from the model's shape. Issue #13: SmolLM2 SFT at "
        "4 x 2,102 tokens needs ~18 GB without it.", default=None)
    dtype: Dtype = _help(f"Weights dtype, one of {', '.join(_DTYPES)}. auto: float32 on CPUs (bf16 LoRA updates were "
                         'lost to rounding: docs/design.md, "Measured costs"), bfloat16 on GPUs that support it.',
                         default="auto")
    limit: int | None = _help("Train on the first N examples of the split only.", default=None)
    select_split: str | None = _help(
        "After training, evaluate every checkpoint on this split and record the best in selection.json.",
        default=None)
    select_limit: int | None = _help("Evaluate checkpoint selection on the first N examples only.", default=None)
    select_criterion: SelectCriterion = _help(
        "Which scored checkpoint becomes best_adapter: accuracy (the most accurate; ties: lower ECE, then the "
        "earlier step) or last (the final one; the scores are then a curve, e.g. to train a warm start until its "
        "confidence stops rising).", default="accuracy")
    allow_pickle: bool = _help("Allow loading pickled (non-safetensors) weights.", default=False)
    trust_remote_code: bool = _help("Allow model code from the model folder or hub.", default=False)

    def __post_init__(self) -> None:
        positive = {"learning_rate": self.learning_rate, "epochs": self.epochs, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "max_completion_length": self.max_completion_length,
                    "max_prompt_length": self.max_prompt_length, "temperature": self.temperature,
                    "save_steps": self.save_steps, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
                    "limit": self.limit, "select_limit": self.select_limit}
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"`{name}` must be > 0; got {value!r}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"`max_steps` must be a positive step count or -1 (use epochs); got {self.max_steps!r}.")
        if self.num_generations < 2:
            raise ConfigError(f"`num_generations` must be >= 2; got {self.num_generations!r}. GRPO's advantage "
                              f"compares completions of the same prompt, so one completion has nothing to compare to.")
        for name in ("beta", "epsilon", "cal_lambda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be >= 0; got {getattr(self, name)!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"`lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        if self.seed < 0:
            raise ConfigError(f"`seed` must be >= 0; got {self.seed!r}.")
        if self.truncate_prompts and self.max_prompt_length is None:
            raise ConfigError("`truncate_prompts` needs `max_prompt_length`, the number of prompt tokens to keep; "
                              "set --max-prompt-length N.")
        if self.method != "sft" and self.truncate_prompts:
            raise ConfigError(f"`truncate_prompts` applies to sft only; got True with {self.method}. TRL 1.16's "
                              f"GRPOConfig has no prompt truncation; `max_prompt_length` alone checks the prompts.")
        engines = typing.get_args(SamplerEngine)
        if self.engine not in engines:  # also when built in code, not only from a config file
            raise ConfigError(f"Unknown `engine` {self.engine!r}.{did_you_mean(str(self.engine), engines)} "
                              f"Available: {', '.join(engines)}.")
        if self.samples_on_engine and not self.is_grpo:
            raise ConfigError(f"`engine` chooses where GRPO samples; got {self.engine!r} with {self.method}, which "
                              "samples nothing. Drop --engine.")
        if self.samples_on_engine and self.use_vllm:
            raise ConfigError("`engine: vllm` (decal's vLLM engine) and `use_vllm` (TRL's) are two routes to vLLM "
                              "sampling; choose one (on CPUs: --engine vllm).")
        if self.warm_start_labels != "sample" and not (self.method == "sft" and self.reasoning):
            raise ConfigError(f"`warm_start_labels` applies to the reasoning warm start (sft with reasoning) only; got "
                              f"{self.warm_start_labels!r} with {self.method}"
                              f"{'' if self.method != 'sft' else ' without reasoning'}.")
        if self.method == "sft" and self.reasoning and self.max_prompt_length is not None:
            raise ConfigError(f"`max_prompt_length` applies to decision-token sft only; got {self.max_prompt_length!r} "
                              "with reasoning. The warm start trains on whole prompts, as generation sees them.")

    def check_runnable(self) -> None:
        """Raise ConfigError when a field a run needs (model, task, out) is empty."""
        missing = [name for name in ("model", "task", "out") if not getattr(self, name)]
        if missing:
            flags = ", ".join(f"--{m}" for m in missing)
            raise ConfigError(f"`{missing[0]}` must be set; pass {flags} or set it in the --config file.")

    def resolve(self) -> TrainConfig:
        """A copy with every None method-default filled in from the paper settings."""
        defaults = _METHOD_DEFAULTS[self.method]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    @property
    def is_grpo(self) -> bool:
        return self.method in ("grpo", "cal-grpo")

    @property
    def samples_on_engine(self) -> bool:
        """GRPO samples on a decal engine (`engine` has the registry's `rl_sampler` capability), not in TRL."""
        from ..engines.registry import engine_kind

        return engine_kind(self.engine).capabilities.rl_sampler


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML training config into a dict of field values (checked keys and types).

    Args:
        path: a YAML mapping whose keys are `TrainConfig` field names.

    Returns:
        The mapping, values converted to the fields' types (`1e-3`, a string to YAML 1.1, is a
        float); rules between fields are checked by `merge_config`, once the flags are merged in.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not a mapping, invalid YAML, an unknown key or a wrong type, naming the file.
    """
    values = load_yaml(path, what="training config")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a training config must be a YAML mapping of field: value; "
                          f"got {type(values).__name__}.")
    return validate_config(TrainConfig, values, source=str(path), partial=True)


def merge_config(*, file_values: Mapping[str, Any] | None = None,
                 cli_values: Mapping[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    """Merge CLI > file > defaults (`is not None`) and validate.

    Args:
        file_values: from `load_config_file`, or None.
        cli_values: flag values; None means "not given".

    Returns:
        (config, overridden): the validated config and the keys the CLI set over the file.

    Raises:
        ConfigError: unknown key, wrong type or bad value.
    """
    file_values = dict(file_values or {})
    cli = {k: v for k, v in (cli_values or {}).items() if v is not None}
    merged = {**{k: v for k, v in file_values.items() if v is not None}, **cli}
    overridden = sorted(k for k in cli if k in file_values and file_values[k] != cli[k])
    return validate_config(TrainConfig, merged), overridden


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain dict of all fields, in declaration order, for `config.resolved.yaml`."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
