"""Tests for `--engine remote` under faults, against real vLLM OpenAI servers of the CPU build (issue #21).

Two replicas of the tiny random Qwen3 (real Qwen3 tokenizer) run as processes on free loopback ports
(`decal.engines.vllm.LocalServer`), behind an API key, once per module: one replica SIGKILLed mid-run
and the run completes with the records of an uninterrupted one; then every replica down, the run
stops in one line, and the rerun resumes; the key reaches the servers and no file decal writes holds
it. Log-probabilities are compared at the tiny Qwen3's float32 bound (tests/conftest.py, 2e-5).
SmolLM2's remote tests are in tests/test_remote.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import LOGPROB_ATOL_TINY, max_logprob_gap

from decal.engines import EngineOptions, prepare_engine
from decal.tasks import load_task

pytestmark = pytest.mark.slow

API_KEY = "decal-test-key-7f3a9c"


def _remote(urls, model, **kw):
    extra = {"server_urls": list(urls), **kw.pop("extra", {})}
    return prepare_engine("remote", model, options=EngineOptions(extra=extra), **kw)


# --- two replicas of the tiny Qwen3, behind an API key: faults ---------------------------------------


@pytest.fixture(scope="module")
def tiny_servers(tmp_path_factory, tiny_qwen3_32_dir):
    from decal.engines.vllm import LocalServer

    folder = tmp_path_factory.mktemp("vllm-tiny")
    servers = [LocalServer(str(tiny_qwen3_32_dir), log_path=folder / f"server-{i}.log", api_key=API_KEY, dtype="float32",
                           options=EngineOptions(max_model_len=1024, extra={"kv_cache_memory_bytes": 1 << 28}))
               for i in range(2)]
    try:
        for s in servers:
            s.launch()
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every folder the fault tests let decal write into (scanned for the API key at the end)."""
    return tmp_path_factory.mktemp("remote-runs")


# The fault runs: 6 batches of 8 reasoning prompts, 40 new tokens each, long enough that a replica is
# killed mid-run and a run is stopped after its first batch (at 32 x 32 the runs ended before the kills
# on a loaded 2-core machine).
FAULT_N, FAULT_TOKENS = 48, 40


def _evaluate_argv(urls, model, out, name, *extra):
    argv = ["evaluate", "--engine", "remote", "--model", str(model), "--task", "builtin", "--split", "test",
            "--limit", str(FAULT_N), "--batch-size", "8", "--reasoning", "--max-new-tokens", str(FAULT_TOKENS), "--out", str(out),
            "--name", name, "--no-progress", *extra]
    for url in urls:
        argv += ["--server-url", url]
    return argv


def _records(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}), "an id was written twice"
    return {r["id"]: r for r in rows}


def _assert_same_records(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for i, r in ref.items():
        g = got[i]
        assert (g["completion"], g["prediction"], g["valid"]) == (r["completion"], r["prediction"], r["valid"]), i
        assert max_logprob_gap([g["option_probs"]], [r["option_probs"]]) < LOGPROB_ATOL_TINY


@pytest.fixture(scope="module")
def uninterrupted(tiny_servers, tiny_qwen3_32_dir, written, monkeypatch_module):
    from decal.cli import main

    monkeypatch_module.setenv("DECAL_SERVER_API_KEY", API_KEY)
    assert main(_evaluate_argv([s.url for s in tiny_servers], tiny_qwen3_32_dir, written, "uninterrupted")) == 0
    return _records(written / "uninterrupted")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_one_replica_killed_mid_run_the_run_completes_with_the_same_records(tiny_servers, tiny_qwen3_32_dir, written,
                                                                            uninterrupted):
    from decal.evaluation import evaluate

    task = load_task("builtin", "test", reasoning=True)
    spec = _remote([s.url for s in tiny_servers], str(tiny_qwen3_32_dir), extra={"max_concurrency": 1})
    with spec.build() as engine:
        victim = engine.fleet.replicas[0]

        def kill_when_busy():
            while victim.inflight == 0:
                time.sleep(0.001)
            time.sleep(0.05)
            tiny_servers[0].kill()

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        evaluate(engine, None, task, out_dir=written / "killed", model_name=str(tiny_qwen3_32_dir), limit=FAULT_N,
                 batch_size=8, max_new_tokens=FAULT_TOKENS, progress=False)
        killer.join(timeout=5)
        assert victim.last_error, "the replica finished its request before it was killed"
        assert engine.fleet.replicas[1].sent > victim.sent
    _assert_same_records(_records(written / "killed"), uninterrupted)


def test_every_replica_down_stops_in_one_line_and_the_rerun_resumes(tiny_servers, tiny_qwen3_32_dir, written,
                                                                    uninterrupted, capsys):
    from decal.cli import main

    dead, last = tiny_servers
    dead.kill()  # already dead after the previous test, when it ran
    argv = _evaluate_argv([dead.url, last.url], tiny_qwen3_32_dir, written, "down", "--max-concurrency", "1",
                          "--server-retries", "2")
    predictions = written / "down" / "predictions.jsonl"

    def kill_after_first_records():
        while not (predictions.exists() and predictions.read_text().count("\n") >= 8):
            time.sleep(0.01)
        last.kill()

    killer = threading.Thread(target=kill_after_first_records, daemon=True)
    killer.start()
    assert main(argv) == 1
    killer.join(timeout=5)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    # the dead replica could not be checked at the start, so the run used the other one only
    assert "the server failed after 3 attempts" in errors[0] and last.url in errors[0]
    assert "rerun the same command to resume" in errors[0]
    assert all(line.startswith("warning: server ") for line in err[:-1]), err  # one per server that went down
    partial = _records(written / "down")
    assert 8 <= len(partial) < FAULT_N
    last.start()
    assert main(argv) == 0
    _assert_same_records(_records(written / "down"), uninterrupted)


def test_the_api_key_reaches_the_servers_and_no_file_decal_writes_holds_it(tiny_servers, tiny_qwen3_32_dir, written,
                                                                           uninterrupted, capsys, caplog,
                                                                           monkeypatch):
    from decal.cli import main

    live = [s for s in tiny_servers if s.proc is not None and s.proc.poll() is None]
    assert live
    urls = [s.url for s in live]
    monkeypatch.delenv("DECAL_SERVER_API_KEY")
    with caplog.at_level("DEBUG"):
        assert main(_evaluate_argv(urls, tiny_qwen3_32_dir, written, "flag", "--limit", "4", "--api-key", API_KEY)) == 0
        assert main(_evaluate_argv(urls, tiny_qwen3_32_dir, written, "nokey", "--limit", "4")) == 1
        assert main(_evaluate_argv(urls, tiny_qwen3_32_dir, written, "wrong", "--limit", "4", "--api-key", "not-it")) == 1
    streams = capsys.readouterr()
    errors = [line for line in streams.err.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("HTTP 401" in e and "--api-key" in e for e in errors), errors
    assert "not-it" not in streams.err
    for path in written.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    assert API_KEY not in streams.out + streams.err + caplog.text
    assert len(_records(written / "flag")) == 4
