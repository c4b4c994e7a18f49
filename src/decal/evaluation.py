"""Evaluation runs: score a task split into a run folder that resumes after any interruption.

A run folder holds:

- ``run.json``: model, adapter, task, split, mode, seed, generation settings, the inference
  engine (`engine`, `engine_version`, `engine_options`; `decal.engines`), library versions
  (decal, torch, transformers, trl, peft), the git revision when known, and sha256 checksums of
  the data files read;
- ``predictions.jsonl``: one prediction record per example (docs/design.md), built by
  `decal.recording`, appended, flushed and fsynced per batch.

A rerun resumes only when every setting that can change a record is the one in ``run.json``
(`records.check_resume`, the analyses' rule too): model, adapter, task and its data checksums,
split, mode, seed, temperature, max new tokens, batch size (the per-batch seeds and the padding
depend on it), limit (it cuts the last chunk), prompt version, dtype, engine, engine options, the
end-of-reasoning marker, what the engine fell back on (`fallbacks`), and
`decision_after_whitespace`.

Decision after leading whitespace (issue #23 item 4). With ``decision_after_whitespace`` a
non-reasoning run reads each decision at the first generated token that is not whitespace
(`decal.recording`, greedy, at most `LEADING_WHITESPACE_BUDGET` tokens); ``run.json`` records the
setting, and it is one of the record settings a rerun must match.

Resuming (issue #3, #9a). The examples are cut into fixed chunks in task order, and each chunk
into batches grouped by length; both depend only on the task and the batch size, never on what
is already done. A rerun skips batches whose ids are all written and rescores any other batch
whole (writing only its missing ids), with the batch's own seed. A resumed run therefore
produces records identical to an uninterrupted one, and `records.completed_ids` drops a line
torn by a crash, so no id is lost or doubled. Memory stays flat in the number of examples: only
one chunk is tokenized at a time and records go straight to disk (#9d).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path

from ._io import read_json, write_json_atomic
from .decision import END_OF_REASONING
from .errors import DataError
from .records import RecordWriter, check_resume, completed_ids
from .engines import Engine, as_engine
from .engines.base import length_sorted_batches, prompt_seeds
from .recording import LEADING_WHITESPACE_BUDGET, RunFields, prepare_prompts, score_records
from .scoring import encode_prompts
from .tasks.prompts import render_chat
from .tasks.schema import Task

__all__ = ["run_metadata", "resume_settings", "check_run_folder", "data_checksums", "prompt_lengths", "evaluate",
           "PREDICTIONS", "RUN_JSON", "LEADING_WHITESPACE_BUDGET"]

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN_JSON = "run.json"
# Examples tokenized at a time, in batches: bounds memory whatever the split size.
_CHUNK_BATCHES = 32
# run.json fields that can change a record: a rerun must match them all to resume (module docstring).
_RECORD_SETTINGS = ("model", "adapter", "task", "task_spec", "split", "mode", "seed", "temperature", "max_new_tokens",
                    "batch_size", "limit", "prompt_version", "dtype", "engine", "engine_options", "marker", "fallbacks",
                    "decision_after_whitespace")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_checksums(task: Task, task_name: str | None = None) -> dict[str, str]:
    """sha256 of the data files a task was read from: {path: hex digest}.

    Asks the task first (a `data_files` or `source_files` attribute, or a `data_checksums()`
    method, when the task layer provides one); otherwise hashes `task_name` when it is a local
    file. Generated tasks read no files and give {}.
    """
    method = getattr(task, "data_checksums", None)
    if callable(method):
        return dict(method())
    files = getattr(task, "data_files", None) or getattr(task, "source_files", None) or ()
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [Path(f) for f in files]
    if not paths and task_name and Path(task_name).is_file():
        paths = [Path(task_name)]
    return {str(p): _sha256(p) for p in paths if p.is_file()}


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("decal", "torch", "transformers", "trl", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def run_metadata(task: Task, *, model_name: str, adapter: str | None, task_name: str | None, seed: int,
                 temperature: float, max_new_tokens: int, batch_size: int, limit: int | None,
                 model=None, marker: str = END_OF_REASONING, decision_after_whitespace: bool = False) -> dict:
    """The contents of ``run.json`` (see the module docstring); `model` is the `Engine` (or a
    transformers model) that scores, whose engine name, version, options and fallbacks are recorded."""
    if isinstance(model, Engine):
        dtype, engine = model.dtype or None, model.info()
    else:
        dtype = str(getattr(model, "dtype", "")).replace("torch.", "") or None
        engine = {"engine": "hf", "engine_version": f"transformers {_versions().get('transformers')}", "engine_options": {}}
    return {
        "model": model_name,
        "adapter": None if adapter is None else str(adapter),
        "task": task.name,
        "task_spec": task_name or task.name,
        "split": task.split,
        "mode": "reasoning" if task.reasoning else "non-reasoning",
        "seed": int(seed),
        "temperature": float(temperature) if task.reasoning else None,
        "max_new_tokens": int(max_new_tokens) if task.reasoning else None,
        "marker": marker if task.reasoning else None,
        "decision_after_whitespace": bool(decision_after_whitespace),
        "batch_size": int(batch_size),
        "limit": limit,
        "prompt_version": task.template.version,
        "dtype": dtype,
        "dtype_reason": getattr(model, "dtype_reason", None)
        or getattr(getattr(model, "decal_dtype", None), "reason", None),
        **engine,
        "fallbacks": list(getattr(model, "fallbacks", ())),
        "n_examples": len(task) if limit is None else min(limit, len(task)),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "data_sha256": data_checksums(task, task_name),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def resume_settings(meta: dict) -> dict:
    """The settings of a ``run.json`` that can change a record (module docstring), as compared on a rerun.

    The data files count by their checksums alone, so a dataset read from another folder resumes.
    """
    out = {k: meta[k] for k in _RECORD_SETTINGS if k in meta}
    if "data_sha256" in meta:
        out["data_sha256"] = sorted(meta["data_sha256"].values())
    return out


def _check_settings(out_dir: Path, meta: dict, *, unknown: tuple[str, ...] = ()) -> None:
    """Refuse a rerun with other record settings (`records.check_resume`, one line)."""
    # what runs written before a setting was recorded used
    legacy = {"engine": "hf", "engine_options": {}, "fallbacks": [], "decision_after_whitespace": False,
              "marker": END_OF_REASONING if meta["mode"] == "reasoning" else None}
    check_resume(out_dir, resume_settings(meta), write=False, unknown=unknown, legacy=legacy, project=resume_settings)


def check_run_folder(out_dir: str | os.PathLike, task: Task, *, engine: str, dtype: str, model_name: str,
                     adapter: str | None, task_name: str | None, seed: int, temperature: float, max_new_tokens: int,
                     batch_size: int, limit: int | None, marker: str = END_OF_REASONING,
                     decision_after_whitespace: bool = False) -> None:
    """`decal evaluate`'s early resume check, before any weights load: every record setting the
    engine recipe already fixes (`engine` name, resolved `dtype`); the engine options and
    fallbacks are compared once the engine is built (`evaluate`).

    Raises:
        ConfigError: `out_dir` holds a run with other settings.
    """
    meta = run_metadata(task, model_name=model_name, adapter=adapter, task_name=task_name, seed=seed,
                        temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
                        marker=marker, decision_after_whitespace=decision_after_whitespace)
    meta.update(engine=engine, dtype=dtype)
    _check_settings(Path(out_dir), meta, unknown=("engine_options", "fallbacks"))


def _check_resumable(out_dir: Path, meta: dict) -> None:
    """Refuse a rerun with other record settings; keep the first run's versions and start time."""
    _check_settings(out_dir, meta)
    path = out_dir / RUN_JSON
    if not path.exists():
        return
    old = read_json(path)
    # Library versions may differ between the interrupted run and the rerun; keep both.
    if old.get("versions") != meta.get("versions"):
        meta.setdefault("resumed_with_versions", meta["versions"])
        meta["versions"] = old.get("versions")
    meta["started"] = old.get("started", meta["started"])


def _batch_seed(seed: int, chunk: int, batch: int) -> int:
    import numpy as np

    # Each batch its own seed, a function of its position only, so a resumed batch samples the
    # same completions as in the uninterrupted run.
    return int(np.random.SeedSequence([int(seed), chunk, batch]).generate_state(1)[0])


def _progress(enabled: bool, total: int, description: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=False,
    )


def prompt_lengths(tokenizer, task: Task, *, limit: int | None = None) -> tuple[list[str], list[int]]:
    """(ids, prompt lengths in tokens) of a task's examples, as `evaluate` renders and tokenizes them.

    Lets a caller check the prompts against an engine's context before any weights load; only one
    chunk of prompts is held at a time.
    """
    examples = task.examples if limit is None else task.examples[:limit]
    ids, lengths = [], []
    step = 256
    for start in range(0, len(examples), step):
        chunk = examples[start : start + step]
        prompts = [render_chat(tokenizer, task.user_message(ex), reasoning=task.reasoning) for ex in chunk]
        ids += [str(ex.id) for ex in chunk]
        lengths += [len(s) for s in encode_prompts(tokenizer, prompts)]
    return ids, lengths


def _score_chunk(engine: Engine, task: Task, chunk, chunk_index: int, *, done: set, writer: RecordWriter,
                 settings: dict, run: RunFields, reserve: int, advance) -> None:
    """Score one chunk batch by batch, writing each batch's missing ids; its locals die on return."""
    if len({ex.id for ex in chunk}) != len(chunk):
        raise DataError(f"task '{task.name}' split '{task.split}' has duplicate ids; ids must be unique")
    prepared = prepare_prompts(engine.tokenizer, task, chunk, marker=settings["marker"])
    engine.check_prompt_lengths([len(p.ids) for p in prepared], reserve=reserve, names=[ex.id for ex in chunk])
    batches = length_sorted_batches([len(p.ids) for p in prepared], settings["batch_size"])
    seeds = [_batch_seed(settings["seed"], chunk_index, b) for b in range(len(batches))]
    # An engine that schedules its own batches (vLLM) gets several batches per call; each prompt
    # keeps the seed it has when its batch is scored alone, so records do not depend on the grouping.
    per_call = max(1, engine.call_size(settings["batch_size"]) // settings["batch_size"])
    todo = [b for b, batch in enumerate(batches) if any(chunk[i].id not in done for i in batch)]
    advance(sum(len(batch) for b, batch in enumerate(batches) if b not in set(todo)))
    for start in range(0, len(todo), per_call):
        group = todo[start : start + per_call]
        rows = [i for b in group for i in batches[b]]
        batch_seed = seeds[group[0]] if len(group) == 1 else [
            s for b in group for s in prompt_seeds(seeds[b], len(batches[b]))
        ]
        records = score_records(
            engine, [prepared[i] for i in rows], run=run, reasoning=task.reasoning, temperature=settings["temperature"],
            max_new_tokens=settings["max_new_tokens"], seed=batch_seed, marker=settings["marker"],
            decision_after_whitespace=settings["decision_after_whitespace"],
        )
        at = 0
        for b in group:
            batch = batches[b]
            writer.write_batch([r for i, r in zip(batch, records[at : at + len(batch)]) if chunk[i].id not in done])
            at += len(batch)
            advance(len(batch))


def evaluate(
    model,
    tokenizer,
    task: Task,
    *,
    out_dir: str | os.PathLike,
    model_name: str,
    adapter: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    task_name: str | None = None,
    marker: str = END_OF_REASONING,
    decision_after_whitespace: bool = False,
) -> Path:
    """Score a task split into `out_dir` (``predictions.jsonl`` + ``run.json``), resuming if begun.

    Args:
        model, tokenizer: an `Engine` (`decal.engines`; tokenizer None or its own), or a
            transformers model and its tokenizer from `decal.models.load_model` (run on the hf engine).
        task: the split to score; `task.reasoning` picks the mode.
        out_dir: the run folder; created if missing.
        model_name, adapter: recorded in every record and in ``run.json``.
        batch_size: examples per forward pass (non-reasoning) or per generate call (reasoning).
        max_new_tokens, temperature: reasoning mode only; temperature 0 is greedy.
        seed: seeds sampling, per batch (see the module docstring).
        limit: score only the first `limit` examples.
        progress: show a rich progress bar on stderr.
        task_name: the task spec or file the task came from (for ``run.json`` checksums).
        marker: the end-of-reasoning marker.
        decision_after_whitespace: non-reasoning only: read the decision at the first generated
            token that is not whitespace (module docstring), not at the first position.

    Returns:
        `out_dir` as a Path.

    Raises:
        DataError: an empty split or duplicate ids in a chunk.
        ConfigError: `out_dir` holds a run with other record settings (`resume_settings`).
        DecisionPositionError: a prompt whose decision token would not be read where it sits.
        PromptTooLongError: a prompt longer than the model's context.
        ValueError: bad settings.
    """
    engine = as_engine(model, tokenizer)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1; got {batch_size!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be at least 1; got {limit!r}")
    examples = task.examples if limit is None else task.examples[:limit]
    if not examples:
        raise DataError(f"task '{task.name}' split '{task.split}' has no examples; nothing to evaluate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if decision_after_whitespace and task.reasoning:
        raise ValueError("`decision_after_whitespace` is for non-reasoning runs; reasoning already reads after </think>")
    meta = run_metadata(task, model_name=model_name, adapter=adapter, task_name=task_name, seed=seed,
                        temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        limit=limit, model=engine, marker=marker, decision_after_whitespace=decision_after_whitespace)
    _check_resumable(out_dir, meta)
    write_json_atomic(out_dir / RUN_JSON, meta)
    done = completed_ids(out_dir / PREDICTIONS)
    settings = {"seed": seed, "temperature": temperature, "max_new_tokens": max_new_tokens, "marker": marker,
                "batch_size": batch_size, "decision_after_whitespace": decision_after_whitespace}
    run = RunFields.of(task, model=model_name, adapter=meta["adapter"], seed=seed)
    reserve = max_new_tokens if task.reasoning else (LEADING_WHITESPACE_BUDGET if decision_after_whitespace else 1)
    chunk_size = batch_size * _CHUNK_BATCHES
    logger.info("evaluating %d examples (%d already done) into %s", len(examples), len(done), out_dir)
    with RecordWriter(out_dir / PREDICTIONS) as writer, _progress(progress, len(examples), "") as bar:
        bar_task = bar.add_task(f"{task.name}/{task.split}", total=len(examples), completed=0)
        for c, start in enumerate(range(0, len(examples), chunk_size)):
            if c > 0:
                # Forward passes leave a little cyclic garbage that reaches Python's oldest GC
                # generation, which is collected rarely; one collection per chunk keeps memory
                # flat in the number of examples (#9d) for a negligible cost.
                gc.collect()
            chunk = examples[start : start + chunk_size]
            if all(ex.id in done for ex in chunk):
                bar.advance(bar_task, len(chunk))
                continue
            _score_chunk(engine, task, chunk, c, done=done, writer=writer, settings=settings, run=run,
                         reserve=reserve, advance=lambda k: bar.advance(bar_task, k))
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(out_dir / RUN_JSON, meta)
    return out_dir
