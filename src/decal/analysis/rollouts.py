"""Rollout confidence spread (the paper's Table 2): how many sampled rollouts decide with p > 0.99.

For each query, `samples` completions are drawn at `temperature` with the scoring code of
`decal evaluate` (`Engine.generate` of `decal.engines`); each rollout is a prediction record built
by `decal.recording` (the rules of `decal evaluate`), written as one JSON line in `rollouts.jsonl`
with the rollout's own fields (`id` "<query>#<sample>", `example_id`, `sample`) beside it.

Confidence is the paper's: the full-vocabulary probability of the decision token the model
emitted after the end-of-reasoning marker. A rollout without a valid decision (no marker, no
option token, truncated) is kept and counted as invalid; its recorded confidence is the forced
one (docs/design.md, "Forced decision"), but it is left out of the "share above" figures, which need an emitted
decision token. So, with `n_valid + n_invalid = n_rollouts` and `n_correct + n_wrong = n_valid`:

- `share_above = n_above / n_valid`, and the same among correct and among wrong rollouts;
- `share_above_of_all = n_above / n_rollouts` (invalid rollouts counted as not above);
- per query, `share_above` over its valid rollouts; `mean_query_share` averages it over the
  queries that have at least one valid rollout.

"Above" is strict (`confidence > threshold`), as in the paper.

Run folder: `run.json` (settings; a rerun with other settings is refused), `rollouts.jsonl`
(append-only, a whole query per write; an interrupted run resumes at the first query that
lacks any of its samples),
`summary.json`, `table.md`, `rollout_confidence.png/.svg`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .._io import write_json_atomic, write_text_atomic
from ..decision import END_OF_REASONING
from ..records import check_resume
from ..recording import RunFields, record_from_generation, record_row
from ._common import (
    LEGACY_SETTINGS,
    engine_settings,
    derive_seed,
    fraction,
    percent,
    progress_bar,
    read_rows,
    save_histogram,
)

__all__ = ["RolloutConfig", "prepare_run_folder", "rollout_rows", "summarize_rollouts", "rollouts_table", "run_rollouts"]

logger = logging.getLogger(__name__)

ROLLOUTS_FILE = "rollouts.jsonl"


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Settings of a rollout analysis; the defaults are the paper's (Section 4.1)."""

    samples: int = field(default=64, metadata={"help": "completions sampled per query (paper: 64)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (paper: 1.0)"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget per completion"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N queries of the split"})
    seed: int = field(default=0, metadata={"help": "base seed; each query samples with a seed derived from it and its id"})
    threshold: float = field(default=0.99, metadata={"help": "a rollout counts as overconfident when confidence > threshold"})
    batch_size: int = field(default=8, metadata={"help": "sequences per generation batch"})
    marker: str = field(default=END_OF_REASONING, metadata={"help": "end-of-reasoning marker"})

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"`limit` must be a positive integer or None; got {self.limit!r}")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0 for sampling; got {self.temperature!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"`threshold` must be in [0, 1); got {self.threshold!r}")


def rollout_rows(example, generations: Sequence, tokens, *, run: RunFields) -> list[dict]:
    """One JSON-ready row per sampled completion of one query: its prediction record and the
    rollout's fields.

    Args:
        example: the `DecisionExample`.
        generations: the query's `GeneratedDecision`s (one per sample).
        tokens: the query's `DecisionTokens` (those the rollouts were decided with).
        run: the run's record fields.

    Returns:
        Rows with id `"{example_id}#{sample}"`, `example_id` and `sample`, and the record fields of
        `decal.recording` (an invalid rollout has its forced decision, `correct` False).
    """
    return [
        record_row(record_from_generation(example, gen, tokens, run=run), id=f"{example.id}#{sample}",
                   example_id=example.id, sample=sample)
        for sample, gen in enumerate(generations)
    ]


def _query_stats(rows: Sequence[dict], threshold: float) -> list[dict]:
    by_query: dict[str, dict] = {}
    for row in rows:
        q = by_query.setdefault(
            row["example_id"],
            {"id": row["example_id"], "label": row["label"], "n": 0, "n_valid": 0, "n_correct": 0, "n_above": 0},
        )
        q["n"] += 1
        if row["valid"]:
            q["n_valid"] += 1
            q["n_correct"] += bool(row["correct"])
            q["n_above"] += row["confidence"] > threshold
    for q in by_query.values():
        q["share_above"] = fraction(q["n_above"], q["n_valid"])
    return list(by_query.values())


def summarize_rollouts(rows: Sequence[dict], *, threshold: float = 0.99) -> dict:
    """Counts and shares of overconfident rollouts (see the module docstring for definitions).

    Args:
        rows: rollout rows as written by `rollout_rows`.
        threshold: "above" means `confidence > threshold`.

    Returns:
        A JSON-ready dict: `n_queries, n_rollouts, n_valid, n_invalid, n_correct, n_wrong,
        n_above, n_above_correct, n_above_wrong, share_above, share_above_correct,
        share_above_wrong, share_above_of_all, n_invalid_above, share_above_forced (invalid
        rollouts whose forced confidence is above), invalid_rate, accuracy, mean_query_share,
        per_query` (one entry per query: `id, label, n, n_valid, n_correct, n_above,
        share_above`). Shares with an empty denominator are nan.
    """
    valid = [r for r in rows if r["valid"]]
    correct = [r for r in valid if r["correct"]]
    wrong = [r for r in valid if not r["correct"]]

    def above(group: Sequence[dict]) -> int:
        return sum(1 for r in group if r["confidence"] > threshold)

    per_query = _query_stats(rows, threshold)
    shares = [q["share_above"] for q in per_query if not math.isnan(q["share_above"])]
    n_above = above(valid)
    invalid = [r for r in rows if not r["valid"]]
    return {
        "threshold": threshold,
        "n_queries": len(per_query),
        "n_rollouts": len(rows),
        "n_valid": len(valid),
        "n_invalid": len(rows) - len(valid),
        "n_correct": len(correct),
        "n_wrong": len(wrong),
        "n_above": n_above,
        "n_above_correct": above(correct),
        "n_above_wrong": above(wrong),
        "share_above": fraction(n_above, len(valid)),
        "share_above_correct": fraction(above(correct), len(correct)),
        "share_above_wrong": fraction(above(wrong), len(wrong)),
        "share_above_of_all": fraction(n_above, len(rows)),
        "n_invalid_above": above(invalid),
        "share_above_forced": fraction(above(invalid), len(invalid)),
        "invalid_rate": fraction(len(rows) - len(valid), len(rows)),
        "accuracy": fraction(len(correct), len(rows)),
        "mean_query_share": sum(shares) / len(shares) if shares else float("nan"),
        "per_query": per_query,
    }


def rollouts_table(summaries: Sequence[tuple[str, dict]]) -> str:
    """A Table-2-style markdown table, one row per (task name, summary)."""
    if not summaries:
        raise ValueError("`summaries` must hold at least one (task, summary) pair")
    t = summaries[0][1]["threshold"]
    lines = [
        f"| task | queries | rollouts | share p>{t} (all) | share p>{t} (correct) | share p>{t} (wrong) "
        f"| invalid rate | mean per-query share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summaries:
        lines.append(
            f"| {name} | {s['n_queries']} | {s['n_rollouts']} | {percent(s['share_above'])} "
            f"| {percent(s['share_above_correct'])} | {percent(s['share_above_wrong'])} "
            f"| {percent(s['invalid_rate'])} | {percent(s['mean_query_share'])} |"
        )
    lines.append("")
    lines.append(
        f"Shares are over rollouts with a valid decision ({summaries[0][1]['n_valid']} of "
        f"{summaries[0][1]['n_rollouts']} in the first row); invalid rollouts are counted in the invalid rate."
    )
    return "\n".join(lines) + "\n"


def _write_report(out_dir: Path, rows: list[dict], *, task_name: str, settings: dict, threshold: float) -> dict:
    summary = summarize_rollouts(rows, threshold=threshold)
    summary = {**settings, **summary}
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "table.md", rollouts_table([(task_name, summary)]))
    valid = [r for r in rows if r["valid"]]
    save_histogram(
        {
            "correct": [r["confidence"] for r in valid if r["correct"]],
            "wrong": [r["confidence"] for r in valid if not r["correct"]],
            "invalid (forced)": [r["confidence"] for r in rows if not r["valid"]],
        },
        out_dir / "rollout_confidence",
        title=f"{task_name}: {len(rows)} rollouts ({len(valid)} valid)",
        xlabel="confidence (probability of the emitted decision token)",
        threshold=threshold,
    )
    return summary


def prepare_run_folder(
    out_dir: str | os.PathLike, task, config: RolloutConfig, *, model_name=None, adapter=None, dtype: str | None = None,
    engine=None, write: bool = True,
) -> dict:
    """Check that `out_dir` is new or holds a run with the same settings; returns the settings.

    Called by `run_rollouts`, and by the CLI before it loads the model, so a wrong folder fails
    fast. The threshold only changes the report and a larger limit extends the run, so neither
    makes an existing folder incompatible.

    Args:
        dtype: the model's weight dtype; None when not known yet (not compared).
        engine: the engine's name, or the engine (see `_common.engine_settings`); None when not
            known yet (not compared).
        write: write `run.json` when missing (False for the CLI's early check).

    Raises:
        ConfigError: `out_dir` holds a run with other settings (the message names them).
    """
    engine_fields, engine_unknown = engine_settings(engine)
    settings = {"analysis": "rollouts", "task": task.name, "split": task.split, "model": model_name,
                "adapter": adapter, "dtype": dtype, **engine_fields, **asdict(config)}
    check_resume(
        Path(out_dir), {k: v for k, v in settings.items() if k not in ("threshold", "limit")},
        write=write, unknown=(("dtype",) if dtype is None else ()) + engine_unknown, legacy=LEGACY_SETTINGS,
    )
    return settings


def run_rollouts(
    model,
    tokenizer,
    task,
    out_dir: str | os.PathLike,
    *,
    config: RolloutConfig = RolloutConfig(),
    model_name: str | None = None,
    adapter: str | None = None,
    progress: bool = False,
) -> dict:
    """Sample rollouts for every query of `task` (resuming from `out_dir`) and write the report.

    Args:
        model, tokenizer: an `Engine` (`decal.engines`; tokenizer None or its own), or a
            transformers model and its tokenizer from `decal.models.load_model` (run on the hf engine).
        task: a `Task` loaded with `reasoning=True`.
        out_dir: run folder; created if needed, resumed if it holds a run with the same settings.
        config: the analysis settings.
        model_name, adapter: recorded in `run.json` and the summary.
        progress: show a progress bar on stderr.

    Returns:
        The summary dict (also written to `summary.json`).

    Raises:
        ConfigError: `out_dir` holds a run with other settings.
        ValueError: the task has no examples.
    """
    from ..engines import as_engine
    from ..records import RecordWriter, completed_ids
    from ..recording import prepare_prompts

    engine = as_engine(model, tokenizer)
    out_dir = Path(out_dir)
    examples = list(task.examples[: config.limit])
    if not examples:
        raise ValueError(f"task '{task.name}' split '{task.split}' has no examples")
    settings = prepare_run_folder(out_dir, task, config, model_name=model_name, adapter=adapter, dtype=engine.dtype or None,
                                  engine=engine)
    prepared = {p.example.id: p for p in prepare_prompts(engine.tokenizer, task, examples, marker=config.marker)}
    run = RunFields.of(task, model=model_name, adapter=adapter, seed=config.seed)
    path = out_dir / ROLLOUTS_FILE
    done = completed_ids(path)
    # A query counts as done only with all its samples: a crash inside one batch write can
    # leave some of its lines; the query is then sampled again (same seed, same rows) and the
    # report keeps one row per id.
    pending = [ex for ex in examples if any(f"{ex.id}#{s}" not in done for s in range(config.samples))]
    logger.info("rollouts: %d queries, %d already done", len(examples), len(examples) - len(pending))
    # Queries per engine call: one on the hf engine; vLLM takes many at once and schedules them
    # itself (all of a query's samples in one request, so its prompt is prefilled once).
    per_call = max(1, engine.call_size(config.batch_size) // config.batch_size)
    with RecordWriter(path) as writer, progress_bar(len(pending), "rollouts", enabled=progress) as advance:
        for start in range(0, len(pending), per_call):
            group = pending[start : start + per_call]
            # Each query samples with a seed derived from its id, so a resumed run samples
            # exactly what an uninterrupted one would (issue #7, item 3).
            generations = engine.generate(
                [prepared[ex.id].ids for ex in group], [prepared[ex.id].tokens for ex in group],
                num_samples=config.samples, temperature=config.temperature,
                max_new_tokens=config.max_new_tokens, seed=[derive_seed(config.seed, ex.id) for ex in group],
                batch_size=config.batch_size, marker=config.marker,
            )
            for ex, gens in zip(group, generations, strict=True):
                writer.write_batch(rollout_rows(ex, gens, prepared[ex.id].tokens, run=run))
                advance(1)
    wanted = {ex.id for ex in examples}
    rows = list({r["id"]: r for r in read_rows(path) if r["example_id"] in wanted}.values())
    return _write_report(out_dir, rows, task_name=task.name, settings=settings, threshold=config.threshold)
