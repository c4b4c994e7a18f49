"""The committed condition of `configs/cpu-reasoning.yaml` (issue #22 item 2), as planned: its warm start,
GRPO and cal-GRPO on it (the lambda sweep, the group-accuracy target), the analyses and calibrators on
both conditions, and the hedging entries left as landed."""

from __future__ import annotations

from pathlib import Path

import yaml

from decal.experiments.config import load_experiment_config
from decal.experiments.headline import method_conditions
from decal.experiments.plan import build_plan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu-reasoning.yaml"
PREFIX = "runs/SmolLM2-135M"


def _steps(tmp_path):
    return {s.id: s for s in build_plan(load_experiment_config(CONFIG), tmp_path)}


def _train_yaml(steps, method: str) -> dict:
    return yaml.safe_load(steps[f"{PREFIX}/{method}/verdicts/train"].files["train.yaml"])


def test_the_committed_chain_starts_from_the_committed_warm_start(tmp_path):
    steps = _steps(tmp_path)
    warm = _train_yaml(steps, "warm-start-commit")
    assert (warm["warm_start_labels"], warm["reasoning"], warm["select_split"]) == ("commit", True, "test")
    assert warm["select_criterion"] == "last"  # GRPO starts from the converged warm start, not the luckiest checkpoint
    assert warm["max_steps"] > 60 and warm["max_steps"] % warm["save_steps"] == 0  # a curve of checkpoints
    for name in ("grpo-commit", "cal-grpo-commit", "cal-grpo-commit-group", "cal-grpo-commit_lambda=0.1",
                 "cal-grpo-commit_lambda=1"):
        step = steps[f"{PREFIX}/{name}/verdicts/train"]
        assert step.deps == (f"{PREFIX}/warm-start-commit/verdicts/select",), name
        train = yaml.safe_load(step.files["train.yaml"])
        # GRPO samples on vLLM, the cal-GRPO runs on hf (the faster sampler with LoRA on the CPU: the config says why)
        assert train.get("engine", "hf") == ("vllm" if name == "grpo-commit" else "hf"), name
        assert train["init_adapter"].endswith("warm-start-commit/verdicts/select/adapter")
    lambdas = {n: _train_yaml(steps, n)["cal_lambda"] for n in ("cal-grpo-commit", "cal-grpo-commit_lambda=0.1",
                                                               "cal-grpo-commit_lambda=1")}
    assert lambdas == {"cal-grpo-commit": 0.001, "cal-grpo-commit_lambda=0.1": 0.1, "cal-grpo-commit_lambda=1": 1.0}
    group = _train_yaml(steps, "cal-grpo-commit-group")
    assert (group["cal_target"], group["cal_lambda"]) == ("group-accuracy", 1.0)


def test_the_hedging_entries_keep_their_landed_settings(tmp_path):
    steps = _steps(tmp_path)
    assert _train_yaml(steps, "warm-start") == {"limit": 400, "max_steps": 60, "batch_size": 8, "grad_accum": 1,
                                                "learning_rate": 1e-3, "save_steps": 60, "reasoning": True, "seed": 0}
    grpo = _train_yaml(steps, "grpo")
    assert "engine" not in grpo and grpo["learning_rate"] == 1e-4 and grpo["max_steps"] == 10
    evaluate = steps[f"{PREFIX}/grpo/verdicts/eval/verdicts-validation"].commands[0]
    assert "--dtype" not in evaluate  # auto: bfloat16 on the Xeon the landed numbers came from


def test_both_conditions_are_analysed_calibrated_and_reported_side_by_side(tmp_path):
    steps = _steps(tmp_path)
    analysed = {(s.info["analysis"], s.info["method"]) for s in steps.values() if s.kind == "analyze"}
    assert {("rollouts", "warm-start-commit"), ("rollouts", "grpo-commit"), ("swap", "warm-start-commit"),
            ("swap", "grpo-commit")} <= analysed
    calibrated = {(s.info["method"], s.info["variant"], s.info["calibrator"]) for s in steps.values()
                  if s.kind == "calibrate"}
    for method in ("warm-start", "grpo", "warm-start-commit", "grpo-commit", "cal-grpo-commit"):
        assert {(method, "", "platt"), (method, "", "isotonic")} <= calibrated
    import dataclasses

    conditions = method_conditions({"config": dataclasses.asdict(load_experiment_config(CONFIG))})
    assert {n for n, c in conditions.items() if c == "committed"} == {
        "warm-start-commit", "grpo-commit", "cal-grpo-commit", "cal-grpo-commit-group"}
    assert {n for n, c in conditions.items() if c == "hedging"} == {"warm-start", "grpo", "cal-grpo", "cal-grpo-group"}
