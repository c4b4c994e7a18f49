"""Tests for the diagnosis experiments (issue #7): rollout confidence spread and reasoning swap."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import pytest

from decal.analysis._common import check_run_config, derive_seed
from decal.analysis.rollouts import RolloutConfig, rollout_rows, rollouts_table, run_rollouts, summarize_rollouts
from decal.analysis.swap import (
    ReasoningParts,
    SwapConfig,
    choose_donor,
    run_swap,
    split_reasoning,
    summarize_swaps,
    swapped_prompt,
    swaps_table,
)
from decal.decision import Decision
from decal.errors import ConfigError
from decal.tasks.builtin import load_builtin

LABELS = ("Safe", "Unsafe")


def _gen(option: int, probs, *, completion="<think>x</think>\nSafe"):
    """A hand-made GeneratedDecision: `option` -1 is an invalid (forced) decision."""
    return SimpleNamespace(
        completion_ids=[1, 2, 3],
        completion=completion,
        decision=Decision(index=2 if option >= 0 else -1, option=option),
        option_probs=list(probs),
        emitted_token=LABELS[option] if option >= 0 else None,
        valid=option >= 0,
        forced=option < 0,
    )


def _example(i: str, label: str):
    return SimpleNamespace(id=i, label=label)


# --- rollouts: counting -------------------------------------------------------------------------


def _hand_rows():
    q1 = rollout_rows(
        _example("q1", "Safe"),
        [_gen(0, [0.995, 0.004]), _gen(0, [0.99, 0.01]), _gen(1, [0.001, 0.999]), _gen(-1, [0.3, 0.2])],
        task="t", split="train", labels=LABELS,
    )
    q2 = rollout_rows(
        _example("q2", "Unsafe"), [_gen(1, [0.2, 0.8]), _gen(1, [0.0, 1.0])], task="t", split="train", labels=LABELS
    )
    return q1 + q2


def test_rollout_rows_fields_and_forced_decision():
    rows = _hand_rows()
    assert [r["id"] for r in rows] == ["q1#0", "q1#1", "q1#2", "q1#3", "q2#0", "q2#1"]
    invalid = rows[3]
    # forced decision: the argmax option, never correct, confidence the largest option prob
    assert invalid["prediction"] == "Safe" and not invalid["valid"] and not invalid["correct"]
    assert invalid["confidence"] == pytest.approx(0.3)
    assert rows[2]["prediction"] == "Unsafe" and rows[2]["confidence"] == pytest.approx(0.999)
    assert not rows[2]["correct"] and rows[0]["correct"]


def test_summarize_rollouts_hand_counts():
    s = summarize_rollouts(_hand_rows(), threshold=0.99)
    # valid: q1#0 (0.995 correct), q1#1 (0.99 correct, not strictly above), q1#2 (0.999 wrong),
    # q2#0 (0.8 correct), q2#1 (1.0 correct); invalid: q1#3
    assert (s["n_queries"], s["n_rollouts"], s["n_valid"], s["n_invalid"]) == (2, 6, 5, 1)
    assert (s["n_correct"], s["n_wrong"]) == (4, 1)
    assert (s["n_above"], s["n_above_correct"], s["n_above_wrong"]) == (3, 2, 1)
    assert s["share_above"] == pytest.approx(3 / 5)
    assert s["share_above_correct"] == pytest.approx(2 / 4)
    assert s["share_above_wrong"] == pytest.approx(1.0)
    assert s["share_above_of_all"] == pytest.approx(3 / 6)
    assert s["invalid_rate"] == pytest.approx(1 / 6)
    per = {q["id"]: q for q in s["per_query"]}
    assert per["q1"]["share_above"] == pytest.approx(2 / 3) and per["q2"]["share_above"] == pytest.approx(1 / 2)
    assert s["mean_query_share"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # the counts add up
    assert s["n_valid"] + s["n_invalid"] == s["n_rollouts"] == sum(q["n"] for q in s["per_query"])
    assert s["n_above_correct"] + s["n_above_wrong"] == s["n_above"]


def test_summarize_rollouts_all_invalid_gives_nan_shares():
    rows = rollout_rows(_example("q", "Safe"), [_gen(-1, [0.5, 0.1])] * 3, task="t", split="s", labels=LABELS)
    s = summarize_rollouts(rows)
    assert s["n_invalid"] == 3 and s["invalid_rate"] == 1.0
    assert math.isnan(s["share_above"]) and math.isnan(s["mean_query_share"])
    assert "n/a" in rollouts_table([("t", s)])


def test_rollouts_table_prints_percent_like_the_paper():
    table = rollouts_table([("openai_moderation", summarize_rollouts(_hand_rows()))])
    assert "| openai_moderation | 2 | 6 | 60.00% | 50.00% | 100.00% | 16.67% | 58.33% |" in table


def test_rollout_config_rejects_bad_values():
    with pytest.raises(ValueError, match="samples"):
        RolloutConfig(samples=0)
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=0.0)
    with pytest.raises(ValueError, match="threshold"):
        RolloutConfig(threshold=1.0)


# --- swap: pure pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, expected",
    [
        ("<think>\nIt is rude.\n</think>\n\n", ReasoningParts("<think>\n", "It is rude.", "\n</think>\n\n")),
        ("It is fine. </think>\n", ReasoningParts("", "It is fine.", " </think>\n")),
        ("  <think>a b</think>", ReasoningParts("  <think>", "a b", "</think>")),
        ("<think>\n\n</think>\n", ReasoningParts("<think>\n\n", "", "</think>\n")),
        ("no marker here", None),
        ("<think>x</think> Safe", None),
    ],
)
def test_split_reasoning(head, expected):
    parts = split_reasoning(head)
    assert parts == expected
    if parts is not None:
        assert parts.opening + parts.reasoning + parts.closing == head


def test_choose_donor_picks_another_label_deterministically():
    candidates = {f"e{i}": LABELS[i % 2] for i in range(20)}
    for rid in ("e0", "e3", "x"):
        pred = candidates.get(rid, "Safe")
        donor = choose_donor(rid, pred, candidates, seed=1)
        assert donor != rid and candidates[donor] != pred
        # same seed, id and candidate set (in any order) -> same donor
        shuffled = dict(reversed(list(candidates.items())))
        assert choose_donor(rid, pred, shuffled, seed=1) == donor
    # the choice varies with the seed (over several seeds, more than one donor is picked)
    assert len({choose_donor("e0", "Safe", candidates, seed=s) for s in range(10)}) > 1
    assert choose_donor("e0", "Safe", {"e0": "Unsafe", "e2": "Safe"}, seed=0) is None


def test_swapped_prompt_holds_question_and_donor_reasoning():
    recipient = {"opening": "<think>\n", "reasoning": "mine", "closing": "\n</think>\n\n"}
    donor = {"reasoning": "It threatens someone."}
    text = swapped_prompt("<user>Is 'hi' safe?</user>", recipient, donor)
    assert text == "<user>Is 'hi' safe?</user><think>\nIt threatens someone.\n</think>\n\n"
    assert "mine" not in text


def test_summarize_swaps_hand_counts():
    greedy = [{"valid": True}] * 4 + [{"valid": False}]
    base = {"swapped": True, "original_prediction": "Safe", "valid": True}
    swaps = [
        {**base, "prediction": "Unsafe", "flipped": True, "confidence": 0.999},
        {**base, "prediction": "Unsafe", "flipped": True, "confidence": 0.7},
        {**base, "prediction": "Safe", "flipped": False, "confidence": 0.95},
        {"swapped": False},
    ]
    s = summarize_swaps(greedy, swaps, min_confidence=0.99)
    assert (s["n_examples"], s["n_greedy_valid"], s["n_greedy_invalid"]) == (5, 4, 1)
    assert (s["n_eligible"], s["n_swapped"], s["n_no_donor"], s["n_flipped"]) == (4, 3, 1, 2)
    assert (s["n_kept"], s["n_other"], s["n_invalid_after"]) == (1, 0, 0)
    assert s["flip_rate"] == pytest.approx(2 / 3)
    assert s["median_flipped_confidence"] == pytest.approx((0.999 + 0.7) / 2)
    assert s["share_flipped_at_or_above"] == pytest.approx(0.5)
    assert "| 66.67% | 0.8495 |" in swaps_table([("t", s)])


def test_run_settings_mismatch_is_refused(tmp_path):
    check_run_config(tmp_path, {"samples": 4, "model": "m"})
    check_run_config(tmp_path, {"samples": 4, "model": "m"})
    with pytest.raises(ConfigError, match="samples: 4 -> 8"):
        check_run_config(tmp_path, {"samples": 8, "model": "m"})


def test_derive_seed_is_stable():
    # a fixed value: the seed must not depend on the process (PYTHONHASHSEED)
    assert derive_seed(0, "train-0001") == int.from_bytes(hashlib.sha256(b"0:train-0001").digest()[:4], "big") & 0x7FFFFFFF
    assert derive_seed(0, "a") != derive_seed(1, "a")
