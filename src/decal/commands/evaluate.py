"""`decal evaluate`: score a task split with a model into a resumable run folder and summarise it."""

from __future__ import annotations

from pathlib import Path
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

__all__ = ["register", "run_name", "summary_line", "run_many", "label_mass_hint"]

EPILOG = """Examples:

  decal evaluate --model smollm2-135m-instruct --task builtin --split test --limit 50 --out runs

  decal evaluate --model smollm2-135m-instruct --task xstest --split test --dtype bfloat16 --out runs

  decal evaluate --model Qwen/Qwen3-1.7B --task commonsense_qa --split validation --reasoning \\
      --max-new-tokens 256 --temperature 0 --adapter runs/cagrpo/adapter --out runs --offline

  decal evaluate --engine vllm --tensor-parallel-size 2 --model Qwen/Qwen3-8B --task commonsense_qa \\
      --split validation --reasoning --out runs

  decal evaluate --engine remote --server-url http://gpu-1:8000/v1 --server-url http://gpu-2:8000/v1 \\
      --model Qwen/Qwen3-8B --task commonsense_qa --split validation --reasoning --out runs

  decal evaluate --model smollm2-135m-instruct --task xstest --split test --decision-after-whitespace --out runs

Rerunning the same command resumes where it stopped, with no id lost or doubled.
"""


def run_name(model: str, task: str, split: str, *, reasoning: bool, adapter: str | None = None) -> str:
    """The default run folder name: model, adapter, task, split and mode, made path-safe."""
    from .._io import safe_name

    parts = [Path(model).name if Path(model).exists() else model]
    if adapter:
        parts.append(Path(adapter).name or str(adapter))
    parts += [Path(task).stem if Path(task).is_file() else task, split, "reasoning" if reasoning else "direct"]
    return safe_name("__".join(safe_name(p) for p in parts))


def summary_line(records) -> dict[str, float]:
    """Accuracy, ECE, invalid rate and the share of confidences above 0.99 of a run's records."""
    from ..metrics import summarize

    s = summarize(records)
    return {
        "n": s["n"],
        "accuracy": s["accuracy"],
        "ece": s["ece"],
        "invalid_rate": s["invalid_rate"],
        "overconfidence_ratio": s["overconfidence_ratio"],
        "mean_label_mass": s["mean_label_mass"],
    }


def label_mass_hint(records, tokenizer) -> str | None:
    """A one-line hint when the options hold little probability at the first answer position
    (issue #23 item 4), naming how often the top token there is whitespace; None otherwise."""
    from ..metrics import LOW_LABEL_MASS

    mass = sum(r.label_mass for r in records) / len(records)
    if mass >= LOW_LABEL_MASS:
        return None
    tops = [r.top_token for r in records if r.top_token is not None]
    blank = sum(1 for t in tops if not tokenizer.convert_tokens_to_string([t]).strip())
    share = f"; the top token there is whitespace in {100 * blank / len(tops):.0f}% of records" if tops else ""
    return (f"the options hold {100 * mass:.1f}% of the probability at the first answer position on average{share}; "
            "if the model starts its answer with whitespace or a header, rerun with --decision-after-whitespace")


def _load_task(task: str, split: str, *, data_dir: Optional[Path], reasoning: bool):
    try:
        from ..tasks import load_task
    except ImportError as e:  # the task layer is optional at import time only
        raise RuntimeError("decal.tasks.load_task is not available in this install") from e
    return load_task(task, split, data_dir=data_dir, reasoning=reasoning)


def _make_run_folder(folder: Path) -> list[Path]:
    """Create the run folder before any model is loaded; returns the folders this call created.

    A folder that cannot be created (a parent is a file, a read-only or virtual file system)
    fails here with one line, before minutes of model loading.
    """
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the run folder {folder}: {e.strerror or e}") from e
    if not folder.is_dir():
        raise ValueError(f"cannot use the run folder {folder}: it is not a folder")
    return missing


def _discard_if_empty(folder: Path, created: list[Path]) -> None:
    """After a failure, remove a run folder this call created when it holds no record (issue #9).

    A folder that already existed (a resumed run) or holds records is kept, so nothing scored is lost.
    """
    import shutil

    predictions = folder / "predictions.jsonl"
    if not created or (predictions.is_file() and predictions.stat().st_size > 0):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in created[1:]:  # innermost first; stop at the first that is not empty
        try:
            parent.rmdir()
        except OSError:
            break


# While `decal evaluate-many` runs, its evaluations share engines through this pool.
_POOL = None


def _engine(spec):
    """The engine for one evaluation: built for it and closed after, or shared through `_POOL`."""
    import contextlib

    if _POOL is not None:
        return _POOL.engine(spec)
    return contextlib.closing(spec.build())


def _jobs_adapters(jobs: list[list[str]]) -> dict[str, list[str]]:
    """model -> the adapters the jobs evaluate on it (from their --model/--adapter flags)."""
    out: dict[str, list[str]] = {}
    for argv in jobs:
        flags = dict(zip(argv, argv[1:]))
        if "--model" in flags and "--adapter" in flags:
            out.setdefault(flags["--model"], []).append(flags["--adapter"])
    return out


def run_many(jobs: list[dict], results: Path) -> int:
    """Run `decal evaluate` argument lists in this process with shared engines (see `evaluate-many`).

    Each job's output goes to its `log` file; `results` gets {"codes": [...], "engines_started": n},
    rewritten after every job. Returns the number of failed jobs.
    """
    import contextlib
    import json

    from .._io import write_json_atomic
    from ..cli import main as cli_main
    from ..engines import EnginePool

    global _POOL
    pool = EnginePool()
    for model, adapters in _jobs_adapters([list(j["argv"]) for j in jobs]).items():
        pool.declare(model, adapters)
    codes: list[int] = []
    _POOL = pool
    try:
        for job in jobs:
            with open(job["log"], "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                print(f"\n$ decal evaluate {' '.join(job['argv'])}  (in decal evaluate-many)", flush=True)
                codes.append(cli_main(["evaluate", *job["argv"]]))
            write_json_atomic(results, {"codes": codes, "engines_started": pool.started})
    finally:
        _POOL = None
        pool.close()
    return sum(1 for c in codes if c != 0)


def register(app: typer.Typer) -> None:
    @app.command("evaluate-many", hidden=True)
    def evaluate_many_command(
        jobs: Path = typer.Argument(..., metavar="JOBS", help="JSON: {\"jobs\": [{\"argv\": [...], \"log\": FILE}], \"results\": FILE}."),
    ) -> None:
        """Run several `decal evaluate` commands in one process; evaluations of one model share one engine
        (vLLM: adapters as LoRA requests on one running engine). `decal run` calls it for vLLM grids."""
        import json

        spec = json.loads(jobs.read_text(encoding="utf-8"))
        failed = run_many(spec["jobs"], Path(spec["results"]))
        if failed:
            raise typer.Exit(1)

    @app.command("evaluate", epilog=EPILOG)
    def evaluate_command(
        model: str = typer.Option(..., "--model", metavar="MODEL", help="Hub id, local folder, .gguf file, or alias (smollm2-135m-instruct)."),
        task: str = typer.Option(..., "--task", metavar="TASK", help="Task name (see `decal tasks list`) or data file."),
        split: str = typer.Option(..., "--split", metavar="SPLIT", help="Split to score."),
        out: Path = typer.Option(..., "--out", metavar="DIR", help="Parent folder; the run goes to DIR/<run name>."),
        reasoning: bool = typer.Option(False, "--reasoning", help="Generate a reasoning, then decide after </think>."),
        decision_after_whitespace: bool = typer.Option(False, "--decision-after-whitespace", help="Non-reasoning: read the decision at the first generated token that is not whitespace (greedy, up to 8 tokens), for models that start their answer with a newline or a header."),
        adapter: Optional[str] = typer.Option(None, "--adapter", metavar="PATH", help="LoRA adapter folder (hf: merged into the weights in float32, attached otherwise; vllm: a LoRA request on the base model; remote: a LoRA module the server serves, by name or folder)."),
        limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="Score only the first N examples."),
        batch_size: int = typer.Option(8, "--batch-size", metavar="B", help="Examples per forward pass / generate call."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", metavar="K", help="Reasoning: generation budget."),
        temperature: float = typer.Option(0.0, "--temperature", metavar="T", help="Reasoning: 0 is greedy."),
        seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of sampling (per batch, so resumes match)."),
        name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="Run folder name (made path-safe); default from model/task/split/mode."),
        dtype: str = typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16", help="Weights dtype; auto: bfloat16 on GPUs and on CPUs with native bfloat16 (~2x faster there), else float32."),
        device: str = typer.Option("cpu", "--device", metavar="DEV", help="Torch device."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", metavar="DIR", help="Paper datasets folder (default $DECAL_DATA_DIR)."),
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
        """Score a task split: predictions.jsonl + run.json in a run folder, then a short summary."""
        import os

        from ._console import console as rich_console

        from .._io import safe_name
        from ..engines import prepare_engine
        from ..errors import DecisionTokenCollisionError
        from .._io import read_json
        from ..evaluation import LEADING_WHITESPACE_BUDGET, PREDICTIONS, RUN_JSON, check_run_folder, evaluate, prompt_lengths
        from ..records import read_records

        if offline:
            # Set before transformers/huggingface_hub read it, so nothing below reaches the network.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
        if batch_size < 1:
            raise typer.BadParameter(f"must be at least 1; got {batch_size}", param_hint="--batch-size")
        if limit is not None and limit < 1:
            raise typer.BadParameter(f"must be at least 1; got {limit}", param_hint="--limit")
        if decision_after_whitespace and reasoning:
            raise typer.BadParameter("is for non-reasoning runs; --reasoning already reads after </think>",
                                     param_hint="--decision-after-whitespace")
        options = engine_options(engine, tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                                 gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                 engine_args=engine_arg, server_urls=server_url, served_model_name=served_model_name,
                                 max_concurrency=max_concurrency, server_timeout=server_timeout,
                                 server_retries=server_retries)
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars would add lines to stderr
        the_task = _load_task(task, split, data_dir=data_dir, reasoning=reasoning)
        if len(the_task) == 0:
            raise ValueError(f"task '{task}' split '{split}' has no examples; nothing to evaluate")
        folder = Path(out) / safe_name(name or run_name(model, task, split, reasoning=reasoning, adapter=adapter))
        # The engine recipe, the model, the adapter, the servers of a remote engine and every
        # prompt's length are checked before any weights load (a vLLM engine takes a minute to start).
        spec = prepare_engine(engine, model, adapter=adapter, dtype=dtype, device=device, options=options,
                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, offline=offline or None,
                              api_key=api_key)
        try:
            ids, lengths = prompt_lengths(spec.tokenizer, the_task, limit=limit)
            reserve = max_new_tokens if reasoning else (LEADING_WHITESPACE_BUDGET if decision_after_whitespace else 1)
            spec.check_prompt_lengths(lengths, reserve=reserve, names=ids)
            # a rerun into the folder with other record settings fails here, before the weights load
            check_run_folder(folder, the_task, engine=spec.engine, dtype=spec.dtype, model_name=model, adapter=adapter,
                             task_name=task, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, limit=limit, decision_after_whitespace=decision_after_whitespace)
            created = _make_run_folder(folder)
        except BaseException:
            spec.release()  # a remote engine's checked connection
            raise
        try:
            with _engine(spec) as scorer:
                evaluate(
                    scorer, None, the_task, out_dir=folder, model_name=model, adapter=adapter, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, limit=limit, progress=progress,
                    task_name=task, decision_after_whitespace=decision_after_whitespace,
                )
        except DecisionTokenCollisionError as e:  # name the task file too (issue #9)
            _discard_if_empty(folder, created)
            raise DecisionTokenCollisionError(f"{task}: field 'labels': {e}") from e
        except BaseException:
            _discard_if_empty(folder, created)
            raise
        records = read_records(folder / PREDICTIONS)
        s = summary_line(records)
        fallbacks = read_json(folder / RUN_JSON).get("fallbacks") or []
        rich_console().print(
            f"{folder}: n={s['n']}  accuracy {100 * s['accuracy']:.1f}%  ECE {100 * s['ece']:.1f}%  "
            f"invalid {100 * s['invalid_rate']:.1f}%  confidence>0.99 {100 * s['overconfidence_ratio']:.1f}%  "
            f"label mass {100 * s['mean_label_mass']:.1f}%"
            + (f"  fallbacks {len(fallbacks)} (see run.json)" if fallbacks else ""),
            soft_wrap=True,
        )
        hint = None if reasoning or decision_after_whitespace else label_mass_hint(records, spec.tokenizer)
        if hint:
            typer.echo(f"warning: {hint}", err=True)
