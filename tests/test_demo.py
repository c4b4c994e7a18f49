"""`decal demo` (issue #22 item 5): the packaged grid on the verdicts task, and its in-process executor."""

from __future__ import annotations

import logging

import yaml

from decal.commands.demo import demo_config_path, in_process_executor
from decal.experiments.config import load_experiment_config
from decal.experiments.plan import build_plan


def test_the_demo_grid_is_the_finding_on_a_task_with_a_known_truth(tmp_path):
    config = load_experiment_config(demo_config_path())
    steps = {s.id: s for s in build_plan(config, tmp_path)}
    prefix = "runs/SmolLM2-135M"
    assert {(e.task, e.split, e.domain) for e in config.train_tasks[0].evaluations} == {
        ("verdicts", "validation", "in"), ("verdicts:variant=ood", "test", "ood")}
    assert [m.name for m in config.methods] == ["base", "sft", "grpo", "cal-grpo"]
    for name in ("grpo", "cal-grpo"):  # both RL methods continue the SFT adapter, non-reasoning
        train = steps[f"{prefix}/{name}/verdicts/train"]
        assert train.deps == (f"{prefix}/sft/verdicts/select",)
        settings = yaml.safe_load(train.files["train.yaml"])
        assert settings["reasoning"] is False and settings["init_adapter"].endswith("sft/verdicts/select/adapter")
    assert yaml.safe_load(steps[f"{prefix}/cal-grpo/verdicts/train"].files["train.yaml"])["cal_lambda"] == 1.0
    assert all("--dtype" not in s.commands[0] for s in steps.values() if s.kind == "evaluate")  # auto


def test_in_process_executor_logs_to_the_step_and_returns_the_exit_code(tmp_path, capsys):
    log = tmp_path / "step" / "log.txt"
    assert in_process_executor(["tasks", "list"], log) == 0
    assert in_process_executor(["evaluate", "--model", str(tmp_path / "missing"), "--task", "verdicts",
                                "--split", "validation", "--out", str(tmp_path / "o")], log) == 1
    text = log.read_text()
    assert "$ decal tasks list  (in process)" in text and "verdicts" in text
    assert "error:" in text  # the failing command's one line went to the step's log
    assert capsys.readouterr().out == ""  # nothing on the console
    assert not any(getattr(h, "stream", None) is not None and getattr(h.stream, "name", "") == str(log)
                   for h in logging.getLogger().handlers)  # its log handler is gone
