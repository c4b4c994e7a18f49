"""The verdicts task: stored truth equals the formula, labels follow it, splits, rationale, specs."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from decal.decision import option_token_ids
from decal.tasks import list_tasks, load_task
from decal.tasks.prompts import decision_context, render_chat
from decal.tasks.verdicts import VARIANTS, VERDICTS_SPLITS, load_verdicts


def _kinds(text: str, variant: str) -> list[int]:
    """Each verdict's kind (+1, -1, 0), read back from the text with the variant's lexicon."""
    lexicon = {w: k for k, words in VARIANTS[variant].words.items() for w in words}
    return [lexicon[w] for w in text.split(", ")]


@pytest.mark.parametrize("variant", ["in", "ood"])
def test_stored_probabilities_equal_the_formula(variant):
    n_verdicts = {"in": 5, "ood": 7}[variant]
    for split in VERDICTS_SPLITS:
        for ex in load_verdicts(split, variant=variant):
            kinds = _kinds(ex.input, variant)
            assert len(kinds) == n_verdicts
            expected = 1.0 / (1.0 + math.exp(-(kinds.count(1) - kinds.count(-1))))  # sigmoid(#pos - #neg)
            assert ex.true_probs[0] == pytest.approx(expected, abs=5e-7)
            assert sum(ex.true_probs) == pytest.approx(1.0, abs=1e-12)
            assert ex.labels == ("Positive", "Negative") and ex.label in ex.labels


def test_label_frequencies_match_the_stored_probabilities_in_20000_draws():
    # 20 seeds x 1,000 train examples; per distinct true probability, the share of Positive labels
    # must be within 4 binomial standard errors of it.
    groups: dict[float, list[bool]] = collections.defaultdict(list)
    for seed in range(20):
        for ex in load_verdicts("train", seed=seed):
            groups[ex.true_probs[0]].append(ex.label == "Positive")
    assert sum(len(v) for v in groups.values()) == 20_000
    checked = 0
    for p, labels in groups.items():
        n = len(labels)
        if n < 100:
            continue
        se = math.sqrt(p * (1 - p) / n)
        assert abs(np.mean(labels) - p) <= 4 * se + 1e-12, (p, n, np.mean(labels))
        checked += 1
    assert checked >= 9  # sigmoid(k) for k = -4..4 all have enough draws


@pytest.mark.parametrize("spec", ["verdicts", "verdicts:variant=ood"])
def test_bayes_accuracy_and_spread_of_the_true_probabilities(spec):
    for split in VERDICTS_SPLITS:
        p = np.array([ex.true_probs[0] for ex in load_task(spec, split)])
        best = np.maximum(p, 1 - p)
        assert 0.75 <= best.mean() <= 0.85, (split, best.mean())
        assert best.min() == 0.5 and best.max() > 0.97


def test_splits_disjoint_stable_and_pinned():
    texts = {split: [ex.input for ex in load_task("verdicts", split)] for split in VERDICTS_SPLITS}
    assert all(len(set(t)) == len(t) for t in texts.values())
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])
    assert load_task("verdicts", "test").examples == load_task("verdicts", "test").examples
    # Pinned so a change of the generator (which would change every measured number) is seen.
    first = load_task("verdicts", "train").examples[:2]
    assert [(ex.id, ex.input, ex.label, ex.true_probs) for ex in first] == [
        ("train-0000", "fine, poor, poor, excellent, lovely", "Negative", (0.5, 0.5)),
        ("train-0001", "okay, terrible, terrible, average, awful", "Negative", (0.047426, 0.952574)),
    ]


def test_spec_string_keywords_n_prefix_and_seed():
    spec = load_task("verdicts:variant=ood,seed=3,n=20", "validation")
    kw = load_verdicts("validation", variant="ood", seed=3, n=20)
    assert spec.examples == kw.examples and len(spec) == 20
    assert spec.examples == load_verdicts("validation", variant="ood", seed=3).examples[:20]
    assert [ex.input for ex in load_task("verdicts:seed=1", "train")] != [ex.input for ex in load_task("verdicts", "train")]


def test_ood_variant_uses_other_words():
    in_words = {w for ex in load_task("verdicts", "train") for w in ex.input.split(", ")}
    ood_words = {w for ex in load_task("verdicts:variant=ood", "test") for w in ex.input.split(", ")}
    assert not in_words & ood_words


def test_rationale_names_each_sign_and_the_counts():
    for ex in load_task("verdicts", "validation", n=50):
        kinds = _kinds(ex.input, "in")
        marks, counts = ex.reasoning.split(": ")
        assert marks == ", ".join(f"{w} {'+' if k == 1 else '-' if k == -1 else '0'}" for w, k in zip(ex.input.split(", "), kinds, strict=True))
        assert counts == f"{kinds.count(1)} positive, {kinds.count(-1)} negative."


@pytest.mark.parametrize(
    "kwargs, match",
    [({"variant": "hard"}, "variant"), ({"n": 0}, "`n`"), ({"n": 1001}, "`n`"), ({"seed": -1}, "seed")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_verdicts("train", **kwargs)


def test_unknown_split_option_and_listing():
    with pytest.raises(ValueError, match="split"):
        load_task("verdicts", "dev")
    with pytest.raises(ValueError, match="Did you mean: variant"):
        load_task("verdicts:varient=ood", "train")
    info = next(i for i in list_tasks() if i.name == "verdicts")
    assert info.splits == VERDICTS_SPLITS and info.labels == ("Positive", "Negative")


def test_other_tasks_carry_no_truth():
    assert all(ex.true_probs is None and ex.reasoning is None for ex in load_task("builtin", "test", n=20))


def test_labels_single_token_qwen3(qwen3_tokenizer):
    for reasoning in (False, True):
        task = load_task("verdicts:variant=ood", "test", reasoning=reasoning, n=20)
        prompt = render_chat(qwen3_tokenizer, task.user_message(task.examples[0]), reasoning=reasoning)
        tokens = option_token_ids(qwen3_tokenizer, task.labels, context=decision_context(prompt, reasoning=reasoning))
        for label, tid in zip(task.labels, tokens.token_ids, strict=True):
            assert qwen3_tokenizer(label, add_special_tokens=False)["input_ids"] == [tid]
        assert max(len(qwen3_tokenizer(task.user_message(ex))["input_ids"]) for ex in task) < 90


def test_tasks_show_prints_the_truth_and_the_rationale(capsys):
    from decal.cli import main

    assert main(["tasks", "show", "verdicts", "--split", "train", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "gold Negative  true Positive 0.5, Negative 0.5" in out
    assert "(warm-start rationale: fine 0, poor -, poor -, excellent +, lovely +: 2 positive, 2 negative.)" in out
