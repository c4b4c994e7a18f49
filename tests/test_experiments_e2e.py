"""End-to-end experiment runs on the tiny random Qwen3 (issues #8 and #9): real `decal` subprocesses.

- A tiny grid (cal-GRPO, in-domain and OOD evaluations, Platt scaling) produces the
  results table and both report formats.
- `decal run` killed with SIGKILL after its first step finished, then rerun, redoes nothing
  that had finished and ends with the same results table as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from decal.experiments.config import experiment_config_from_dict
from decal.experiments.results import read_results
from decal.experiments.runner import DONE, STEP_LOG, run_experiment

pytestmark = pytest.mark.slow


def _grid(model_dir: Path, *, methods: list[dict], calibrators: list[dict] = ()) -> dict:
    return {
        "name": "tiny-e2e",
        "output_dir": "unused",
        "models": [{"name": "tiny-qwen3", "path": str(model_dir)}],
        "train_tasks": [
            {
                "task": "builtin",
                "split": "train",
                "evaluations": [
                    {"task": "builtin", "split": "validation", "domain": "in", "label": "Sentiment"},
                    {"task": "builtin:difficulty=3", "split": "test", "domain": "ood", "label": "Hard"},
                ],
            }
        ],
        "methods": methods,
        "calibrators": list(calibrators),
        "evaluation": {"limit": 8, "batch_size": 8},
        "metrics": {"bootstrap": 20},
    }


BASE = {"name": "base", "method": "base", "reasoning": False}
CAL_GRPO = {
    "name": "cal-grpo",
    "method": "cal-grpo",
    "reasoning": False,
    "train": {
        "limit": 4, "max_steps": 1, "batch_size": 4, "num_generations": 2, "grad_accum": 1,
        "max_completion_length": 4, "save_steps": 1, "cal_lambda": 0.01,
    },
}


def test_tiny_grid_produces_results_and_both_reports(tiny_qwen3_dir, tmp_path):
    data = _grid(
        tiny_qwen3_dir,
        methods=[CAL_GRPO],  # train, select, evaluate and calibrate; base steps are in the next test
        calibrators=[{"method": "platt", "fit_task": "builtin", "fit_split": "validation", "methods": ["cal-grpo"]}],
    )
    config = experiment_config_from_dict(data)
    root = tmp_path / "exp"
    steps = run_experiment(config, out=root)
    assert all((root / s.id / DONE).is_file() for s in steps)
    assert (root / "runs/tiny-qwen3/cal-grpo/builtin/select/adapter/adapter_config.json").is_file()
    rows = read_results(root / "results.csv")
    cells = {(r["method"], r["eval_task"], r["calibrator"], r["metric"]) for r in rows}
    for method in ("cal-grpo",):
        for task in ("builtin", "builtin:difficulty=3"):
            for metric in ("accuracy", "ece", "sce", "mce", "auroc"):
                assert (method, task, "none", metric) in cells, (method, task, metric)
    assert ("cal-grpo", "builtin:difficulty=3", "platt", "ece") in cells
    ece = next(r for r in rows if r["metric"] == "ece" and r["calibrator"] == "none")
    assert ece["n"] == 8 and ece["ci_low"] <= ece["value"] <= ece["ci_high"]
    # Table 5's "None" for the in-domain set: the uncalibrated model on the records Platt held out.
    held = next(r for r in rows if r["metric"] == "ece" and r["calibrator"] == "none (held-out)")
    assert held["eval_task"] == "builtin" and held["n"] == 4
    from decal.metrics import summarize
    from decal.records import read_records

    held_ids = {r.id for r in read_records(root / held["run_dir"])}
    source = [r for r in read_records(root / "runs/tiny-qwen3/cal-grpo/builtin/eval/builtin-validation") if r.id in held_ids]
    assert len(source) == 4 and held["value"] == pytest.approx(summarize(source)["ece"])
    assert sum(r["calibrator"] == "none (held-out)" and r["metric"] == "ece" for r in rows) == 1
    # Rebuilding the table reads the cached held-out metrics instead of bootstrapping again.
    import decal.metrics
    from decal.experiments.plan import build_plan
    from decal.experiments.results import collect_results

    def no_recompute(*args, **kwargs):
        raise AssertionError("held-out metrics were recomputed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decal.metrics, "metrics_report", no_recompute)
        again = collect_results(config.name, root, build_plan(config, root))
    assert [(r["calibrator"], r["metric"], r["value"]) for r in again] == [(r["calibrator"], r["metric"], r["value"]) for r in rows]

    from decal.cli import main

    assert main(["report", str(root), "--format", "md"]) == 0
    assert main(["report", str(root), "--format", "html"]) == 0
    md = (root / "report.md").read_text()
    html = (root / "report.html").read_text()
    assert "## Table 4" in md and "| Sentiment † | Ours |" in md and "| Hard * | Ours |" in md
    assert "Table 5" in md  # Platt after cal-GRPO
    none_row = next(line for line in md[md.index("Table 5"):].splitlines() if "| None |" in line)
    assert f"| {100 * held['value']:.2f}" in none_row  # in-domain "None" on the held-out records
    assert "data:image/png;base64," in html and "<table>" in html


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"decal run exited with {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def test_killed_run_resumes_without_redoing_finished_steps(tiny_qwen3_dir, tmp_path):
    data = _grid(tiny_qwen3_dir, methods=[BASE])
    # Bit-equal results across processes need float32: on a CPU with native bfloat16 (where `auto`
    # picks it), PyTorch's two-thread CPU bfloat16 kernels gave probabilities that differ by ~3e-3
    # (relative) between processes when the machine was busy as they started (measured; one
    # thread, or float32, gave the same bits every time). This failed in CI before the pin.
    data["evaluation"]["dtype"] = "float32"
    config_path = tmp_path / "grid.yaml"
    config_path.write_text(yaml.safe_dump(data))
    root = tmp_path / "killed"
    first = root / "runs/tiny-qwen3/base/builtin/eval/builtin-validation"

    # 1. Start `decal run`, SIGKILL it (and the step it started) as soon as step 1 is done.
    proc = subprocess.Popen(
        [sys.executable, "-m", "decal", "run", str(config_path), "--out", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(first / DONE, proc, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    marker_mtime = (first / DONE).stat().st_mtime_ns
    predictions_mtime = (first / "predictions.jsonl").stat().st_mtime_ns

    # 2. Rerun: the finished step is skipped, its files untouched; the rest runs.
    config = experiment_config_from_dict(data)
    run_experiment(config, out=root)
    events = [json.loads(line) for line in (root / STEP_LOG).read_text().splitlines()]
    first_id = first.relative_to(root).as_posix()
    assert [e["event"] for e in events if e["step"] == first_id] == ["start", "done", "skip"]
    assert (first / DONE).stat().st_mtime_ns == marker_mtime
    assert (first / "predictions.jsonl").stat().st_mtime_ns == predictions_mtime
    assert all((root / s.id / DONE).is_file() for s in run_experiment(config, out=root, dry_run=True))

    # 3. The resumed results equal an uninterrupted run's.
    clean = tmp_path / "clean"
    run_experiment(config, out=clean)
    assert (root / "results.csv").read_text() == (clean / "results.csv").read_text()


def test_vllm_grid_starts_one_engine_for_the_base_model_and_its_adapters(tiny_qwen3_32_dir, tmp_path):
    """`evaluation.engine: vllm`: training runs first, then every evaluation of the model (base and
    the trained adapter, in-domain and OOD) in one `decal evaluate-many` process with one engine."""
    data = _grid(tiny_qwen3_32_dir, methods=[BASE, CAL_GRPO])
    data["evaluation"] = {"limit": 4, "batch_size": 4, "engine": "vllm",
                          "engine_options": {"max_model_len": 1024, "kv_cache_memory_bytes": 1 << 30}}
    config = experiment_config_from_dict(data)
    root = tmp_path / "exp"
    steps = run_experiment(config, out=root)
    assert all((root / s.id / DONE).is_file() for s in steps)
    (results,) = list((root / ".batches").glob("*.results.json"))
    batch = json.loads(results.read_text())
    assert batch == {"codes": [0, 0, 0, 0], "engines_started": 1}
    for s in steps:
        if s.kind == "evaluate":
            meta = json.loads((root / s.id / "run.json").read_text())
            assert meta["engine"] == "vllm" and meta["engine_options"]["max_model_len"] == 1024
            assert (meta["adapter"] is not None) == (s.info["method"] == "cal-grpo")
            assert len((root / s.id / "predictions.jsonl").read_text().splitlines()) == 4
    rows = read_results(root / "results.csv")
    assert {(r["method"], r["eval_task"]) for r in rows if r["metric"] == "ece"} == {
        (m, t) for m in ("base", "cal-grpo") for t in ("builtin", "builtin:difficulty=3")}
