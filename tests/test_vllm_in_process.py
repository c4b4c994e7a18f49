"""The vllm engine's engine core in this process, the CPU build's default for one engine (issue #20
item 10; `decal.engines.vllm._engine_core_here`, docs/design.md "Measured costs").

No vLLM engine of another module is alive here (conftest's engines are module-scoped), so the
first engine of this module is the process's only in-process engine core.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import LOGPROB_ATOL_TINY, assert_logprobs_close
from decal.decision import option_token_ids
from decal.engines import EngineOptions, prepare_engine
from decal.scoring import encode_prompts
from decal.tasks import load_task
from decal.tasks.prompts import decision_context, render_chat

pytestmark = [pytest.mark.slow, pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None,
                                                   reason="vllm is not installed")]

SMALL_KV = {"kv_cache_memory_bytes": 1 << 28}


def _child_pids() -> set[int]:
    """This process's children, from /proc (field 4 of /proc/PID/stat is the parent's pid)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            pids.add(int(stat.parent.name))
    return pids


def _scores(engine, n=4):
    task = load_task("builtin", "test", reasoning=False)
    tok = engine.tokenizer
    prompts = [render_chat(tok, task.user_message(ex), reasoning=False) for ex in task.examples[:n]]
    tokens = option_token_ids(tok, task.labels, context=decision_context(prompts[0], reasoning=False))
    return [s.option_probs for s in engine.score(encode_prompts(tok, prompts), tokens)]


@pytest.fixture(scope="module")
def on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU build's default")


@pytest.fixture(scope="module")
def hf_scores(tiny_qwen3_32_dir):
    return _scores(prepare_engine("hf", str(tiny_qwen3_32_dir)).build())


def test_the_engine_core_runs_here_and_leaves_this_process_as_it_was(on_cpu, tiny_qwen3_32_dir, hf_scores):
    """No engine-core or worker process; the random generators, `torch.set_num_threads` and the
    environment as before its start-up (vLLM's CPU worker seeds the first and replaces the second);
    the records of the hf engine."""
    import torch

    set_num_threads, env = torch.set_num_threads, os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    children = _child_pids()

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    want = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    spec = prepare_engine("vllm", str(tiny_qwen3_32_dir), dtype="float32", options=EngineOptions(extra=SMALL_KV))
    with spec.build() as engine:
        assert engine._shared.kwargs["distributed_executor_backend"] == "uni"
        assert _child_pids() <= children, "vLLM started processes of its own"
        assert draws() == want
        assert torch.set_num_threads is set_num_threads
        assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == env
        assert_logprobs_close(_scores(engine), hf_scores, atol=LOGPROB_ATOL_TINY)


def test_a_second_engine_gets_worker_processes_and_closing_it_leaves_the_first_working(on_cpu, tiny_qwen3_32_dir,
                                                                                       hf_scores):
    """vLLM's in-process shutdown destroys the process's parallel groups, which every in-process
    engine core shares: a second engine while one runs here starts vLLM's worker processes, and
    closing it leaves the first one scoring (two in-process engines failed this way)."""
    spec = prepare_engine("vllm", str(tiny_qwen3_32_dir), dtype="float32", options=EngineOptions(extra=SMALL_KV))
    with spec.build() as first:
        assert first._shared.kwargs["distributed_executor_backend"] == "uni"
        children = _child_pids()
        with spec.build() as second:
            assert second._shared.kwargs["distributed_executor_backend"] == "mp"
            assert _child_pids() - children, "the second engine started no process of its own"
            assert_logprobs_close(_scores(second), hf_scores, atol=LOGPROB_ATOL_TINY)
        assert_logprobs_close(_scores(first), hf_scores, atol=LOGPROB_ATOL_TINY)
    with spec.build() as third:  # the process's in-process slot is free again
        assert third._shared.kwargs["distributed_executor_backend"] == "uni"
