"""A user's own task files and templates, and the `decal tasks` command line, including bad data
that must end in one error line naming the file, line and field (never a traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from decal.cli import main
from decal.errors import ConfigError
from decal.tasks import load_task

DATA = Path(__file__).parent / "data" / "tasks"


# --- loading good files --------------------------------------------------------------------------

def test_jsonl_multiple_choice_with_splits_and_fact():
    task = load_task(DATA / "good_mc.jsonl", "all")
    assert [ex.id for ex in task] == ["q1", "q2", "q3"]
    assert task.labels == ("A", "B")
    assert task.examples[1].fact == "Paris is the capital of France."
    train = load_task(DATA / "good_mc.jsonl", "train")
    assert [ex.id for ex in train] == ["q1", "q3"]
    assert train.data_files == (str(DATA / "good_mc.jsonl"),)
    message = task.user_message(task.examples[1])
    assert "Fact: Paris is the capital of France.\nQuestion: Capital of France?\nOptions:\nA. Paris\nB. Rome" in message
    reasoning = load_task(DATA / "good_mc.jsonl", "all", reasoning=True)
    assert "</think>" in reasoning.user_message(reasoning.examples[0])


def test_unknown_split_of_a_file_lists_available():
    with pytest.raises(ValueError, match="Available: all, test, train"):
        load_task(DATA / "good_mc.jsonl", "validation")


def test_csv_classification_with_labels_column():
    task = load_task(DATA / "good_cls.csv", "all")
    assert task.labels == ("Positive", "Negative")
    assert task.examples[1].input == "Slow, dull and far too long"
    assert task.examples[1].label == "Negative"
    assert '"Slow, dull and far too long"' in task.user_message(task.examples[1])


def test_csv_options_json_and_context_column():
    task = load_task(DATA / "good_options_json.csv", "all")
    assert task.examples[0].options == ("3", "4")
    assert task.examples[0].fact == "Basic arithmetic."
    assert task.examples[1].fact is None


def test_template_file_replaces_prompt():
    task = load_task(DATA / "good_mc.jsonl", "all", template=DATA / "template_ok.txt")
    assert task.user_message(task.examples[0]) == "Q: 2 + 2 = ?\nA. 3\nB. 4\nPick one of A, B."
    assert task.template.version == "file:template_ok.txt"


@pytest.mark.parametrize("template, match", [
    ("template_bad_field.txt", r"unknown template field \{context\}"),
    ("template_option3.txt", "option3"),
])
def test_bad_template_files(template, match):
    with pytest.raises(ConfigError, match=match):
        load_task(DATA / "good_mc.jsonl", "all", template=DATA / template)


def test_template_file_on_builtin_task():
    task = load_task("builtin", "test", template=DATA / "template_ok.txt", n=2)
    assert task.user_message(task.examples[0]).startswith("Q: \n\nPick one of Positive, Negative.")


def test_unknown_task_name_suggests():
    with pytest.raises(ValueError, match=r"Unknown task 'commonsense'\. Did you mean: commonsense_qa\? Available: "):
        load_task("commonsense", "train")


# --- bad data through the CLI --------------------------------------------------------------------

BAD = [
    # (file, line, text that must be in the message)
    ("bad_json.jsonl", 2, "invalid JSON"),
    ("missing_label.jsonl", 2, "field 'label'"),
    ("unknown_label.jsonl", 2, "field 'label'"),
    ("duplicate_ids.jsonl", 2, "field 'id'"),
    ("one_option.jsonl", 2, "field 'options'"),
    ("empty_question.jsonl", 2, "field 'question'"),
    ("missing_columns.csv", 1, "field 'label'"),
    ("not_utf8.jsonl", 2, "not UTF-8"),
    ("empty.jsonl", 1, "empty"),
    ("blank_line.jsonl", 2, "blank line"),
    ("ragged.csv", 3, "fields"),
    ("missing_label.csv", 3, "field 'label'"),
    ("mixed_labels.jsonl", 2, "field 'labels'"),
]


@pytest.mark.parametrize("name, line, needle", BAD)
def test_bad_task_file_is_one_error_line(capsys, name, line, needle):
    path = DATA / name
    code = main(["tasks", "show", str(path), "--split", "all"])
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert f"{path}:{line}" in lines[0]
    assert needle in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_bad_file_in_a_fresh_process_exits_non_zero():
    path = DATA / "unknown_label.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "decal", "tasks", "show", str(path), "--split", "all"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}:2: field 'label': gold label 'C' is not one of ['A', 'B']"
    ]


def test_missing_file_and_unknown_task_through_cli(capsys):
    assert main(["tasks", "show", str(DATA / "nope.jsonl")]) == 1
    assert main(["tasks", "show", "xstset", "--split", "test"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "nope.jsonl" in err[0]
    assert "Did you mean: xstest?" in err[1]


# --- the tasks command ---------------------------------------------------------------------------

def test_tasks_list(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("commonsense_qa", "openbookqa", "openai_moderation", "xstest", "builtin"):
        assert f"{name}\n" in out
    assert "train500 (500)" in out and "eval (1,180)" in out and "test (450)" in out


def test_tasks_show_bare_user_message(capsys):
    assert main(["tasks", "show", "builtin:difficulty=0", "--split", "test", "--n", "2"]) == 0
    out = capsys.readouterr().out
    task = load_task("builtin:difficulty=0", "test", n=2)
    for ex in task:
        assert f"===== id {ex.id}  gold {ex.label} =====\n{task.user_message(ex)}\n" in out
    assert "test-0002" not in out


def test_tasks_show_with_model_renders_chat_and_decision_tokens(capsys, qwen3_tokenizer_dir):
    code = main(["tasks", "show", "builtin", "--split", "validation", "--n", "1", "--model", str(qwen3_tokenizer_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "<|im_start|>user\nIs the following review" in out
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" in out
    assert "decision tokens: Positive -> 'Positive'" in out


def test_tasks_show_reasoning_on_a_file(capsys):
    code = main(["tasks", "show", str(DATA / "good_mc.jsonl"), "--split", "train", "--reasoning", "--n", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "split train: 2 examples" in out and "reasoning" in out and "</think>" in out


def test_tasks_show_with_template_file(capsys):
    code = main(["tasks", "show", str(DATA / "good_mc.jsonl"), "--template", str(DATA / "template_ok.txt"), "--n", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "===== id q1  gold B =====\nQ: 2 + 2 = ?\nA. 3\nB. 4\nPick one of A, B.\n" in out


def test_show_epilog_examples_run(capsys, data_dir, qwen3_tokenizer_dir):
    import shlex

    from decal.commands.tasks import SHOW_EPILOG

    substitutions = {
        "../shared/models/qwen3-tokenizer": str(qwen3_tokenizer_dir),
        "my_task.jsonl": str(DATA / "good_mc.jsonl"),
        "my_prompt.txt": str(DATA / "template_ok.txt"),
    }
    commands = [line.strip() for line in SHOW_EPILOG.splitlines() if line.strip().startswith("decal ")]
    assert len(commands) == 4
    for command in commands:
        for old, new in substitutions.items():
            command = command.replace(old, new)
        argv = shlex.split(command)[1:] + ["--data-dir", str(data_dir)]
        assert main(argv) == 0, command
        assert "===== id " in capsys.readouterr().out
