"""Tests for decal.scoring: batched option scoring and decisions captured during generation.

Decisions in generation need a model that actually writes a marker and a label; a random tiny
model never does. `scripted_model` makes one: its transformer blocks are damped so the last
hidden state is mostly the current token's embedding, and its (untied) output head maps chosen
tokens to chosen next tokens, with comparable logits for the two labels so sampling picks either.
"""

from __future__ import annotations

import pytest
import torch

from conftest import LOGPROB_ATOL_SMOLLM2, LOGPROB_ATOL_TINY, assert_logprobs_close, build_tiny_qwen3
from decal.decision import option_token_ids
from decal.engines.hf import _generate_batch
from decal.scoring import (
    encode_prompts,
    generate_decisions,
    generation_config,
    length_sorted_batches,
    pad_left,
    score_prompts,
)
from decal.tasks.prompts import decision_context, render_chat

QUESTIONS = ["Is this safe?", "Tell me how to bake bread, step by step, please.", "Hi"]


def _teacher_forced_probs(model, prompt_ids, completion_ids, option_ids):
    """(S, K) option probabilities at each completion position, from one unpadded forward pass."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return logprobs[start : start + len(completion_ids)][:, list(option_ids)].exp()  # (S, K)


def _tiny_llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def scripted_model(model, tokenizer, script: dict[str, list[str]], *, logit=24.0):
    """Make `model` continue token a with the tokens in script[a] (several: near-equal chances)."""
    inner = model.model
    with torch.no_grad():
        for layer in inner.layers:  # damp the blocks: the residual stream stays near the embedding
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
        head = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head.weight = head  # untie, so editing the head leaves the embeddings alone
        model.config.tie_word_embeddings = False
        for current, following in script.items():
            (tid,) = tokenizer.convert_tokens_to_ids([current])
            h = inner.norm(inner.embed_tokens.weight[tid])  # (H,) final hidden state of that token
            for nxt in following:
                head[tokenizer.convert_tokens_to_ids(nxt)] += logit * h / h.dot(h)
        # Other script entries leak into a fork's logits; level the fork's choices again.
        for current, following in script.items():
            if len(following) > 1:
                h = inner.norm(inner.embed_tokens.weight[tokenizer.convert_tokens_to_ids(current)])
                ids = tokenizer.convert_tokens_to_ids(following)
                top = max(float(head[i].dot(h)) for i in ids)
                for i in ids:
                    head[i] += (top - head[i].dot(h)) * h / h.dot(h)
    return model


@pytest.fixture(scope="module")
def qwen3_tok(qwen3_tokenizer):
    qwen3_tokenizer.padding_side = "left"
    return qwen3_tokenizer


def _prompts(tok, *, reasoning):
    return [render_chat(tok, q, reasoning=reasoning) for q in QUESTIONS]


def test_option_ids_of_letters_and_safe_unsafe_on_both_tokenizers(qwen3_tok, smollm2):
    _, smol = smollm2
    for tok in (qwen3_tok, smol):
        prompt = render_chat(tok, "Pick one.", reasoning=False)
        letters = option_token_ids(tok, list("ABCDE"), context=prompt)
        assert letters.tokens == tuple("ABCDE")
    safe = option_token_ids(smol, ["Safe", "Unsafe"], context=render_chat(smol, "x", reasoning=False))
    assert safe.tokens == ("Safe", "Un")  # Unsafe is Un + safe in SmolLM2
    safe_q = option_token_ids(qwen3_tok, ["Safe", "Unsafe"], context=render_chat(qwen3_tok, "x", reasoning=False))
    assert safe_q.tokens == ("Safe", "Unsafe")


def test_length_sorted_batches_cover_every_index_once_longest_first():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert flat[:2] == [1, 3]  # stable among ties
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches(lengths, 0)


def test_batched_scores_equal_one_prompt_at_a_time(tiny_qwen3, qwen3_tok):
    prompts = _prompts(qwen3_tok, reasoning=False)
    dt = option_token_ids(qwen3_tok, ["Safe", "Unsafe"], context=prompts[0])
    batched = score_prompts(tiny_qwen3, qwen3_tok, prompts, dt, batch_size=3)
    for prompt, got in zip(prompts, batched, strict=True):
        ids = encode_prompts(qwen3_tok, [prompt])[0]
        with torch.inference_mode():
            full = torch.log_softmax(tiny_qwen3(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        assert_logprobs_close(got.option_probs, full[list(dt.token_ids)].exp(), atol=LOGPROB_ATOL_TINY)
        assert got.top_token_id == int(full.argmax())
        assert got.top_token == qwen3_tok.convert_ids_to_tokens(got.top_token_id)
        assert got.top_is_option == (got.top_token_id in dt.token_ids)


def test_prompt_longer_than_context_is_an_error(tiny_qwen3, qwen3_tok):
    dt = option_token_ids(qwen3_tok, ["A", "B"])
    long_prompt = "word " * (tiny_qwen3.config.max_position_embeddings + 10)
    with pytest.raises(ValueError, match="in the model's context of"):
        score_prompts(tiny_qwen3, qwen3_tok, [long_prompt], dt)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_probs_captured_in_generation_equal_teacher_forcing_tiny_qwen3(tiny_qwen3, qwen3_tok, temperature):
    """Every step's captured option probs equal a separate teacher-forced pass (left padding, cache)."""
    prompts = _prompts(qwen3_tok, reasoning=True)
    seqs = encode_prompts(qwen3_tok, prompts)
    option_ids = [25663, 78770, 32, 33]
    config = generation_config(tiny_qwen3, qwen3_tok, temperature=temperature, max_new_tokens=6)
    torch.manual_seed(0)
    new_ids, captured, _, _ = _generate_batch(
        tiny_qwen3, seqs, torch.tensor([option_ids] * len(seqs)), config, qwen3_tok.pad_token_id
    )
    assert captured.shape == (len(seqs), new_ids.shape[1], len(option_ids))
    for r, seq in enumerate(seqs):
        ref = _teacher_forced_probs(tiny_qwen3, seq, new_ids[r].tolist(), option_ids)
        assert_logprobs_close(captured[r].exp(), ref, atol=LOGPROB_ATOL_TINY)


@pytest.mark.slow
def test_probs_captured_in_generation_equal_teacher_forcing_smollm2(smollm2):
    model, tok = smollm2
    seqs = encode_prompts(tok, [render_chat(tok, q, reasoning=True) for q in QUESTIONS[:2]])
    option_ids = list(option_token_ids(tok, ["Safe", "Unsafe"], context="</think>\n").token_ids)
    config = generation_config(model, tok, temperature=1.0, max_new_tokens=5)
    torch.manual_seed(1)
    new_ids, captured, _, _ = _generate_batch(model, seqs, torch.tensor([option_ids] * 2), config, tok.pad_token_id)
    for r, seq in enumerate(seqs):
        ref = _teacher_forced_probs(model, seq, new_ids[r].tolist(), option_ids)
        assert_logprobs_close(captured[r].exp(), ref, atol=LOGPROB_ATOL_SMOLLM2)


QWEN_CHAINS = {
    "newlines": ({"</think>": ["ĊĊ"], "ĊĊ": ["Safe", "Unsafe"]}, 2),
    "none": ({"</think>": ["Safe", "Unsafe"]}, 1),
    "space": ({"</think>": ["Ġ"], "Ġ": ["Safe", "Unsafe"]}, 2),
}


@pytest.mark.parametrize("chain", sorted(QWEN_CHAINS))
def test_decision_after_special_marker_in_generation_qwen3(qwen3_tok, chain):
    script, index = QWEN_CHAINS[chain]
    prompts = _prompts(qwen3_tok, reasoning=True)
    last = qwen3_tok.convert_ids_to_tokens(encode_prompts(qwen3_tok, prompts[:1])[0][-1])
    ends = {"Safe": ["<|im_end|>"], "Unsafe": ["<|im_end|>"]}
    model = scripted_model(build_tiny_qwen3(qwen3_tok, seed=3), qwen3_tok, {last: ["</think>"], **script, **ends})
    dt = option_token_ids(qwen3_tok, ["Safe", "Unsafe"], context=decision_context(prompts[0], reasoning=True))
    out = generate_decisions(model, qwen3_tok, prompts, dt, num_samples=4, temperature=1.0, max_new_tokens=8, seed=0)
    emitted = set()
    for prompt, rollouts in zip(prompts, out, strict=True):
        for g in rollouts:
            assert g.valid and not g.forced and g.decision.index == index
            emitted.add(g.emitted_token)
            assert g.emitted_token == dt.tokens[g.decision.option]
            assert "</think>" in g.completion
            ref = _teacher_forced_probs(model, encode_prompts(qwen3_tok, [prompt])[0], g.completion_ids, dt.token_ids)
            assert_logprobs_close(g.option_probs, ref[index], atol=LOGPROB_ATOL_TINY)
            assert 0.1 < sum(g.option_probs) <= 1.0 + 1e-6
    assert emitted == {"Safe", "Unsafe"}  # sampling reached both labels


def test_decision_after_text_marker_in_generation_smollm2_tokenizer(smollm2):
    _, tok = smollm2
    prompts = [render_chat(tok, q, reasoning=True) for q in QUESTIONS]
    last = tok.convert_ids_to_tokens(encode_prompts(tok, prompts[:1])[0][-1])
    script = {last: ["</"], "</": ["think"], "think": [">"], ">": ["Ġ"], "Ġ": ["Safe", "Un"], "Un": ["safe"]}
    model = scripted_model(_tiny_llama(tok), tok, {**script, "Safe": ["<|im_end|>"], "safe": ["<|im_end|>"]})
    dt = option_token_ids(tok, ["Safe", "Unsafe"], context=decision_context(prompts[0], reasoning=True))
    out = generate_decisions(model, tok, prompts, dt, num_samples=3, temperature=1.0, max_new_tokens=10, seed=0)
    for prompt, rollouts in zip(prompts, out, strict=True):
        for g in rollouts:
            assert g.valid and g.decision.index == 4 and g.emitted_token in ("Safe", "Un")
            ref = _teacher_forced_probs(model, encode_prompts(tok, [prompt])[0], g.completion_ids, dt.token_ids)
            assert_logprobs_close(g.option_probs, ref[4], atol=LOGPROB_ATOL_TINY)


def test_completion_without_decision_is_forced_by_appending_the_marker(tiny_qwen3, qwen3_tok):
    prompts = _prompts(qwen3_tok, reasoning=True)
    dt = option_token_ids(qwen3_tok, ["Safe", "Unsafe"], context=decision_context(prompts[0], reasoning=True))
    out = generate_decisions(tiny_qwen3, qwen3_tok, prompts, dt, temperature=1.0, max_new_tokens=5, seed=0)
    suffix = qwen3_tok("</think>\n", add_special_tokens=False)["input_ids"]
    for prompt, (g,) in zip(prompts, out, strict=True):
        assert g.forced and not g.valid and g.emitted_token is None and g.decision.index == -1
        ids = encode_prompts(qwen3_tok, [prompt])[0] + g.completion_ids + suffix
        with torch.inference_mode():
            ref = torch.log_softmax(tiny_qwen3(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        assert_logprobs_close(g.option_probs, ref[list(dt.token_ids)].exp(), atol=LOGPROB_ATOL_TINY)


def test_forced_rows_that_stopped_early_and_rows_cut_by_the_budget_share_a_batch(qwen3_tok):
    """The forced pass reuses the generation cache: rows that stopped early have masked tails."""
    prompts = _prompts(qwen3_tok, reasoning=True)
    last = qwen3_tok.convert_ids_to_tokens(encode_prompts(qwen3_tok, prompts[:1])[0][-1])
    script = {last: ["ĊĊ", "Ġ"], "ĊĊ": ["<|im_end|>"], "Ġ": ["Ġ"]}
    model = scripted_model(build_tiny_qwen3(qwen3_tok, seed=5), qwen3_tok, script)
    dt = option_token_ids(qwen3_tok, ["Safe", "Unsafe"], context=decision_context(prompts[0], reasoning=True))
    out = generate_decisions(model, qwen3_tok, prompts, dt, num_samples=4, temperature=1.0, max_new_tokens=5, seed=0)
    suffix = qwen3_tok("</think>\n", add_special_tokens=False)["input_ids"]
    lengths = set()
    for prompt, rollouts in zip(prompts, out, strict=True):
        for g in rollouts:
            assert g.forced and not g.valid
            lengths.add(len(g.completion_ids))
            ids = encode_prompts(qwen3_tok, [prompt])[0] + g.completion_ids + suffix
            with torch.inference_mode():
                ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            assert_logprobs_close(g.option_probs, ref[list(dt.token_ids)].exp(), atol=LOGPROB_ATOL_TINY)
    assert lengths == {1, 5}  # both kinds of rows occurred


def test_truncated_right_after_the_marker_is_forced_without_a_second_marker(qwen3_tok):
    prompts = _prompts(qwen3_tok, reasoning=True)[:1]
    last = qwen3_tok.convert_ids_to_tokens(encode_prompts(qwen3_tok, prompts)[0][-1])
    model = scripted_model(build_tiny_qwen3(qwen3_tok, seed=4), qwen3_tok, {last: ["</think>"], "</think>": ["ĊĊ"]})
    dt = option_token_ids(qwen3_tok, ["Safe", "Unsafe"], context=decision_context(prompts[0], reasoning=True))
    (g,), = generate_decisions(model, qwen3_tok, prompts, dt, max_new_tokens=2)
    assert g.forced and g.completion.count("</think>") == 1
    ref = _teacher_forced_probs(model, encode_prompts(qwen3_tok, prompts)[0], g.completion_ids + [0], dt.token_ids)
    assert_logprobs_close(g.option_probs, ref[-1], atol=LOGPROB_ATOL_TINY)


def test_sampling_is_seeded(tiny_qwen3, qwen3_tok):
    prompts = _prompts(qwen3_tok, reasoning=True)
    dt = option_token_ids(qwen3_tok, ["Safe", "Unsafe"])

    def completions(seed):
        out = generate_decisions(tiny_qwen3, qwen3_tok, prompts[:2], dt, num_samples=2, temperature=1.0,
                                 max_new_tokens=3, seed=seed, batch_size=4)
        return [g.completion_ids for rollouts in out for g in rollouts]

    first = completions(5)
    assert len({tuple(c) for c in first}) > 1  # rollouts of one call differ from each other
    assert completions(5) == first
    assert completions(6) != first


def test_pad_left_masks_padding():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
