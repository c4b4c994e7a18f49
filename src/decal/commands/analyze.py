"""`decal analyze rollouts|swap`: the paper's diagnosis experiments on any model (issue #7).

Every analysis option maps to a field of `decal.analysis.RolloutConfig` / `SwapConfig`; the
defaults live only there (a flag left out keeps the field's default).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import typer

from ._engine import (
    data_parallel_opt,
    engine_arg_opt,
    engine_opt,
    engine_options,
    gpu_memory_opt,
    max_concurrency_opt,
    max_model_len_opt,
    served_model_name_opt,
    server_api_key_opt,
    server_retries_opt,
    server_timeout_opt,
    server_url_opt,
    tensor_parallel_opt,
)

__all__ = ["register"]

logger = logging.getLogger("decal.analyze")

ROLLOUTS_EPILOG = """Examples:

  decal analyze rollouts --model smollm2-135m-instruct --task openai_moderation --split train --samples 16 --max-new-tokens 128 --limit 100 --out runs/rollouts

  decal analyze rollouts --model Qwen/Qwen3-1.7B --task commonsense_qa --split train --out runs/rollouts-csqa
"""

SWAP_EPILOG = """Examples:

  decal analyze swap --model smollm2-135m-instruct --task openai_moderation --split train --limit 100 --max-new-tokens 128 --out runs/swap

  decal analyze swap --model Qwen/Qwen3-1.7B --adapter runs/cal/adapter --task commonsense_qa --split train --seed 1 --out runs/swap-csqa
"""


def _help(config_cls, name: str) -> str:
    from dataclasses import fields

    return next(f.metadata.get("help", "") for f in fields(config_cls) if f.name == name)


def _config(config_cls, **values):
    # Precedence flag > dataclass default, merged on `is not None` (a 0 is a real value).
    return config_cls(**{k: v for k, v in values.items() if v is not None})


@contextlib.contextmanager
def _no_partial_folder(out: str, *, task: str, progress: bool):
    """Fail early on an --out that cannot be created; after a failure, remove the run folder this
    call created while it holds no results (only `run.json` or empty files), so bad input leaves
    no partial output (issue #9). A folder that existed before (a resumed run) is kept.
    """
    import shutil
    from pathlib import Path

    from ..errors import DecisionTokenCollisionError

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would add lines to stderr
    folder = Path(out)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot create the run folder {folder}: {existing} is not a folder")
    created = not folder.exists()
    try:
        try:
            yield
        except DecisionTokenCollisionError as e:  # name the task file too
            raise DecisionTokenCollisionError(f"{task}: field 'labels': {e}") from e
    except BaseException:
        if created and folder.is_dir():
            entries = list(folder.iterdir())
            if all(e.is_file() and (e.name == "run.json" or e.stat().st_size == 0) for e in entries):
                shutil.rmtree(folder, ignore_errors=True)
        raise


def _prepare(model: str, adapter: str | None, task: str, split: str, data_dir: str | None, dtype: str, *, prepare,
             engine: str, options, limit: int | None, max_new_tokens: int, **model_options):
    """Load the task, check the run folder, the engine recipe and the prompts' lengths; no weights load here."""
    from ..engines import prepare_engine
    from ..evaluation import prompt_lengths
    from ..tasks import load_task

    loaded_task = load_task(task, split, data_dir=data_dir, reasoning=True)
    if not len(loaded_task):
        raise ValueError(f"task '{task}' split '{split}' has no examples")
    # Check the run folder before the (slow) model load, so a wrong --out fails at once.
    prepare(loaded_task)
    spec = prepare_engine(engine, model, adapter=adapter, dtype=dtype, options=options, **model_options)
    try:
        ids, lengths = prompt_lengths(spec.tokenizer, loaded_task, limit=limit)
        spec.check_prompt_lengths(lengths, reserve=max_new_tokens, names=ids)
    except BaseException:
        spec.release()  # a remote engine's checked connection
        raise
    return spec, loaded_task


def _print_result(out: str, table: str) -> None:
    typer.echo(table.rstrip())
    typer.echo(f"wrote {out}/summary.json, {out}/table.md and the figures")


def register(app: typer.Typer) -> None:
    analyze_app = typer.Typer(
        help="Diagnosis experiments: rollout confidence spread (Table 2) and reasoning swap (Table 3).",
        no_args_is_help=True,
    )
    app.add_typer(analyze_app, name="analyze")
    _register_rollouts(analyze_app)
    _register_swap(analyze_app)


def _register_rollouts(analyze_app: typer.Typer) -> None:
    from ..analysis.rollouts import RolloutConfig

    def h(name: str) -> str:
        return _help(RolloutConfig, name)

    @analyze_app.command("rollouts", epilog=ROLLOUTS_EPILOG)
    def rollouts_command(
        model: str = typer.Option(..., "--model", metavar="MODEL", help="Alias, GGUF file, model folder or hub id."),
        task: str = typer.Option(..., "--task", metavar="TASK", help="Task name (see `decal tasks list`)."),
        split: str = typer.Option(..., "--split", metavar="SPLIT", help="Task split (the paper uses train)."),
        out: str = typer.Option(..., "--out", metavar="DIR", help="Run folder; rerun the same command to resume."),
        adapter: Optional[str] = typer.Option(None, "--adapter", metavar="DIR", help="LoRA adapter (hf: merged into the weights in float32, attached otherwise; vllm: a LoRA request on the base model; remote: a LoRA module the server serves)."),
        samples: Optional[int] = typer.Option(None, "--samples", metavar="N", help=h("samples")),
        temperature: Optional[float] = typer.Option(None, "--temperature", metavar="T", help=h("temperature")),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", metavar="N", help=h("max_new_tokens")),
        limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help=h("limit")),
        seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help=h("seed")),
        threshold: Optional[float] = typer.Option(None, "--threshold", metavar="P", help=h("threshold")),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", help=h("batch_size")),
        dtype: str = typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16",
                                  help="Weights dtype; auto: bfloat16 on GPUs and on CPUs with native bfloat16, else float32."),
        device: str = typer.Option("cpu", "--device", metavar="DEV", help="Torch device."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", metavar="DIR",
                                               help="Paper datasets folder (default $DECAL_DATA_DIR)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repository's own code."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .bin weights (can run code)."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
        engine: str = engine_opt(),
        tensor_parallel_size: Optional[int] = tensor_parallel_opt(),
        data_parallel_size: Optional[int] = data_parallel_opt(),
        gpu_memory_utilization: Optional[float] = gpu_memory_opt(),
        max_model_len: Optional[int] = max_model_len_opt(),
        engine_arg: Optional[list[str]] = engine_arg_opt(),
        server_url: Optional[list[str]] = server_url_opt(),
        served_model_name: Optional[str] = served_model_name_opt(),
        max_concurrency: Optional[int] = max_concurrency_opt(),
        server_timeout: Optional[float] = server_timeout_opt(),
        server_retries: Optional[int] = server_retries_opt(),
        api_key: Optional[str] = server_api_key_opt("--api-key", "--server-api-key"),
    ) -> None:
        """Sample rollouts per query and report the share with decision-token probability > 0.99."""
        from ..analysis.rollouts import prepare_run_folder, rollouts_table, run_rollouts

        config = _config(RolloutConfig, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                         limit=limit, seed=seed, threshold=threshold, batch_size=batch_size)
        options = engine_options(engine, tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                                 gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                 engine_args=engine_arg, server_urls=server_url, served_model_name=served_model_name,
                                 max_concurrency=max_concurrency, server_timeout=server_timeout,
                                 server_retries=server_retries)
        with _no_partial_folder(out, task=task, progress=progress):
            spec, loaded = _prepare(
                model, adapter, task, split, data_dir, dtype,
                prepare=lambda t: prepare_run_folder(out, t, config, model_name=model, adapter=adapter,
                                                     dtype=None if dtype == "auto" else dtype, engine=engine,
                                                     write=False),
                engine=engine, options=options, limit=config.limit, max_new_tokens=config.max_new_tokens,
                device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, offline=offline or None,
                api_key=api_key,
            )
            with spec.build() as scorer:
                summary = run_rollouts(scorer, None, loaded, out, config=config, model_name=model, adapter=adapter,
                                       progress=progress)
        _print_result(out, rollouts_table([(loaded.name, summary)]))


def _register_swap(analyze_app: typer.Typer) -> None:
    from ..analysis.swap import SwapConfig

    def h(name: str) -> str:
        return _help(SwapConfig, name)

    @analyze_app.command("swap", epilog=SWAP_EPILOG)
    def swap_command(
        model: str = typer.Option(..., "--model", metavar="MODEL", help="Alias, GGUF file, model folder or hub id."),
        task: str = typer.Option(..., "--task", metavar="TASK", help="Task name (see `decal tasks list`)."),
        split: str = typer.Option(..., "--split", metavar="SPLIT", help="Task split (recipients and donors)."),
        out: str = typer.Option(..., "--out", metavar="DIR", help="Run folder; rerun the same command to resume."),
        adapter: Optional[str] = typer.Option(None, "--adapter", metavar="DIR", help="LoRA adapter (hf: merged into the weights in float32, attached otherwise; vllm: a LoRA request on the base model; remote: a LoRA module the server serves)."),
        min_confidence: Optional[float] = typer.Option(None, "--min-confidence", metavar="P", help=h("min_confidence")),
        limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help=h("limit")),
        seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help=h("seed")),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", metavar="N", help=h("max_new_tokens")),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", help=h("batch_size")),
        include_invalid: bool = typer.Option(False, "--include-invalid", help=h("include_invalid")),
        dtype: str = typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16",
                                  help="Weights dtype; auto: bfloat16 on GPUs and on CPUs with native bfloat16, else float32."),
        device: str = typer.Option("cpu", "--device", metavar="DEV", help="Torch device."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", metavar="DIR",
                                               help="Paper datasets folder (default $DECAL_DATA_DIR)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repository's own code."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .bin weights (can run code)."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
        engine: str = engine_opt(),
        tensor_parallel_size: Optional[int] = tensor_parallel_opt(),
        data_parallel_size: Optional[int] = data_parallel_opt(),
        gpu_memory_utilization: Optional[float] = gpu_memory_opt(),
        max_model_len: Optional[int] = max_model_len_opt(),
        engine_arg: Optional[list[str]] = engine_arg_opt(),
        server_url: Optional[list[str]] = server_url_opt(),
        served_model_name: Optional[str] = served_model_name_opt(),
        max_concurrency: Optional[int] = max_concurrency_opt(),
        server_timeout: Optional[float] = server_timeout_opt(),
        server_retries: Optional[int] = server_retries_opt(),
        api_key: Optional[str] = server_api_key_opt("--api-key", "--server-api-key"),
    ) -> None:
        """Swap in another example's reasoning and report how often the decision follows it."""
        from ..analysis.swap import prepare_run_folder, run_swap, swaps_table

        config = _config(SwapConfig, min_confidence=min_confidence, limit=limit, seed=seed,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, include_invalid=include_invalid or None)
        options = engine_options(engine, tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                                 gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                 engine_args=engine_arg, server_urls=server_url, served_model_name=served_model_name,
                                 max_concurrency=max_concurrency, server_timeout=server_timeout,
                                 server_retries=server_retries)
        with _no_partial_folder(out, task=task, progress=progress):
            spec, loaded = _prepare(
                model, adapter, task, split, data_dir, dtype,
                prepare=lambda t: prepare_run_folder(out, t, config, model_name=model, adapter=adapter,
                                                     dtype=None if dtype == "auto" else dtype, engine=engine,
                                                     write=False),
                engine=engine, options=options, limit=config.limit, max_new_tokens=config.max_new_tokens,
                device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, offline=offline or None,
                api_key=api_key,
            )
            with spec.build() as scorer:
                summary = run_swap(scorer, None, loaded, out, config=config, model_name=model, adapter=adapter,
                                   progress=progress)
        _print_result(out, swaps_table([(loaded.name, summary)]))
