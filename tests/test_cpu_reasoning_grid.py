"""`configs/cpu-reasoning.yaml` end to end at tiny size: the shipped grid with the tiny random Qwen3,
tiny limits and one step per training, run in process (the warm start, GRPO and cal-GRPO continuing
its adapter, the lambda sweep, the group-accuracy target, Platt and isotonic, the rollout and swap
analyses), then the results table with the truth metrics and the report with its truth tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from decal.cli import main
from decal.experiments.config import experiment_config_from_dict, load_experiment_config
from decal.experiments.plan import build_plan
from decal.experiments.results import read_results
from decal.experiments.runner import DONE, run_experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cpu-reasoning.yaml"

# Tiny sizes: what each entry keeps of the shipped settings is everything but the sizes.
_TINY_TRAIN = {"limit": 4, "max_steps": 1, "save_steps": 1, "batch_size": 4, "grad_accum": 1}
_TINY_GRPO = {"num_generations": 2, "max_completion_length": 8}


def _tiny(model_dir: Path) -> dict:
    data = yaml.safe_load(CONFIG.read_text())
    data["models"] = [{**data["models"][0], "path": str(model_dir)}]
    for method in data["methods"]:
        if "train" in method:
            method["train"] = {**method["train"], **_TINY_TRAIN,
                               **(_TINY_GRPO if method["method"] != "sft" else {}), "lora_r": 4, "lora_alpha": 8}
    data["evaluation"] = {**data["evaluation"], "limit": 4, "batch_size": 4, "max_new_tokens": 8}
    data["metrics"] = {**data["metrics"], "bootstrap": 10}
    for analysis in data["analyses"]:
        analysis["settings"] = {**analysis["settings"], "limit": 2, "max_new_tokens": 8, "batch_size": 4}
        if analysis["kind"] == "rollouts":
            analysis["settings"]["samples"] = 2
        else:
            analysis["settings"]["include_invalid"] = True  # the random model never closes </think>
    return data


def test_the_shipped_grid_plans_every_piece(tmp_path):
    config = load_experiment_config(CONFIG)
    steps = build_plan(config, tmp_path)
    ids = {s.id for s in steps}
    methods = {s.info["method"] + (f"_{s.info['variant']}" if s.info.get("variant") else "") for s in steps if s.kind == "train"}
    assert methods == {"sft", "warm-start", "grpo", "cal-grpo", "cal-grpo-group", "cal-grpo_lambda=1",
                       "warm-start-commit", "grpo-commit", "cal-grpo-commit", "cal-grpo-commit-group",
                       "cal-grpo-commit_lambda=0.1", "cal-grpo-commit_lambda=1"}  # issue #22: the committed condition
    grpo = next(s for s in steps if s.id == "runs/SmolLM2-135M/grpo/verdicts/train")
    assert grpo.deps == ("runs/SmolLM2-135M/warm-start/verdicts/select",)
    assert yaml.safe_load(grpo.files["train.yaml"])["reasoning"] is True
    assert {s.info["analysis"] + "/" + s.info["method"] for s in steps if s.kind == "analyze"} == {
        f"{kind}/{method}" for kind in ("rollouts", "swap") for method in ("warm-start", "grpo", "warm-start-commit",
                                                                              "grpo-commit")}
    assert {s.info["domain"] for s in steps if s.kind == "evaluate"} == {"in", "ood"}
    # 2 calibrators x 9 entries: 3 per condition and their lambda-sweep points (1 hedging, 2 committed)
    assert sum(s.kind == "calibrate" for s in steps) == 18 and "runs/SmolLM2-135M/base/verdicts/eval/verdicts-validation" in ids
    group = yaml.safe_load(next(s for s in steps if s.id == "runs/SmolLM2-135M/cal-grpo-group/verdicts/train").files["train.yaml"])
    assert (group["cal_target"], group["cal_lambda"]) == ("group-accuracy", 1.0)
    assert main(["run", str(CONFIG), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    assert not (tmp_path / "dry").exists()


def test_analysis_switches_become_bare_flags(tmp_path):
    steps = build_plan(experiment_config_from_dict(_tiny(tmp_path)), tmp_path)
    swap = next(s for s in steps if s.kind == "analyze" and s.info["analysis"] == "swap")
    command = list(swap.commands[0])
    assert "--include-invalid" in command and command[command.index("--include-invalid") + 1].startswith("--")


@pytest.mark.slow
def test_a_tiny_version_runs_end_to_end(tiny_qwen3_dir, tmp_path):
    """The reasoning chain of the grid (warm start -> GRPO, cal-GRPO with the group-accuracy target),
    its calibrators and analyses. The other entries (base, SFT, the lambda sweep) are the same step
    kinds as in test_experiments_e2e; the whole tiny grid took 22 minutes on a busy 2-core machine."""
    data = _tiny(tiny_qwen3_dir)
    kept = ("warm-start", "grpo", "cal-grpo-group")
    data["methods"] = [m for m in data["methods"] if m["name"] in kept]
    data["sweeps"] = []
    for cal in data["calibrators"]:
        cal["methods"] = ["grpo"]
    for analysis in data["analyses"]:  # the committed condition's entries are not in this tiny grid
        analysis["methods"] = [m for m in analysis["methods"] if m in kept]
    config = experiment_config_from_dict(data)
    root = tmp_path / "exp"
    steps = run_experiment(config, out=root, executor=lambda argv, log: main(list(argv)))
    assert all((root / s.id / DONE).is_file() for s in steps) and len(steps) == 18
    rows = read_results(root / "results.csv")
    cells = {(r["method"], r["variant"], r["eval_task"], r["calibrator"], r["metric"]) for r in rows}
    for method, variant in [("warm-start", ""), ("grpo", ""), ("cal-grpo-group", "")]:
        for task in ("verdicts", "verdicts:variant=ood"):
            for metric in ("accuracy", "ece", "tce", "mean_overconfidence", "bayes_accuracy"):
                assert (method, variant, task, "none", metric) in cells, (method, variant, task, metric)
    assert ("grpo", "", "verdicts:variant=ood", "isotonic", "tce") in cells
    assert (root / "analysis/SmolLM2-135M/grpo/rollouts-verdicts-train/summary.json").is_file()
    assert main(["report", str(root), "--format", "md", "--no-figures"]) == 0
    md = (root / "report.md").read_text()
    assert "Table T1" in md and "Table T2" in md and "Table 2" in md and "Table 3" in md
