"""`decal train`: fine-tune a LoRA adapter with SFT, GRPO or calibration-aware GRPO.

Every option maps to a `decal.training.config.TrainConfig` field (kebab-case flag, snake_case
field); defaults live only in that dataclass. Precedence: flags > `--config FILE` > defaults.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]

logger = logging.getLogger("decal.train")

EPILOG = """Examples:

  decal train --method sft --model smollm2-135m-instruct --task builtin --split train --out runs/sft --epochs 2

  decal train --method sft --reasoning --model smollm2-135m-instruct --task verdicts --split train --limit 400 \\
      --learning-rate 1e-3 --max-steps 60 --batch-size 8 --grad-accum 1 --out runs/warm

  decal train --method sft --reasoning --warm-start-labels commit --model smollm2-135m-instruct --task verdicts \
      --limit 400 --learning-rate 1e-3 --max-steps 150 --batch-size 8 --grad-accum 1 --save-steps 25 \
      --select-split test --select-limit 64 --out runs/warm-commit

  decal train --method grpo --init-adapter runs/warm/adapter --model smollm2-135m-instruct --task verdicts \\
      --out runs/grpo --max-steps 20 --batch-size 16 --num-generations 8 --grad-accum 1 --max-completion-length 64

  decal train --method grpo --engine vllm --init-adapter runs/warm/adapter --model smollm2-135m-instruct \
      --task verdicts --out runs/grpo-vllm --max-steps 10 --batch-size 32 --num-generations 8 --grad-accum 1 \
      --learning-rate 1e-4 --max-completion-length 64

  decal train --method cal-grpo --model Qwen/Qwen3-1.7B --task commonsense_qa --split train --out runs/cal --cal-lambda 0.001

  decal train --config configs/train.yaml --out runs/sft --resume

  accelerate launch --config_file configs/accelerate/ddp.yaml -m decal train --method grpo --model M --task T --out runs/g
"""


def _help(name: str) -> str:
    from dataclasses import fields

    from ..training.config import TrainConfig

    return next(f.metadata.get("help", "") for f in fields(TrainConfig) if f.name == name)


def _opt(name: str, *decls: str, metavar: str | None = None, panel: str = "Training"):
    flag = "--" + name.replace("_", "-")
    return typer.Option(None, flag, *decls, help=_help(name), metavar=metavar, rich_help_panel=panel,
                        show_default=False)


def _bool_opt(name: str, panel: str = "Training"):
    flag = "--" + name.replace("_", "-")
    return typer.Option(None, f"{flag}/--no-{name.replace('_', '-')}", help=_help(name), rich_help_panel=panel,
                        show_default=False)


def register(app: typer.Typer) -> None:
    @app.command("train", epilog=EPILOG)
    def train_command(
        method: Optional[str] = _opt("method", metavar="sft|grpo|cal-grpo", panel="Run"),
        model: Optional[str] = _opt("model", metavar="MODEL", panel="Run"),
        task: Optional[str] = _opt("task", metavar="TASK", panel="Run"),
        split: Optional[str] = _opt("split", metavar="SPLIT", panel="Run"),
        out: Optional[str] = _opt("out", metavar="DIR", panel="Run"),
        config: Optional[Path] = typer.Option(None, "--config", metavar="FILE", rich_help_panel="Run",
                                              help="YAML file of TrainConfig fields; flags override it."),
        resume: bool = typer.Option(False, "--resume", rich_help_panel="Run",
                                    help="Continue from the newest complete checkpoint in --out."),
        data_dir: Optional[str] = _opt("data_dir", metavar="DIR", panel="Run"),
        limit: Optional[int] = _opt("limit", metavar="N", panel="Run"),
        reasoning: Optional[bool] = _bool_opt("reasoning", panel="Run"),
        init_adapter: Optional[str] = _opt("init_adapter", metavar="DIR", panel="Run"),
        warm_start_labels: Optional[str] = _opt("warm_start_labels", metavar="sample|commit", panel="Run"),
        learning_rate: Optional[float] = _opt("learning_rate", metavar="LR"),
        epochs: Optional[float] = _opt("epochs", metavar="N"),
        max_steps: Optional[int] = _opt("max_steps", metavar="N"),
        batch_size: Optional[int] = _opt("batch_size", metavar="N"),
        grad_accum: Optional[int] = _opt("grad_accum", metavar="N"),
        max_prompt_length: Optional[int] = _opt("max_prompt_length", metavar="N"),
        truncate_prompts: Optional[bool] = _bool_opt("truncate_prompts"),
        save_steps: Optional[int] = _opt("save_steps", metavar="N"),
        seed: Optional[int] = _opt("seed", metavar="N"),
        dtype: Optional[str] = _opt("dtype", metavar="DTYPE"),
        gradient_checkpointing: Optional[bool] = _bool_opt("gradient_checkpointing"),
        report_to: Optional[str] = _opt("report_to", metavar="NAMES"),
        num_generations: Optional[int] = _opt("num_generations", metavar="N", panel="GRPO"),
        max_completion_length: Optional[int] = _opt("max_completion_length", metavar="N", panel="GRPO"),
        temperature: Optional[float] = _opt("temperature", metavar="T", panel="GRPO"),
        beta: Optional[float] = _opt("beta", metavar="B", panel="GRPO"),
        epsilon: Optional[float] = _opt("epsilon", metavar="EPS", panel="GRPO"),
        loss_type: Optional[str] = _opt("loss_type", metavar="NAME", panel="GRPO"),
        cal_lambda: Optional[float] = _opt("cal_lambda", metavar="LAMBDA", panel="GRPO"),
        cal_target: Optional[str] = _opt("cal_target", metavar="uniform|group-accuracy", panel="GRPO"),
        engine: Optional[str] = _opt("engine", metavar="hf|vllm", panel="GRPO"),
        use_vllm: Optional[bool] = _bool_opt("use_vllm", panel="GRPO"),
        vllm_mode: Optional[str] = _opt("vllm_mode", metavar="colocate|server", panel="GRPO"),
        vllm_server_base_url: Optional[str] = _opt("vllm_server_base_url", metavar="URL", panel="GRPO"),
        vllm_importance_sampling_correction: Optional[bool] = _bool_opt("vllm_importance_sampling_correction",
                                                                        panel="GRPO"),
        lora_r: Optional[int] = _opt("lora_r", metavar="R", panel="LoRA"),
        lora_alpha: Optional[int] = _opt("lora_alpha", metavar="A", panel="LoRA"),
        lora_dropout: Optional[float] = _opt("lora_dropout", metavar="P", panel="LoRA"),
        lora_target_modules: Optional[str] = typer.Option(
            None, "--lora-target-modules", metavar="NAMES", rich_help_panel="LoRA", show_default=False,
            help="Comma-separated module names, or all-linear."),
        select_split: Optional[str] = _opt("select_split", metavar="SPLIT", panel="Checkpoint selection"),
        select_limit: Optional[int] = _opt("select_limit", metavar="N", panel="Checkpoint selection"),
        select_criterion: Optional[str] = _opt("select_criterion", metavar="accuracy|last", panel="Checkpoint selection"),
        allow_pickle: Optional[bool] = _bool_opt("allow_pickle", panel="Safety"),
        trust_remote_code: Optional[bool] = _bool_opt("trust_remote_code", panel="Safety"),
    ) -> None:
        """Fine-tune a LoRA adapter on the decision token (sft), on reasoning completions (sft --reasoning, the
        warm start) or with (calibration-aware) GRPO."""
        cli_values = dict(locals())
        for key in ("config", "resume"):
            cli_values.pop(key)
        if lora_target_modules is not None and lora_target_modules != "all-linear":
            cli_values["lora_target_modules"] = [m.strip() for m in lora_target_modules.split(",") if m.strip()]
        run_train(cli_values, config_path=config, resume=resume)


def run_train(cli_values: dict, *, config_path: Path | None, resume: bool) -> None:
    """Merge, validate (before any heavy import) and run; errors reach `cli.main` as one line."""
    from ..training.config import load_config_file, merge_config

    file_values = load_config_file(config_path) if config_path is not None else None
    train_config, overridden = merge_config(file_values=file_values, cli_values=cli_values)
    train_config.check_runnable()
    _setup_logging()
    if overridden:
        logger.info("command-line flags override the config file for: %s", ", ".join(overridden))
    from ..training.runner import train

    out = train(train_config, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        typer.echo(f"trained {train_config.method} adapter: {out / 'adapter'}")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
