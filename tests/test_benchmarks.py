"""Every script in benchmarks/ runs at a tiny size and prints its table, so a benchmark cannot rot
unseen (issue #20): an API it calls that changes, or a field it reads that goes away, fails here.

Each script runs in this process through its ``main(argv)`` (the imports of torch, transformers
and TRL are paid once per session, not once per script), on the tiny random Qwen3 of conftest.py
where it needs a model. The scripts' numbers at this size mean nothing; the tests check that every
row of each table is there and, where a script compares two computations of one quantity, that
they agree. `benchmarks/gpu_check.py --tiny` has its own test (test_train_gpu_check.py).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def _load(name: str):
    """A benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"decal_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_benchmark(capsys):
    """``run_benchmark(name, *argv)``: the script's ``main(argv)`` here, its stdout returned. Puts
    back what the scripts set for the whole process (torch threads, ``logging.disable``)."""
    import torch

    threads, disabled = torch.get_num_threads(), logging.root.manager.disable
    outputs = []

    def run(name: str, *argv: str) -> str:
        assert _load(name).main([str(a) for a in argv]) == 0
        outputs.append(capsys.readouterr().out)
        return outputs[-1]

    yield run
    torch.set_num_threads(threads)
    logging.disable(disabled)
    sys.stdout.write("".join(outputs))  # the tables, shown when the test failed


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.M)
    assert match, f"no line matches {pattern!r}"
    return float(match.group(1))


def test_every_benchmark_script_has_a_smoke_test():
    tested = {"gpu_check"} | {name.removeprefix("test_").split("_runs")[0] for name in globals() if name.startswith("test_bench_")}
    assert set(SCRIPTS) == tested, f"benchmarks without a smoke test: {sorted(set(SCRIPTS) - tested)}"


def test_bench_monitor_runs_tiny(run_benchmark, data_dir, monkeypatch):
    # simulated streams of the verdicts generator's records: the no-drift rows and one row per
    # shifted pool and alarm, then the speed line
    monkeypatch.setenv("DECAL_DATA_DIR", str(data_dir))
    out = run_benchmark("bench_monitor", "--streams", 20, "--reference", 60, "--before", 60, "--after", 120,
                        "--speed-decisions", 200)
    for alarm in ("guarantee", "drift"):
        assert re.search(rf"^\| no drift, 180 decisions \| {alarm} \| \d+ \(\S+ %\) \| – \| – \| – \|$", out, re.M), alarm
    shifted = re.findall(r"^\| (.+?): accuracy of answered \S+, label-free estimate \S+ \| (guarantee|drift) \| \d+ \| \S+ % \|",
                         out, re.M)
    assert shifted and len(shifted) % 2 == 0 and {a for _, a in shifted} == {"guarantee", "drift"}
    assert re.search(r"^speed: vectorised simulation \S+ decisions/s vs the server's streaming alarms \S+ decisions/s", out, re.M)


def test_bench_metrics_runs_tiny(run_benchmark):
    # 30,000 examples: decal.binning.BUCKETED_FROM, so the class columns take the bucketed path.
    out = run_benchmark("bench_metrics", "--n", 30_000, "--classes", 3, "--repeats", 1, "--resamples", 5)
    assert _number(r"full suite \(\d+ metrics, validation included\), n=30,000, K=3: (\S+) s", out) > 0
    assert _number(r"ratio netcal ECE / decal full suite: (\S+)x", out) > 0
    ours, theirs = re.search(r"agreement: decal equal-width ECE (\S+), netcal (\S+)", out).groups()
    assert ours == theirs  # the same metric by two libraries, to the 6 printed digits
    assert re.search(r"target: full suite faster than netcal's ECE alone -> (met|NOT met)", out)
    assert _number(r"metrics_report with 5 bootstrap resamples, n=1,180: (\S+) s", out) >= 0


@pytest.mark.slow
def test_bench_scoring_runs_tiny(run_benchmark, tiny_qwen3_dir, data_dir):
    # lm-evaluation-harness is the `bench` extra: its part runs where it is installed.
    with_lm_eval = importlib.util.find_spec("lm_eval") is not None
    out = run_benchmark("bench_scoring", "--model", tiny_qwen3_dir, "--data-dir", data_dir, "--n", 6, "--batch-size", 3,
                        "--reasoning-n", 2, "--max-new-tokens", 3, "--threads", 1, *([] if with_lm_eval else ["--skip-lm-eval"]))
    assert "6 XSTest prompts" in out
    assert _number(r"non-reasoning {2}decal: .* decal/bare time: (\S+)x", out) > 0
    assert _number(r"reasoning {6}2 prompts, max 3 new tokens.* decal/bare time: (\S+)x", out) > 0
    assert _number(r"peak RSS after decal parts: (\S+) GB", out) > 0
    if with_lm_eval:
        assert re.search(r"^lm-eval \(labels as options\) .* identical argmax predictions: \d/6 ", out, re.M)


@pytest.mark.slow
def test_bench_adapter_eval_runs_tiny(run_benchmark, tiny_qwen3_dir):
    out = run_benchmark("bench_adapter_eval", "--model", tiny_qwen3_dir, "--n", 2, "--batch-size", 2, "--dtype", "float32",
                        "--threads", 1)
    for row in ("base", "strided", "attached", "merged"):
        assert re.search(rf"^  {row} +\S+ s +\S+ prompts/s$", out, re.M), row
    assert re.search(r"^identical predictions merged vs attached: \d/2$", out, re.M)
    assert _number(r"^attached / merged time: (\S+)x$", out) > 0


@pytest.mark.slow
def test_bench_builtin_task_runs_tiny(run_benchmark, tiny_qwen3_dir):
    out = run_benchmark("bench_builtin_task", "--model", tiny_qwen3_dir, "--dtype", "float32", "--n", 3,
                        "--difficulties", "0,4")
    rows = re.findall(r"^difficulty=(\d) split=validation n=3 accuracy=\S+ mean_confidence=\S+ option_mass=\S+ seconds=\S+$",
                      out, re.M)
    assert rows == ["0", "4"]


@pytest.mark.slow
def test_bench_cal_grpo_runs_tiny(run_benchmark, tiny_qwen3_dir):
    out = run_benchmark("bench_cal_grpo", "--model", tiny_qwen3_dir, "--prompts", 1, "--generations", 2,
                        "--max-completion-length", 2, "--repeats", 1, "--threads", 1, "--in-process")
    hashes = re.findall(r"^(?:grpo|cal-grpo) +pass \S+ s .* completions (\w+) +tokens \d+$", out, re.M)
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # both methods trained on the same completions
    assert "warning" not in out
    assert _number(r"step-time ratio cal-grpo/grpo: (\S+)", out) > 0
    assert _number(r"peak-memory ratio cal-grpo/grpo: (\S+)", out) > 0


@pytest.mark.slow
def test_bench_engines_runs_tiny(run_benchmark, tiny_qwen3_dir, data_dir):
    # The hf engine only: a vLLM engine takes 30-80 s to start here. The vllm half builds its
    # engine through `prepare_engine` with `EngineOptions(extra=...)` as the vllm fixtures of
    # conftest.py do, which test_engines.py runs.
    out = run_benchmark("bench_engines", "--model", tiny_qwen3_dir, "--data-dir", data_dir, "--engines", "hf",
                        "--hf-threads", 1, "--score-n", 4, "--queries", 2, "--samples", 2, "--rollout-tokens", 4,
                        "--eval-n", 3, "--eval-tokens", 4)
    for row in (r"\(a\) score 4 XSTest \| \S+ prompts/s", r"\(b\) rollouts 2x2x4 \| \S+ new tokens/s",
                r"\(c\) greedy eval 3x4 \| \S+ examples/s"):
        assert re.search(rf"^\| {row} \(\d+ s\) \| \S+ \| - \| - \|$", out, re.M), row
    assert re.search(r"^start-up: hf \S+ s$", out, re.M)


@pytest.mark.slow
def test_bench_serve_runs_tiny(run_benchmark, tiny_qwen3_dir, data_dir, monkeypatch):
    # The server is a real `decal serve` process on a free loopback port (decal.serve.process).
    monkeypatch.setenv("DECAL_DATA_DIR", str(data_dir))
    out = run_benchmark("bench_serve", "--model", tiny_qwen3_dir, "--requests", 4, "--concurrency", "1,2",
                        "--rounds", 1, "--max-batch-size", 2, "--time-cap", 120)
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| .* \| \S+x \|$", out, re.M)
    assert rows == [("1", "4", "0"), ("2", "4", "0")]  # concurrency, requests ok, errors
    assert re.search(r"^targets: errors 0 \(0\) PASS; .* server exit status 0$", out, re.M)


@pytest.mark.slow
def test_bench_training_runs_tiny(run_benchmark, tiny_qwen3_dir, monkeypatch):
    import decal.training.runner

    # `train` sets glibc's mmap threshold for the whole process, for good; the tests after this
    # one should not run under it.
    monkeypatch.setattr(decal.training.runner, "return_large_buffers", lambda: False)
    common = ["--model", tiny_qwen3_dir, "--threads", 1, "--in-process"]
    out = run_benchmark("bench_training", "--suite", "sft", "--task", "builtin/train", "--limit", 4, "--batches", 4, *common)
    for row in ("decision b4 full", "decision b4 cut512", "full_logits b4 cut512"):
        assert re.search(rf"^{row} +batch  4 .* step +\S+ s wall +\S+ CPU-s +peak RSS +\S+ GB +loss \S+$", out, re.M), row
    new, old = re.search(r"losses (\S+) / (\S+)", out).groups()
    assert new == old  # the decision-position loss and the full-logits loss it replaced, to 5 decimals

    out = run_benchmark("bench_training", "--suite", "grpo", "--task", "builtin/train", "--limit", 4, "--generations", 2,
                        "--completion-tokens", 2, "--grpo-micro-batch", 8, *common)
    assert len(re.findall(r"^(?:grpo|cal-grpo) +prompts \[.*\] tokens, .* step +\S+ s wall", out, re.M)) == 2
    assert _number(r"cal-grpo / grpo: step CPU time (\S+)x", out) > 0

    # The grpo and cal-grpo rows of this suite run the same `train` as the grpo suite above; SFT
    # alone exercises its worker and table at a fifth of the cost.
    out = run_benchmark("bench_training", "--suite", "methods", "--methods", "sft", "--steps", 2, *common)
    assert re.search(r"^sft +step +\S+ s wall, +\S+ CPU-s \(fastest of 1\), peak RSS +\d+ MB$", out, re.M)
