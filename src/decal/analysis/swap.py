"""Reasoning swap (the paper's Table 3 and Figure 3): does the decision follow someone else's reasoning?

Two phases, each resumable, both through the scoring code of `decal evaluate`:

1. Greedy decoding of every example (`Engine.generate`, temperature 0), one JSON line per
   example in `greedy.jsonl`: its prediction record (`decal.recording`) and the parts below. The text before the decision is split into an
   opening (a leading ``<think>`` and whitespace), the reasoning, and a closing (whitespace,
   the end-of-reasoning marker and the whitespace the model wrote before its decision).
2. For each valid prediction with `confidence >= min_confidence`, a donor is drawn among the
   other examples of the same split whose greedy decision was a different label (and whose
   reasoning is not empty). The swapped prompt is the original prompt + the recipient's
   opening + the donor's reasoning + the recipient's closing, so it has the shape of the
   model's own completion up to its decision position. The closing is the recipient's own
   token ids (the same text re-tokenized in one piece can end in other tokens, and the model's
   next token there is not a decision); one forward pass (`Engine.score`) reads the decision
   there, with the decision tokens found in the swapped text's own context. One JSON line per
   eligible example in `swaps.jsonl`: the record of the decision read there (`decal.recording`)
   and the swap's fields. When the recipient has no closing ids of its own (a forced decision,
   a token shared by reasoning and closing, rows of older runs) the spliced text is encoded in
   one piece, after the check that its decision token sits where it is read; such swaps are
   marked ``scored_on: "one_piece_text"``, counted (`n_scored_one_piece` in the summary,
   `fallback_counts` in `run.json`) and reported in one warning. With `include_invalid`, predictions without a valid decision take part
   too, at their forced decision (docs/design.md, "Forced decision"): the whole completion is their reasoning and the
   marker is appended, which lets the experiment run on models that ignore the format.

The donor is `random.Random(derive_seed(seed, example_id)).choice(sorted candidate ids)`: it
depends only on the seed, the example id and the candidate set, so a resumed run picks the same
donors as an uninterrupted one.

After the swap, the decision is the model's greedy next token: valid when it is an option's
decision token (`decal.recording`'s rule for a read at a fixed position), and then `confidence`
is its full-vocabulary probability; otherwise the record holds the forced decision. A swap
*flipped* when a valid decision is the donor's label. `flip_rate = n_flipped / n_swapped`.

Run folder: `run.json`, `greedy.jsonl`, `swaps.jsonl`, `summary.json`, `table.md`,
`flipped_confidence.png/.svg`.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .._io import read_json, write_json_atomic, write_text_atomic
from ..decision import END_OF_REASONING, check_decision_positions, forced_decision_suffix, option_token_ids
from ..records import check_resume
from ..recording import RunFields, record_from_generation, record_from_scores, record_row
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

__all__ = [
    "SwapConfig",
    "ReasoningParts",
    "prepare_run_folder",
    "split_reasoning",
    "greedy_row",
    "choose_donor",
    "swapped_prompt",
    "summarize_swaps",
    "swaps_table",
    "run_swap",
]

logger = logging.getLogger(__name__)

GREEDY_FILE = "greedy.jsonl"
SWAPS_FILE = "swaps.jsonl"
THINK_OPEN = "<think>"
# `scored_on` of a swap: the recipient's own closing ids, or the spliced text encoded in one piece
_OWN_IDS, _ONE_PIECE = "own_closing_ids", "one_piece_text"


@dataclass(frozen=True, kw_only=True)
class SwapConfig:
    """Settings of a reasoning-swap analysis (paper, Section 4.2)."""

    min_confidence: float = field(default=0.99, metadata={"help": "swap predictions made with at least this confidence"})
    limit: int | None = field(
        default=None, metadata={"help": "use only the first N examples of the split (recipients and donors)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the donor choice"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget of the greedy run"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation / scoring batch"})
    marker: str = field(default=END_OF_REASONING, metadata={"help": "end-of-reasoning marker"})
    include_invalid: bool = field(
        default=False,
        metadata={
            "help": "also swap (and lend the reasoning of) predictions without a valid decision, at their "
            "forced decision (marker appended); for models that do not write the marker"
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 2):
            raise ValueError(f"`limit` must be an integer >= 2 (a swap needs a donor) or None; got {self.limit!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"`min_confidence` must be in [0, 1]; got {self.min_confidence!r}")


@dataclass(frozen=True)
class ReasoningParts:
    """A completion up to its decision, cut in three: `opening + reasoning + closing`.

    opening: text before the reasoning (whitespace and a leading ``<think>``), kept as written.
    reasoning: the reasoning text, without surrounding whitespace.
    closing: whitespace after the reasoning, the marker, and the whitespace before the decision.
    """

    opening: str
    reasoning: str
    closing: str


def split_reasoning(head: str, *, marker: str = END_OF_REASONING) -> ReasoningParts | None:
    """Cut the text before the decision token into opening, reasoning and closing.

    Args:
        head: the completion text up to (not including) the decision token.
        marker: the end-of-reasoning marker.

    Returns:
        The parts, or None when `head` has no marker or non-whitespace text after it.

    Example:
        >>> split_reasoning("<think>\\nIt is rude.\\n</think>\\n\\n")
        ReasoningParts(opening='<think>\\n', reasoning='It is rude.', closing='\\n</think>\\n\\n')
    """
    at = head.find(marker)
    if at < 0 or head[at + len(marker):].strip():
        return None
    before, after = head[:at], head[at:]
    body = before.lstrip()
    opening = before[: len(before) - len(body)]
    if body.startswith(THINK_OPEN):
        opening += THINK_OPEN
        body = body[len(THINK_OPEN):]
    reasoning = body.strip()
    lead = len(body) - len(body.lstrip())
    trail = body[lead + len(reasoning):]
    return ReasoningParts(opening=opening + body[:lead], reasoning=reasoning, closing=trail + after)


def greedy_row(example, generation, tokens, tokenizer, *, run: RunFields, marker: str) -> dict:
    """The JSON-ready row of one greedy generation: its prediction record and its reasoning parts.

    Args:
        example: the `DecisionExample`.
        generation: its `GeneratedDecision` (see `decal.engines`).
        tokens: the example's `DecisionTokens`.
        tokenizer: decodes the completion up to the decision position.
        run: the run's record fields.
        marker: the end-of-reasoning marker.

    Returns:
        A dict with the record fields (`decal.recording`, with `forced`), and `opening`,
        `reasoning`, `closing` (None when the text cannot be cut, see `split_reasoning`) and
        `closing_ids`. For a forced decision the cut is made on the completion with the marker
        appended, as the forced scoring did.
    """
    record = record_from_generation(example, generation, tokens, run=run)
    if generation.decision.index >= 0:
        head = tokenizer.decode(list(generation.completion_ids[: generation.decision.index]), skip_special_tokens=False)
    else:
        head = generation.completion + forced_decision_suffix(generation.completion, marker)
    parts = split_reasoning(head, marker=marker)
    closing_ids = None
    if parts is not None and generation.decision.index >= 0:
        closing_ids = closing_token_ids(list(generation.completion_ids[: generation.decision.index]), parts.closing, tokenizer)
    return record_row(record, **(asdict(parts) if parts else {"opening": None, "reasoning": None, "closing": None}),
                      closing_ids=closing_ids)


def closing_token_ids(head_ids: Sequence[int], closing: str, tokenizer) -> list[int] | None:
    """The model's own token ids of `closing`: the shortest tail of `head_ids` that decodes to it.

    The same text tokenized in one piece can differ from what the model emitted (SmolLM2 writes
    `</think>` then two `\n` tokens; `"...</think>\n\n"` encodes to one `\n\n` token, after which
    its top token is another newline). A swap scores the donor's reasoning followed by these ids,
    so the decision is read at the position the model itself reached.

    Returns:
        The ids, or None when no tail decodes to exactly `closing` (the reasoning and the closing
        share a token); the swap then encodes the text in one piece.
    """
    for k in range(1, len(head_ids) + 1):
        text = tokenizer.decode(list(head_ids[-k:]), skip_special_tokens=False)
        if text == closing:
            return [int(i) for i in head_ids[-k:]]
        if len(text) > len(closing):
            return None
    return None


def choose_donor(example_id: str, prediction: str, candidates: Mapping[str, str], *, seed: int) -> str | None:
    """Pick the donor of a swap: a seeded random candidate whose decision differs from `prediction`.

    Args:
        example_id: the recipient's id (never its own donor).
        prediction: the recipient's greedy decision.
        candidates: donor id -> its greedy decision, for every possible donor of the split.
        seed: the analysis seed.

    Returns:
        The donor id, or None when no candidate decided another label.

    Example:
        >>> choose_donor("a", "Safe", {"a": "Unsafe", "b": "Safe", "c": "Unsafe"}, seed=0)
        'c'
    """
    pool = sorted(i for i, lab in candidates.items() if lab != prediction and i != example_id)
    if not pool:
        return None
    return random.Random(derive_seed(seed, example_id)).choice(pool)


def swapped_prompt(prompt: str, recipient: Mapping, donor: Mapping) -> str:
    """The recipient's prompt and completion shape with the donor's reasoning in place of its own.

    Args:
        prompt: the recipient's rendered prompt.
        recipient, donor: greedy rows (`opening`, `reasoning`, `closing`).
    """
    return f"{prompt}{recipient['opening']}{donor['reasoning']}{recipient['closing']}"


def swapped_ids(tokenizer, prompt: str, recipient: Mapping, donor: Mapping, text: str) -> list[int]:
    """Token ids of `swapped_prompt`: the text up to the donor's reasoning, then the recipient's own
    closing ids (`closing_ids`, see `closing_token_ids`); `text` encoded in one piece when the
    recipient has none (forced decisions, a shared boundary token, records of older runs)."""
    from ..scoring import encode_prompts

    own = recipient.get("closing_ids")
    if not own:
        return encode_prompts(tokenizer, [text])[0]
    head = f"{prompt}{recipient['opening']}{donor['reasoning']}"
    return encode_prompts(tokenizer, [head])[0] + [int(i) for i in own]


def _swap_row(recipient: Mapping, donor: Mapping | None, text: str | None, scores, tokens, *, example,
              run: RunFields, scored_on: str | None) -> dict:
    """A swap's row: the recipient and donor, and, when swapped, the record of the decision read
    after the spliced reasoning (`decal.recording.record_from_scores`) with the flip fields."""
    row = {
        "id": recipient["id"],
        "task": recipient["task"],
        "split": recipient["split"],
        "label": recipient["label"],
        "labels": list(recipient["labels"]),
        "original_prediction": recipient["prediction"],
        "original_confidence": recipient["confidence"],
        "swapped": donor is not None,
        "donor_id": donor["id"] if donor else None,
        "donor_label": donor["prediction"] if donor else None,
    }
    if donor is None:
        return row
    record = record_from_scores(example, scores, tokens, run=run)
    labels, probs = record.labels, record.option_probs
    # The constrained decision (argmax over the options only) tells whether the option preference
    # follows the donor even when the top token is not an option; when it is, the two agree.
    constrained = labels[max(range(len(probs)), key=probs.__getitem__)]
    return record_row(
        record, **row,
        swapped_prompt=text,
        scored_on=scored_on,
        flipped=record.valid and record.prediction == donor["prediction"],
        constrained_prediction=constrained,
        constrained_flipped=constrained == donor["prediction"],
        donor_label_prob=probs[labels.index(donor["prediction"])],
        original_label_prob=probs[labels.index(recipient["prediction"])],
    )


def summarize_swaps(greedy: Sequence[Mapping], swaps: Sequence[Mapping], *, min_confidence: float) -> dict:
    """Table 3 counts: eligible predictions, swaps done, flips, flip rate and flipped confidences.

    Args:
        greedy: all greedy rows of the run.
        swaps: the swap rows of the eligible examples.
        min_confidence: the eligibility threshold that was used.

    Returns:
        A JSON-ready dict: `n_examples, n_greedy_valid, n_greedy_invalid, n_eligible, n_swapped,
        n_no_donor, n_flipped, n_kept (decision unchanged), n_other (another label),
        n_invalid_after, flip_rate, n_flipped_constrained and flip_rate_constrained (the argmax
        over the options is the donor's label, whatever the top token), median_flipped_confidence,
        mean_flipped_confidence,
        share_flipped_at_or_above (flipped with confidence >= min_confidence),
        n_scored_one_piece (swaps scored on the spliced text encoded in one piece, see the module
        docstring), flipped_confidences` (the Figure 3 values). Rates with an empty denominator are nan.
    """
    done = [s for s in swaps if s["swapped"]]
    flipped = [s for s in done if s["flipped"]]
    conf = [float(s["confidence"]) for s in flipped]
    n_valid = sum(1 for g in greedy if g["valid"])
    return {
        "min_confidence": min_confidence,
        "n_examples": len(greedy),
        "n_greedy_valid": n_valid,
        "n_greedy_invalid": len(greedy) - n_valid,
        "n_eligible": len(swaps),
        "n_swapped": len(done),
        "n_no_donor": len(swaps) - len(done),
        "n_flipped": len(flipped),
        "n_kept": sum(1 for s in done if s["valid"] and s["prediction"] == s["original_prediction"]),
        "n_other": sum(
            1 for s in done if s["valid"] and not s["flipped"] and s["prediction"] != s["original_prediction"]
        ),
        "n_invalid_after": sum(1 for s in done if not s["valid"]),
        "flip_rate": fraction(len(flipped), len(done)),
        "n_flipped_constrained": sum(1 for s in done if s["constrained_flipped"]),
        "flip_rate_constrained": fraction(sum(1 for s in done if s["constrained_flipped"]), len(done)),
        "median_flipped_confidence": statistics.median(conf) if conf else float("nan"),
        "mean_flipped_confidence": statistics.fmean(conf) if conf else float("nan"),
        "share_flipped_at_or_above": fraction(sum(c >= min_confidence for c in conf), len(conf)),
        "n_scored_one_piece": sum(1 for s in done if s.get("scored_on") == _ONE_PIECE),
        "flipped_confidences": conf,
    }


def swaps_table(summaries: Sequence[tuple[str, dict]]) -> str:
    """A Table-3-style markdown table, one row per (task name, summary)."""
    if not summaries:
        raise ValueError("`summaries` must hold at least one (task, summary) pair")
    t = summaries[0][1]["min_confidence"]
    lines = [
        f"| task | examples | eligible (conf >= {t}) | swaps done | flipped to donor's label | flip rate "
        f"| median conf. of flipped | invalid after swap |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summaries:
        median = s["median_flipped_confidence"]
        lines.append(
            f"| {name} | {s['n_examples']} | {s['n_eligible']} | {s['n_swapped']} | {s['n_flipped']} "
            f"| {percent(s['flip_rate'])} | {'n/a' if median != median else f'{median:.4f}'} "
            f"| {s['n_invalid_after']} |"
        )
    return "\n".join(lines) + "\n"


def _greedy_phase(engine, prepared: Mapping, path: Path, config: SwapConfig, run: RunFields, progress: bool) -> list[dict]:
    from ..records import RecordWriter, completed_ids

    done = completed_ids(path)
    pending = [p for p in prepared.values() if p.example.id not in done]
    step = engine.call_size(config.batch_size)
    with RecordWriter(path) as writer, progress_bar(len(pending), "greedy", enabled=progress) as advance:
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            generations = engine.generate(
                [p.ids for p in chunk], [p.tokens for p in chunk], num_samples=1, temperature=0.0,
                max_new_tokens=config.max_new_tokens, seed=config.seed, batch_size=config.batch_size, marker=config.marker,
            )
            writer.write_batch(
                greedy_row(p.example, gens[0], p.tokens, engine.tokenizer, run=run, marker=config.marker)
                for p, gens in zip(chunk, generations, strict=True)
            )
            advance(len(chunk))
    by_id = {r["id"]: r for r in read_rows(path)}
    return [by_id[ex_id] for ex_id in prepared]


def _eligible(greedy: Sequence[Mapping], config: SwapConfig) -> list[Mapping]:
    return [
        g for g in greedy
        if (g["valid"] or config.include_invalid) and g["opening"] is not None and g["confidence"] >= config.min_confidence
    ]


def _swap_inputs(tokenizer, chunk, donors, prepared: Mapping, by_id: Mapping):
    """For each recipient with a donor: (spliced text, ids to score, decision tokens, scored_on); None without one.

    The decision tokens are found in the spliced text's own context; a one-piece encoding is
    checked (`check_decision_positions`) before it is scored.
    """
    out = []
    for g, d in zip(chunk, donors, strict=True):
        if d is None:
            out.append(None)
            continue
        prompt = prepared[g["id"]].prompt
        text = swapped_prompt(prompt, g, by_id[d])
        tokens = option_token_ids(tokenizer, g["labels"], context=text)
        ids = swapped_ids(tokenizer, prompt, g, by_id[d], text)
        scored_on = _OWN_IDS if g.get("closing_ids") else _ONE_PIECE
        if scored_on == _ONE_PIECE:
            check_decision_positions(tokenizer, [ids], [text], [tokens], names=[g["id"]])
        out.append((text, ids, tokens, scored_on))
    return out


def _swap_phase(engine, greedy, prepared: Mapping, path: Path, config: SwapConfig, run: RunFields,
                progress: bool) -> list[dict]:
    from ..records import RecordWriter, completed_ids

    by_id = {g["id"]: g for g in greedy}
    # Donors: valid greedy decisions (or any, with include_invalid) with a reasoning to lend.
    candidates = {g["id"]: g["prediction"] for g in greedy if (g["valid"] or config.include_invalid) and g["reasoning"]}
    eligible = _eligible(greedy, config)
    done = completed_ids(path)
    pending = [g for g in eligible if g["id"] not in done]
    step = engine.call_size(config.batch_size)
    with RecordWriter(path) as writer, progress_bar(len(pending), "swaps", enabled=progress) as advance:
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            donors = [choose_donor(g["id"], g["prediction"], candidates, seed=config.seed) for g in chunk]
            inputs = _swap_inputs(engine.tokenizer, chunk, donors, prepared, by_id)
            todo = [x for x in inputs if x is not None]
            if todo:
                engine.check_prompt_lengths([len(ids) for _, ids, _, _ in todo], reserve=1)
            scores = iter(engine.score([ids for _, ids, _, _ in todo], [t for _, _, t, _ in todo],
                                       batch_size=config.batch_size) if todo else [])
            writer.write_batch(
                _swap_row(g, by_id[d], x[0], next(scores), x[2], example=prepared[g["id"]].example, run=run, scored_on=x[3])
                if x is not None else
                _swap_row(g, None, None, None, None, example=prepared[g["id"]].example, run=run, scored_on=None)
                for g, d, x in zip(chunk, donors, inputs, strict=True)
            )
            advance(len(chunk))
    wanted = {g["id"] for g in eligible}
    return [r for r in read_rows(path) if r["id"] in wanted]


def _write_report(out_dir: Path, greedy, swaps, *, task_name: str, settings: dict, min_confidence: float) -> dict:
    summary = {**settings, **summarize_swaps(greedy, swaps, min_confidence=min_confidence)}
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "table.md", swaps_table([(task_name, summary)]))
    save_histogram(
        {"flipped": summary["flipped_confidences"]},
        out_dir / "flipped_confidence",
        title=f"{task_name}: {summary['n_flipped']} flipped predictions",
        xlabel="confidence after the swap (probability of the decision token)",
        threshold=min_confidence,
    )
    return summary


def prepare_run_folder(
    out_dir: str | os.PathLike, task, config: SwapConfig, *, model_name=None, adapter=None, dtype: str | None = None,
    engine=None, write: bool = True,
) -> dict:
    """Check that `out_dir` is new or holds a run with the same settings; returns the settings.

    Called by `run_swap`, and by the CLI before it loads the model, so a wrong folder fails
    fast. The threshold only selects recipients (donors do not depend on it), so it may change
    on a rerun; the limit may not, since it sets the donor candidates.

    Args:
        dtype: the model's weight dtype; None when not known yet (not compared).
        engine: the engine's name, or the engine (see `_common.engine_settings`); None when not
            known yet (not compared).
        write: write `run.json` when missing (False for the CLI's early check).

    Raises:
        ConfigError: `out_dir` holds a run with other settings (the message names them).
    """
    engine_fields, engine_unknown = engine_settings(engine)
    settings = {"analysis": "swap", "task": task.name, "split": task.split, "model": model_name,
                "adapter": adapter, "dtype": dtype, **engine_fields, **asdict(config)}
    check_resume(
        Path(out_dir), {k: v for k, v in settings.items() if k != "min_confidence"},
        write=write, unknown=(("dtype",) if dtype is None else ()) + engine_unknown, legacy=LEGACY_SETTINGS,
    )
    return settings


def run_swap(
    model,
    tokenizer,
    task,
    out_dir: str | os.PathLike,
    *,
    config: SwapConfig = SwapConfig(),
    model_name: str | None = None,
    adapter: str | None = None,
    progress: bool = False,
) -> dict:
    """Run the greedy pass and the reasoning swaps for `task` (resuming from `out_dir`), write the report.

    Args:
        model, tokenizer: an `Engine` (`decal.engines`; tokenizer None or its own), or a
            transformers model and its tokenizer from `decal.models.load_model` (run on the hf engine).
        task: a `Task` loaded with `reasoning=True`; recipients and donors come from it.
        out_dir: run folder; created if needed, resumed if it holds a run with the same settings.
        config: the analysis settings.
        model_name, adapter: recorded in `run.json` and the summary.
        progress: show progress bars on stderr.

    Returns:
        The summary dict (also written to `summary.json`).

    Raises:
        ConfigError: `out_dir` holds a run with other settings.
        ValueError: the task has fewer than two examples.
    """
    from ..engines import as_engine
    from ..recording import prepare_prompts

    engine = as_engine(model, tokenizer)
    out_dir = Path(out_dir)
    examples = list(task.examples[: config.limit])
    if len(examples) < 2:
        raise ValueError(f"task '{task.name}' split '{task.split}' needs at least two examples for swaps; got {len(examples)}")
    settings = prepare_run_folder(out_dir, task, config, model_name=model_name, adapter=adapter, dtype=engine.dtype or None,
                                  engine=engine)
    prepared = {p.example.id: p for p in prepare_prompts(engine.tokenizer, task, examples, marker=config.marker)}
    run = RunFields.of(task, model=model_name, adapter=adapter, seed=config.seed)
    greedy = _greedy_phase(engine, prepared, out_dir / GREEDY_FILE, config, run, progress)
    swaps = _swap_phase(engine, greedy, prepared, out_dir / SWAPS_FILE, config, run, progress)
    logger.info("swap: %d examples, %d eligible, %d swap rows", len(greedy), len(_eligible(greedy, config)), len(swaps))
    summary = _write_report(out_dir, greedy, swaps, task_name=task.name, settings=settings,
                            min_confidence=config.min_confidence)
    _note_one_piece(out_dir, summary)
    return summary


def _note_one_piece(out_dir: Path, summary: dict) -> None:
    """Count the swaps scored on one-piece text in run.json (`fallback_counts`) and warn once about them."""
    n, total = summary["n_scored_one_piece"], summary["n_swapped"]
    meta = read_json(out_dir / "run.json")
    meta["fallback_counts"] = {"swaps_scored_one_piece": n}
    write_json_atomic(out_dir / "run.json", meta)
    if n:
        import warnings

        warnings.warn(
            f"{n} of {total} swaps were scored on the spliced text encoded in one piece (the recipient has no "
            f"closing token ids of its own: forced decisions, or reasoning and closing sharing a token); their "
            f"decision is read after the text's own tokens, not the model's (swaps.jsonl: scored_on)", stacklevel=3,
        )
