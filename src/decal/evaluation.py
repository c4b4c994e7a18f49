"""Evaluation runs: score a task split into a run folder that resumes after any interruption.

A run folder holds:

- ``run.json``: model, adapter, task, split, mode, seed, generation settings, the inference
  engine (`engine`, `engine_version`, `engine_options`; `decal.engines`), library versions
  (decal, torch, transformers, trl, peft), the git revision when known, and sha256 checksums of
  the data files read;
- ``predictions.jsonl``: one prediction record per example (DESIGN.md), appended, flushed and
  fsynced per batch.

Decision after leading whitespace (issue #23 item 4). Some models start their answer with
whitespace or a header (users report "\n\n" as Llama Guard 3's first token under some chat
templates), so the first position after the prompt is not where they decide, and its label mass
is near 0. With ``decision_after_whitespace`` a non-reasoning run generates greedily up to
`LEADING_WHITESPACE_BUDGET` tokens and reads the option distribution at the first one that is
not whitespace (`decal.decision.find_decision` with an empty marker); the prediction is still
the constrained argmax there, ``extra["decision_index"]`` says how many tokens came before it
(``extra["forced"]``: none of the budget was anything but whitespace, read after the last).

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
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from ._io import read_json, write_json_atomic
from .decision import END_OF_REASONING, DecisionTokens, option_token_ids
from .errors import ConfigError, DataError
from .records import PredictionRecord, RecordWriter, completed_ids
from .engines import Engine, as_engine
from .engines.base import length_sorted_batches, prompt_seeds
from .scoring import encode_prompts
from .tasks.prompts import decision_context, render_chat
from .tasks.schema import DecisionExample, Task

__all__ = ["make_record", "run_metadata", "data_checksums", "prompt_lengths", "evaluate", "PREDICTIONS", "RUN_JSON",
           "LEADING_WHITESPACE_BUDGET"]

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN_JSON = "run.json"
# Examples tokenized at a time, in batches: bounds memory whatever the split size.
_CHUNK_BATCHES = 32
# run.json fields that must match for a rerun to resume into the same folder.
_RESUME_KEYS = ("model", "adapter", "task", "split", "mode", "seed", "temperature", "max_new_tokens", "prompt_version", "limit",
                "engine", "decision_after_whitespace")
# Tokens generated at most to find the first non-whitespace one (module docstring).
LEADING_WHITESPACE_BUDGET = 8


def make_record(
    example: DecisionExample,
    *,
    task: str,
    split: str,
    option_probs: Sequence[float],
    emitted_option: int | None = None,
    valid: bool = True,
    emitted_token: str | None = None,
    completion: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    seed: int | None = None,
    prompt_version: str | None = None,
    top_token: str | None = None,
    top_is_option: bool | None = None,
    seconds: float | None = None,
    extra: dict | None = None,
) -> PredictionRecord:
    """The one place that turns an example and its option distribution into a prediction record.

    Args:
        example: the decision example (gives id, labels, gold label).
        option_probs: (K,) full-vocabulary probabilities of the options' decision tokens.
        emitted_option: reasoning mode: the option index the model emitted at the decision
            position (-1 or None when it emitted none). None in non-reasoning mode, where the
            prediction is the constrained argmax of `option_probs`.
        valid: False when there was no valid decision (DESIGN.md): then `correct` is False and
            the confidence is the largest option probability (the forced decision).

    Returns:
        A `PredictionRecord`: confidence is the probability of the emitted (or argmax) option;
        `true_probs` is the example's, when its task knows them.
    """
    probs = [float(p) for p in option_probs]
    if len(probs) != len(example.labels):
        raise ValueError(f"`option_probs` must have {len(example.labels)} values; got {len(probs)}")
    argmax = max(range(len(probs)), key=probs.__getitem__)
    chosen = emitted_option if (valid and emitted_option is not None and emitted_option >= 0) else argmax
    valid = bool(valid and (emitted_option is None or emitted_option >= 0))
    prediction = example.labels[chosen]
    return PredictionRecord(
        id=str(example.id),
        task=task,
        split=split,
        label=example.label,
        prediction=prediction,
        correct=bool(valid and prediction == example.label),
        valid=valid,
        # Clipped: exp of a float32 log-softmax can exceed 1 by one ulp.
        confidence=min(1.0, probs[chosen]),
        option_probs=[min(1.0, p) for p in probs],
        labels=list(example.labels),
        true_probs=None if example.true_probs is None else [float(p) for p in example.true_probs],
        emitted_token=emitted_token,
        completion=completion,
        model=model,
        adapter=adapter,
        seed=seed,
        prompt_version=prompt_version,
        top_token=top_token,
        top_is_option=top_is_option,
        seconds=seconds,
        extra=dict(extra or {}),
    )


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
                 model=None) -> dict:
    """The contents of ``run.json`` (see the module docstring); `model` is the `Engine` (or a
    transformers model) that scores, whose engine name, version and options are recorded."""
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
        "batch_size": int(batch_size),
        "limit": limit,
        "prompt_version": task.template.version,
        "dtype": dtype,
        "dtype_reason": getattr(model, "dtype_reason", None)
        or getattr(getattr(model, "decal_dtype", None), "reason", None),
        **engine,
        "n_examples": len(task) if limit is None else min(limit, len(task)),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "data_sha256": data_checksums(task, task_name),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_resumable(out_dir: Path, meta: dict) -> None:
    path = out_dir / RUN_JSON
    if not path.exists():
        return
    old = read_json(path)
    old.setdefault("engine", "hf")  # runs from before engines existed were scored by transformers
    for key in _RESUME_KEYS:
        if old.get(key) != meta.get(key):
            raise ConfigError(
                f"{out_dir} holds a run with {key}={old.get(key)!r}, but this run has {key}={meta.get(key)!r}; "
                f"rerun with the same settings to resume, or choose another --out"
            )
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


class _DecisionTokenCache:
    """Decision tokens per prompt ending, computed once per distinct ending.

    Only the last characters before the label can merge with it under BPE, so the ending is the
    key; the cache holds at most `max_size` endings so memory stays bounded (#9d).
    """

    def __init__(self, tokenizer, labels: Sequence[str], *, reasoning: bool, marker: str, max_size: int = 256):
        self.tokenizer, self.labels, self.reasoning, self.marker = tokenizer, tuple(labels), reasoning, marker
        self.max_size = max_size
        self._cache: OrderedDict[str, DecisionTokens] = OrderedDict()

    def __call__(self, prompt: str) -> DecisionTokens:
        context = decision_context(prompt, reasoning=self.reasoning, marker=self.marker)
        key = context[-32:]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tokens = option_token_ids(self.tokenizer, self.labels, context=context)
        self._cache[key] = tokens
        if len(self._cache) > self.max_size:
            self._cache.popitem(last=False)
        return tokens


def _score_batch(engine: Engine, task: Task, examples, sequences, tokens, *, settings: dict, batch_seed):
    """Score one batch (or several joined, see `_score_chunk`) whole; returns one record per example,
    in order. `batch_seed` is the batch's seed, or one seed per example."""
    start = time.perf_counter()
    common = {
        "task": task.name,
        "split": task.split,
        "model": settings["model_name"],
        "adapter": settings["adapter"],
        "seed": settings["seed"],
        "prompt_version": task.template.version,
    }
    if not task.reasoning and settings.get("decision_after_whitespace"):
        return _score_after_whitespace(engine, examples, sequences, tokens, common, start)
    if not task.reasoning:
        scores = engine.score(sequences, tokens, batch_size=len(sequences))
        seconds = (time.perf_counter() - start) / len(examples)
        records = []
        for ex, score, dt in zip(examples, scores, tokens):
            argmax = max(range(len(score.option_probs)), key=score.option_probs.__getitem__)
            records.append(make_record(
                ex, option_probs=score.option_probs, emitted_token=dt.tokens[argmax], top_token=score.top_token,
                top_is_option=score.top_is_option, seconds=seconds, **common,
            ))
        return records
    rollouts = engine.generate(
        sequences, tokens, num_samples=1, temperature=settings["temperature"],
        max_new_tokens=settings["max_new_tokens"], seed=batch_seed, batch_size=len(sequences), marker=settings["marker"],
    )
    seconds = (time.perf_counter() - start) / len(examples)
    records = []
    for ex, (g,) in zip(examples, rollouts):
        records.append(make_record(
            ex, option_probs=g.option_probs, emitted_option=g.decision.option, valid=g.valid,
            emitted_token=g.emitted_token, completion=g.completion, seconds=seconds,
            extra={"decision_index": g.decision.index, "forced": g.forced, "n_completion_tokens": len(g.completion_ids)},
            **common,
        ))
    return records


def _score_after_whitespace(engine: Engine, examples, sequences, tokens, common: dict, start: float):
    """Non-reasoning records read at the first generated token that is not whitespace (module docstring)."""
    rollouts = engine.generate(sequences, tokens, num_samples=1, temperature=0.0, max_new_tokens=LEADING_WHITESPACE_BUDGET,
                               seed=0, batch_size=len(sequences), marker="")
    seconds = (time.perf_counter() - start) / len(examples)
    records = []
    for ex, (g,) in zip(examples, rollouts):
        # Greedy: the token emitted at the decision position is the unconstrained argmax there.
        at = len(g.completion_ids) if g.forced else g.decision.index
        records.append(make_record(
            ex, option_probs=g.option_probs, emitted_token=g.emitted_token, top_token=g.emitted_token,
            top_is_option=g.valid, seconds=seconds, extra={"decision_index": at, "forced": g.forced}, **common,
        ))
    return records


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
                 settings: dict, tokens_for, reserve: int, advance) -> None:
    """Score one chunk batch by batch, writing each batch's missing ids; its locals die on return."""
    if len({ex.id for ex in chunk}) != len(chunk):
        raise DataError(f"task '{task.name}' split '{task.split}' has duplicate ids; ids must be unique")
    prompts = [render_chat(engine.tokenizer, task.user_message(ex), reasoning=task.reasoning) for ex in chunk]
    sequences = encode_prompts(engine.tokenizer, prompts)
    engine.check_prompt_lengths([len(s) for s in sequences], reserve=reserve, names=[ex.id for ex in chunk])
    tokens = [tokens_for(p) for p in prompts]
    del prompts
    batches = length_sorted_batches([len(s) for s in sequences], settings["batch_size"])
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
        records = _score_batch(
            engine, task, [chunk[i] for i in rows], [sequences[i] for i in rows], [tokens[i] for i in rows],
            settings=settings, batch_seed=batch_seed,
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
        ConfigError: `out_dir` holds a run with other settings.
        ValueError: a prompt longer than the model's context, or bad settings.
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
                        limit=limit, model=engine)
    if decision_after_whitespace:  # only then, so runs without it keep resuming as before
        meta["decision_after_whitespace"] = True
    _check_resumable(out_dir, meta)
    write_json_atomic(out_dir / RUN_JSON, meta)
    done = completed_ids(out_dir / PREDICTIONS)
    settings = {"model_name": model_name, "adapter": meta["adapter"], "seed": seed, "temperature": temperature,
                "max_new_tokens": max_new_tokens, "marker": marker, "batch_size": batch_size,
                "decision_after_whitespace": decision_after_whitespace}
    tokens_for = _DecisionTokenCache(engine.tokenizer, task.labels, reasoning=task.reasoning, marker=marker)
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
            _score_chunk(engine, task, chunk, c, done=done, writer=writer, settings=settings,
                         tokens_for=tokens_for, reserve=reserve, advance=lambda k: bar.advance(bar_task, k))
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(out_dir / RUN_JSON, meta)
    return out_dir
