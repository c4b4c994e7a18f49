"""The GRPO reward agrees with the evaluation parser (issue #5 item 3) on hand-made completions."""

from __future__ import annotations

import pytest

from decal.decision import find_decision, option_token_ids
from decal.training.rewards import DecisionReward, decision_reward, parse_decision, stop_token_ids

# Completions as the model would emit them after a Qwen3 reasoning prompt (text after the prompt).
COMPLETIONS = {
    "correct": ("<think>\nThe answer is clearly B.\n</think>\n\nB<|im_end|>", 1.0),
    "wrong": ("<think>\nMaybe C.\n</think>\n\nC<|im_end|>", 0.0),
    "no_marker": ("I think the answer is B.<|im_end|>", 0.0),
    "truncated_before_marker": ("<think>\nLet me think about B and", 0.0),
    "truncated_after_marker": ("<think>\nB.\n</think>\n\n", 0.0),
    "not_an_option": ("<think>\nB.\n</think>\n\nThe answer is B<|im_end|>", 0.0),
    "after_eos": ("<think>\nB.\n</think><|im_end|>B", 0.0),
}


@pytest.fixture(scope="module")
def letters(qwen3_tokenizer):
    context = "<|im_start|>assistant\n<think>\n...\n</think>\n\n"
    return option_token_ids(qwen3_tokenizer, list("ABCDE"), context=context)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(COMPLETIONS))
def test_reward_agrees_with_evaluation_parser(qwen3_tokenizer, letters, name):
    text, expected = COMPLETIONS[name]
    ids = _ids(qwen3_tokenizer, text)
    reward = decision_reward(ids, "B", qwen3_tokenizer, letters, reasoning=True)
    stops = stop_token_ids(qwen3_tokenizer)
    parsed = find_decision(ids, qwen3_tokenizer, letters, marker="</think>", stop_ids=stops)
    assert reward == expected
    assert reward == float(parsed.valid and parsed.option == letters.labels.index("B"))


def test_reward_of_gold_index_equals_reward_of_gold_label(qwen3_tokenizer, letters):
    ids = _ids(qwen3_tokenizer, COMPLETIONS["correct"][0])
    assert decision_reward(ids, 1, qwen3_tokenizer, letters, reasoning=True) == 1.0
    assert decision_reward(ids, 2, qwen3_tokenizer, letters, reasoning=True) == 0.0


def test_non_reasoning_reward_reads_the_first_token(qwen3_tokenizer, letters):
    assert decision_reward(_ids(qwen3_tokenizer, "B<|im_end|>"), "B", qwen3_tokenizer, letters, reasoning=False) == 1.0
    assert decision_reward(_ids(qwen3_tokenizer, " B"), "B", qwen3_tokenizer, letters, reasoning=False) == 0.0
    assert decision_reward([], "B", qwen3_tokenizer, letters, reasoning=False) == 0.0


def test_parse_decision_position_points_at_the_label(qwen3_tokenizer, letters):
    ids = _ids(qwen3_tokenizer, COMPLETIONS["correct"][0])
    d = parse_decision(ids, qwen3_tokenizer, letters, reasoning=True)
    assert d.valid and ids[d.index] == qwen3_tokenizer.convert_tokens_to_ids("B")


def test_unknown_gold_label_is_an_error(qwen3_tokenizer, letters):
    with pytest.raises(ValueError, match="not one of the options"):
        decision_reward([1, 2], "Z", qwen3_tokenizer, letters, reasoning=True)


def test_trl_reward_callable_returns_rewards_and_keeps_decisions(qwen3_tokenizer, letters):
    reward = DecisionReward(qwen3_tokenizer, letters, reasoning=True)
    names = sorted(COMPLETIONS)
    batch = [_ids(qwen3_tokenizer, COMPLETIONS[n][0]) for n in names]
    out = reward(prompts=["p"] * len(names), completions=["c"] * len(names), completion_ids=batch, label=["B"] * len(names))
    assert out == [COMPLETIONS[n][1] for n in names]
    assert len(reward.last_decisions) == len(names) and reward.last_gold == [1] * len(names)
    assert reward.__name__ == "decision_reward"
