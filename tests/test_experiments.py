"""Experiment configs, plans and the resumable runner (issue #8), with a fake step executor.

The fake executor stands in for the `decal` subcommands: it writes the files each real command
writes (adapter folder, predictions, metrics.json, calibrated runs), so the runner's planning,
skip/resume logic and results table are tested without any model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from decal.errors import ConfigError, DecalError
from decal.experiments.config import experiment_config_from_dict, load_experiment_config
from decal.experiments.plan import build_plan, select_steps
from decal.experiments.results import RESULT_COLUMNS, read_results
from decal.experiments.runner import DONE, STEP_LOG, StepFailedError, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> dict:
    data = {
        "name": "tiny",
        "output_dir": "exp",
        "models": [{"name": "m1", "path": "some/model"}],
        "train_tasks": [
            {
                "task": "builtin",
                "split": "train",
                "evaluations": [
                    {"task": "builtin", "split": "validation", "domain": "in"},
                    {"task": "other", "split": "test", "domain": "ood"},
                ],
            }
        ],
        "methods": [
            {"name": "base", "method": "base", "reasoning": False},
            {"name": "sft", "method": "sft", "train": {"epochs": 1}},
            {"name": "cal-grpo", "method": "cal-grpo", "train": {"max_steps": 2}},
        ],
        "calibrators": [{"method": "platt", "fit_task": "builtin", "fit_split": "validation", "methods": ["cal-grpo"]}],
        "sweeps": [{"method": "cal-grpo", "param": "cal_lambda", "values": [0.005]}],
        "metrics": {"bootstrap": 0},
    }
    data.update(overrides)
    return data


def _flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def _write_preds(folder: Path, task: str, split: str, n: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.jsonl").open("w") as f:
        for i in range(n):
            correct = i % 3 != 0
            rec = {
                "id": str(i), "task": task, "split": split, "label": "A", "prediction": "A" if correct else "B",
                "correct": correct, "valid": True, "confidence": 0.5 + 0.4 * i / n, "option_probs": [0.6, 0.3],
                "labels": ["A", "B"],
            }
            f.write(json.dumps(rec) + "\n")


class FakeDecal:
    """Writes what each `decal` subcommand would write; records every call."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv, log_path: Path) -> int:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail_on and any(self.fail_on in a for a in argv):
            return 3
        cmd = argv[0]
        if cmd == "train":
            out = Path(_flag(argv, "--out"))
            (out / "adapter").mkdir(parents=True, exist_ok=True)
            (out / "adapter" / "adapter_config.json").write_text(json.dumps({"argv": argv}))
        elif cmd == "evaluate":
            run_dir = Path(_flag(argv, "--out")) / _flag(argv, "--name")
            _write_preds(run_dir, _flag(argv, "--task"), _flag(argv, "--split"))
        elif cmd == "metrics":
            run = Path(argv[1])
            n = sum(1 for _ in (run / "predictions.jsonl").open())
            value = 0.1 * len(str(run)) % 1  # differs between runs, fixed per run
            report = {
                "n": n,
                "metrics": {
                    "accuracy": {"value": value, "ci_low": None, "ci_high": None},
                    "ece": {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3},
                    "sce": {"value": 0.05, "ci_low": 0.01, "ci_high": 0.09},
                    "mce": {"value": 0.07, "ci_low": 0.02, "ci_high": 0.1},
                    "auroc": {"value": 0.75, "ci_low": 0.6, "ci_high": 0.9},
                },
            }
            (run / "metrics.json").write_text(json.dumps(report))
        elif cmd == "analyze":
            out = Path(_flag(argv, "--out"))
            out.mkdir(parents=True, exist_ok=True)
            summary = {"share_above": 0.975, "threshold": 0.99, "n_rollouts": 64} if argv[1] == "rollouts" else {"flip_rate": 0.5, "n_swapped": 4}
            (out / "summary.json").write_text(json.dumps(summary))
        elif cmd == "calibrate":
            out = Path(_flag(argv, "--out"))
            fit = Path(_flag(argv, "--fit"))
            applied = argv[argv.index("--apply") + 1 : argv.index("--out")] if "--apply" in argv else []
            for run in [fit, *map(Path, applied)]:
                first = json.loads((run / "predictions.jsonl").open().readline())
                _write_preds(out / run.name, first["task"], first["split"], n=3)
            (out / "calibrator.json").write_text("{}")
        return 0


def test_unknown_key_suggests_the_right_name():
    data = tiny_config()
    data["methods"][1] = {"name": "sft", "methd": "sft"}
    with pytest.raises(ConfigError, match=r"methods\[1\]\.methd.*Did you mean: method\?"):
        experiment_config_from_dict(data)


def test_wrong_type_names_the_field_path():
    data = tiny_config()
    data["calibrators"][0]["fit_fraction"] = "half"
    with pytest.raises(ConfigError, match=r"calibrators\[0\]\.fit_fraction` must be a number; got 'half'"):
        experiment_config_from_dict(data)
    data = tiny_config(seeds=[0, 0])
    with pytest.raises(ConfigError, match="seeds"):
        experiment_config_from_dict(data)


def test_bad_method_name_and_references_are_rejected():
    data = tiny_config()
    data["methods"][1]["method"] = "dpo"
    with pytest.raises(ConfigError, match=r"Unknown `methods\[1\]\.method` 'dpo'\. Available: base, sft, grpo, cal-grpo"):
        experiment_config_from_dict(data)
    data = tiny_config()
    data["calibrators"][0]["methods"] = ["cal-grpoo"]
    with pytest.raises(ConfigError, match="Did you mean: cal-grpo"):
        experiment_config_from_dict(data)


def test_two_evaluations_on_one_task_split_are_rejected():
    data = tiny_config()
    evaluations = data["train_tasks"][0]["evaluations"]
    evaluations.append({**evaluations[0], "task": evaluations[0]["task"].split(":")[0] + ":difficulty=4"})
    with pytest.raises(ConfigError, match="both use split"):
        experiment_config_from_dict(data)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodels: [a, b\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_experiment_config(path)


def test_plan_order_dependencies_and_sweep_variant(tmp_path):
    config = experiment_config_from_dict(tiny_config())
    steps = build_plan(config, tmp_path)
    ids = [s.id for s in steps]
    assert "runs/m1/base/builtin/eval/builtin-validation" in ids
    assert "runs/m1/cal-grpo_lambda=0.005/builtin/train" in ids
    position = {sid: i for i, sid in enumerate(ids)}
    for s in steps:
        for dep in s.deps:
            assert position[dep] < position[s.id], (dep, s.id)
    train = next(s for s in steps if s.id == "runs/m1/cal-grpo_lambda=0.005/builtin/train")
    settings = yaml.safe_load(train.files["train.yaml"])
    assert settings["cal_lambda"] == 0.005 and settings["max_steps"] == 2 and settings["reasoning"] is True
    sft_eval = next(s for s in steps if s.id == "runs/m1/sft/builtin/eval/other-test")
    assert "--reasoning" not in sft_eval.commands[0] and "--adapter" in sft_eval.commands[0]
    only = select_steps(steps, "runs/m1/sft/*/eval/other-test")
    assert [s.id for s in only] == ["runs/m1/sft/builtin/train", "runs/m1/sft/builtin/select", "runs/m1/sft/builtin/eval/other-test"]
    with pytest.raises(ValueError, match="matches no step"):
        select_steps(steps, "nothing-like-this")


def test_run_writes_results_and_a_rerun_redoes_nothing(tmp_path):
    config = experiment_config_from_dict(tiny_config())
    fake = FakeDecal()
    steps = run_experiment(config, out=tmp_path / "exp", executor=fake)
    root = tmp_path / "exp"
    assert all((root / s.id / DONE).is_file() for s in steps)
    rows = read_results(root / "results.csv")
    cells = {(r["method"], r["variant"], r["eval_task"], r["calibrator"], r["metric"]) for r in rows}
    assert ("cal-grpo", "lambda=0.005", "other", "none", "ece") in cells
    assert ("cal-grpo", "", "other", "platt", "accuracy") in cells
    assert ("cal-grpo", "", "builtin", "platt", "ece") in cells
    ece = next(r for r in rows if r["metric"] == "ece")
    assert (ece["value"], ece["ci_low"], ece["ci_high"]) == (0.2, 0.1, 0.3)
    domain = {(r["eval_task"], r["calibrator"]): r["domain"] for r in rows}
    assert domain[("other", "platt")] == "ood" and domain[("builtin", "none")] == "in"
    assert list(json.loads(json.dumps(RESULT_COLUMNS))) == (root / "results.csv").read_text().splitlines()[0].split(",")
    # The selected adapter is a copy of the training run's final adapter.
    assert (root / "runs/m1/sft/builtin/select/adapter/adapter_config.json").is_file()

    before = (root / "results.csv").read_text()
    again = FakeDecal()
    run_experiment(config, out=root, executor=again)
    assert again.calls == []
    assert (root / "results.csv").read_text() == before
    events = [json.loads(line)["event"] for line in (root / STEP_LOG).read_text().splitlines()]
    assert events.count("skip") == len(steps)


def test_failure_then_resume_reruns_only_unfinished_steps(tmp_path):
    config = experiment_config_from_dict(tiny_config())
    root = tmp_path / "exp"
    failing = FakeDecal(fail_on="/sft/builtin/train")
    with pytest.raises(StepFailedError, match=r"runs/m1/sft/builtin/train failed.*log\.txt"):
        run_experiment(config, out=root, executor=failing)
    finished = {_flag(c, "--out") for c in failing.calls if c[0] == "evaluate"}
    assert finished and all("/base/" in f for f in finished)
    resumed = FakeDecal()
    run_experiment(config, out=root, executor=resumed)
    rerun = [c for c in resumed.calls if c[0] == "evaluate"]
    assert rerun and not any("/base/" in _flag(c, "--out") for c in rerun)
    assert any(c[0] == "train" and "/sft/" in _flag(c, "--out") for c in resumed.calls)


def test_dry_run_writes_nothing(tmp_path):
    config = experiment_config_from_dict(tiny_config())
    steps = run_experiment(config, out=tmp_path / "exp", dry_run=True, executor=FakeDecal(fail_on="train"))
    assert steps and not (tmp_path / "exp").exists()


PAPER_MODELS = ("Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")
PAPER_EVALS = {
    "commonsense_qa": [("commonsense_qa", "validation"), ("openbookqa", "test")],
    "openai_moderation": [("openai_moderation", "eval"), ("xstest", "test")],
}


def test_paper_plan_lists_every_cell_of_tables_1_and_4_to_9():
    config = load_experiment_config(ROOT / "configs" / "paper.yaml")
    steps = build_plan(config, "/tmp/paper-plan")
    evals = {
        (s.info["model"], s.info["method"], s.info["variant"], s.info["eval_task"], s.info["eval_split"])
        for s in steps
        if s.kind == "evaluate"
    }
    # Tables 1, 4, 6, 7 and Figure 1/4: every model x method x dataset.
    for model in PAPER_MODELS:
        for train_task, datasets in PAPER_EVALS.items():
            for method in ("base", "sft", "grpo", "cal-grpo"):
                for task, split in datasets:
                    assert (model, method, "", task, split) in evals, (model, method, task)
    # Table 8 (lambda) and Table 9 (beta) on Qwen3-1.7B / CSQA, in-domain and OOD.
    for variant in ("lambda=0.0005", "lambda=0.005"):
        for task, split in PAPER_EVALS["commonsense_qa"]:
            assert ("Qwen3-1.7B", "cal-grpo", variant, task, split) in evals
    for task, split in PAPER_EVALS["commonsense_qa"]:
        assert ("Qwen3-1.7B", "grpo", "beta=0.05", task, split) in evals
    # Table 5: Platt and isotonic after GRPO and cal-GRPO, fitted on OpenAI, applied to XSTest.
    calibrations = {(s.info["model"], s.info["method"], s.info["calibrator"]) for s in steps if s.kind == "calibrate"}
    for model in PAPER_MODELS:
        for method in ("grpo", "cal-grpo"):
            for cal in ("platt", "isotonic"):
                assert (model, method, cal) in calibrations
    cal_step = next(s for s in steps if s.kind == "calibrate")
    assert "openai_moderation-eval" in cal_step.commands[0][cal_step.commands[0].index("--fit") + 1]
    assert any("xstest-test" in a for a in cal_step.commands[0])
    # The paper's training settings: 500 examples, reasoning for GRPO, lambda 0.001.
    train = next(s for s in steps if s.id == "runs/Qwen3-1.7B/cal-grpo/commonsense_qa/train")
    assert train.commands[0][train.commands[0].index("--split") + 1] == "train500"
    evaluate = next(s for s in steps if s.id == "runs/Qwen3-8B/grpo/openai_moderation/eval/xstest-test").commands[0]
    assert evaluate[evaluate.index("--device") + 1] == "cuda" and "--reasoning" in evaluate
    assert yaml.safe_load(train.files["train.yaml"])["cal_lambda"] == 0.001
    # Tables 2 and 3: rollouts and swap on each base model for both train splits.
    analyses = {(s.info["model"], s.info["analysis"], s.info["task"]) for s in steps if s.kind == "analyze"}
    assert len(analyses) == 12


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path):
    config = experiment_config_from_dict(tiny_config())
    root = tmp_path / "exp"
    (root / "runs/m1/sft/builtin/train/checkpoint-2").mkdir(parents=True)  # left by a killed run
    fake = FakeDecal()
    run_experiment(config, out=root, executor=fake, only="runs/m1/*/builtin/train")
    trains = {_flag(c, "--out").split("/runs/m1/")[1]: c for c in fake.calls if c[0] == "train"}
    assert "--resume" in trains["sft/builtin/train"]
    assert "--resume" not in trains["cal-grpo/builtin/train"]


@pytest.mark.parametrize("name", ["paper", "cpu-small", "demo"])
def test_shipped_configs_validate_against_the_training_config(name, tmp_path):
    config = load_experiment_config(ROOT / "configs" / f"{name}.yaml")
    steps = build_plan(config, tmp_path)
    kinds = {s.kind for s in steps}
    assert {"train", "select", "evaluate", "calibrate"} <= kinds
    domains = {s.info["domain"] for s in steps if s.kind == "evaluate"}
    assert domains == {"in", "ood"}


def test_packaged_demo_config_is_the_repository_copy():
    from decal.commands.demo import demo_config_path

    assert demo_config_path().read_text() == (ROOT / "configs" / "demo.yaml").read_text()


def test_unknown_training_setting_is_caught_before_running():
    data = tiny_config()
    data["methods"][1]["train"] = {"lerning_rate": 0.1}
    with pytest.raises(ConfigError, match=r"methods\[1\]\.train\.lerning_rate.*Did you mean: learning_rate"):
        experiment_config_from_dict(data)
    data = tiny_config()
    data["methods"][1]["train"] = {"model": "x"}
    with pytest.raises(ConfigError, match="set by the experiment grid"):
        experiment_config_from_dict(data)


def test_a_second_runner_on_the_same_folder_is_refused(tmp_path):
    config = experiment_config_from_dict(tiny_config())
    root = tmp_path / "exp"
    seen = []

    def nested(argv, log_path):
        # While the first runner holds the folder, a second one must refuse to start.
        if not seen:
            with pytest.raises(DecalError, match="in use by another `decal run`"):
                run_experiment(config, out=root, executor=FakeDecal())
            seen.append(True)
        return FakeDecal()(argv, log_path)

    run_experiment(config, out=root, executor=nested)
    assert seen == [True]


def test_a_finished_step_run_with_other_settings_is_not_silently_reused(tmp_path):
    root = tmp_path / "exp"
    run_experiment(experiment_config_from_dict(tiny_config()), out=root, executor=FakeDecal())
    changed = tiny_config(evaluation={"limit": 3})
    with pytest.raises(ConfigError, match=r"finished step\(s\) were run with other settings.*runs/m1/base/builtin/eval"):
        run_experiment(experiment_config_from_dict(changed), out=root, executor=FakeDecal())
    # The same settings in a moved folder are still done: paths do not count.
    moved = tmp_path / "moved"
    root.rename(moved)
    again = FakeDecal()
    run_experiment(experiment_config_from_dict(tiny_config()), out=moved, executor=again)
    assert again.calls == []


# --- inference engines in experiment configs ------------------------------------------------------


class FakeDecalMany(FakeDecal):
    """Also answers `decal evaluate-many JOBS`: runs each job as `evaluate` and writes the results file."""

    def __call__(self, argv, log_path: Path) -> int:
        argv = list(argv)
        if argv[0] != "evaluate-many":
            return super().__call__(argv, log_path)
        self.calls.append(argv)
        spec = json.loads(Path(argv[1]).read_text())
        codes = [super(FakeDecalMany, self).__call__(["evaluate", *job["argv"]], Path(job["log"])) for job in spec["jobs"]]
        self.calls = self.calls[: len(self.calls) - len(codes)]  # the jobs ran inside the one call
        Path(spec["results"]).write_text(json.dumps({"codes": codes, "engines_started": 1}))
        return int(any(codes))


def _engine_config(**evaluation):
    data = tiny_config(
        models=[{"name": "m1", "path": "some/model", "engine_options": {"tensor_parallel_size": 2, "enforce_eager": False}},
                {"name": "m2", "path": "other/model"}],
        evaluation={"engine": "vllm", "engine_options": {"max_model_len": 4096, "tensor_parallel_size": 1}, **evaluation},
        analyses=[{"kind": "rollouts", "task": "builtin", "split": "train", "methods": ["base"], "models": ["m2"]}],
        calibrators=[], sweeps=[],
    )
    return experiment_config_from_dict(data)


def test_engine_and_model_engine_options_become_flags(tmp_path):
    steps = build_plan(_engine_config(), tmp_path)
    m1 = next(s for s in steps if s.id == "runs/m1/base/builtin/eval/builtin-validation").commands[0]
    assert _flag(m1, "--engine") == "vllm"
    assert _flag(m1, "--tensor-parallel-size") == "2"  # the model's option wins over the evaluation's
    assert _flag(m1, "--max-model-len") == "4096"
    assert "enforce_eager=false" in m1
    m2 = next(s for s in steps if s.id == "runs/m2/base/builtin/eval/builtin-validation").commands[0]
    assert _flag(m2, "--tensor-parallel-size") == "1" and "--engine-arg" not in m2
    analysis = next(s for s in steps if s.kind == "analyze").commands[0]
    assert _flag(analysis, "--engine") == "vllm" and _flag(analysis, "--max-model-len") == "4096"
    # all training comes first, so a model's evaluations are ready together
    kinds = [s.kind for s in steps]
    assert max(i for i, k in enumerate(kinds) if k in ("train", "select")) < min(i for i, k in enumerate(kinds) if k == "evaluate")


def test_configs_without_engine_plan_the_commands_they_always_did(tmp_path):
    steps = build_plan(experiment_config_from_dict(tiny_config()), tmp_path)
    assert not any("--engine" in c for s in steps for c in s.commands for c in c)
    assert not any(s.info.get("engine_group") for s in steps)


@pytest.mark.parametrize("where, value, message", [
    ("evaluation", {"engine": "vllm", "engine_options": {"enforce_eagre": True}}, "did you mean enforce_eager"),
    ("evaluation", {"engine": "vllm", "engine_options": {"max_model_len": 0}}, "--max-model-len must be a positive integer"),
    ("evaluation", {"engine": "hf", "engine_options": {"max_model_len": 512}}, "applies to --engine vllm only"),
    ("evaluation", {"engine": "tgi"}, "`evaluation.engine`: unknown engine 'tgi'; choose one of: hf, vllm, remote"),
])
def test_bad_engine_settings_in_configs_name_the_field(where, value, message):
    with pytest.raises(ConfigError, match=message):
        experiment_config_from_dict(tiny_config(**{where: value}))


def test_vllm_grid_scores_every_evaluation_of_a_model_in_one_process(tmp_path):
    config = _engine_config()
    fake = FakeDecalMany()
    steps = run_experiment(config, out=tmp_path / "exp", executor=fake)
    root = tmp_path / "exp"
    assert all((root / s.id / DONE).is_file() for s in steps)
    many = [c for c in fake.calls if c[0] == "evaluate-many"]
    assert len(many) == 2  # one per model
    assert not any(c[0] == "evaluate" for c in fake.calls)
    for call in many:
        jobs = json.loads(Path(call[1]).read_text())["jobs"]
        models = {_flag(j["argv"], "--model") for j in jobs}
        assert len(models) == 1
        # base, sft and cal-grpo, in-domain and OOD: six evaluations of one model
        assert len(jobs) == 6 and sum("--adapter" in j["argv"] for j in jobs) == 4
    # each evaluation still gets its own metrics and DONE marker; a rerun redoes nothing
    assert all((root / s.id / "metrics.json").is_file() for s in steps if s.kind == "evaluate")
    again = FakeDecalMany()
    run_experiment(config, out=root, executor=again)
    assert again.calls == []


def test_a_failed_evaluation_in_a_batch_fails_its_step_only(tmp_path):
    config = _engine_config()
    root = tmp_path / "exp"
    fake = FakeDecalMany(fail_on="other-test")
    with pytest.raises(StepFailedError, match=r"eval/other-test failed: `decal evaluate` exited with 3"):
        run_experiment(config, out=root, executor=fake)
    done = {s.id for s in build_plan(config, root) if (root / s.id / DONE).is_file()}
    assert "runs/m1/base/builtin/eval/builtin-validation" in done
    assert "runs/m1/base/builtin/eval/other-test" not in done


def _warm_config(**overrides) -> dict:
    data = tiny_config(**overrides)
    data["methods"] = [
        {"name": "base", "method": "base", "reasoning": False},
        {"name": "warm", "method": "sft", "reasoning": True, "train": {"max_steps": 2}},
        {"name": "cal-grpo", "method": "cal-grpo", "init_from": "warm", "train": {"max_steps": 2}},
    ]
    return data


def test_init_from_continues_the_selected_adapter_of_another_method(tmp_path):
    config = experiment_config_from_dict(_warm_config())
    steps = build_plan(config, tmp_path)
    by_id = {s.id: s for s in steps}
    for train_id in ("runs/m1/cal-grpo/builtin/train", "runs/m1/cal-grpo_lambda=0.005/builtin/train"):
        train = by_id[train_id]
        assert train.deps == ("runs/m1/warm/builtin/select",)
        settings = yaml.safe_load(train.files["train.yaml"])
        assert settings["init_adapter"] == str(tmp_path.resolve() / "runs/m1/warm/builtin/select/adapter")
    warm = yaml.safe_load(by_id["runs/m1/warm/builtin/train"].files["train.yaml"])
    assert "init_adapter" not in warm and warm["reasoning"] is True
    # The fake runner runs the plan front to back: the warm start is selected before GRPO trains.
    fake = FakeDecal()
    run_experiment(config, out=tmp_path / "exp", executor=fake)
    order = [_flag(c, "--out").split("/runs/m1/")[1] for c in fake.calls if c[0] == "train"]
    assert order.index("warm/builtin/train") < order.index("cal-grpo/builtin/train")


@pytest.mark.parametrize(
    "init_from, match",
    [("nothing", "Unknown name 'nothing'"), ("cal-grpo", "Unknown name 'cal-grpo'"), ("base", "must name a trained method")],
)
def test_bad_init_from_is_rejected(init_from, match):
    data = _warm_config()
    data["methods"][2]["init_from"] = init_from
    with pytest.raises(ConfigError, match=match):
        experiment_config_from_dict(data)
    data = _warm_config()
    data["methods"][2]["train"]["init_adapter"] = "x"
    with pytest.raises(ConfigError, match="not both"):
        experiment_config_from_dict(data)


def test_init_from_a_method_not_trained_for_the_model_is_a_plan_error(tmp_path):
    data = _warm_config(models=[{"name": "m1", "path": "a"}, {"name": "m2", "path": "b"}])
    data["methods"][1]["models"] = ["m1"]
    with pytest.raises(ValueError, match="runs/m2/warm/builtin/select, which the grid does not train"):
        build_plan(experiment_config_from_dict(data), tmp_path)
