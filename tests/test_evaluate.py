"""Tests for decal.evaluation and `decal evaluate`: run folders, resume after crashes, determinism,
one-line CLI errors, and memory that does not grow with the number of examples.

Most tests use a word-level model (32-word vocabulary, one tiny layer) so that thousands of
examples score in seconds; the CLI test on a real task uses the tiny Qwen3 with the real tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from decal.cli import main
from decal.errors import ConfigError, DataError
from decal.evaluation import PREDICTIONS, RUN_JSON, evaluate
from decal.records import read_records
from decal.tasks.schema import DecisionExample, PromptTemplate, Task

TESTS = Path(__file__).resolve().parent
WORDS = ["<pad>", "<eos>", "<unk>", "Safe", "Unsafe", "Is", "this", "safe", "?", "</think>"] + [f"w{i}" for i in range(22)]
TEMPLATE = PromptTemplate(name="toy", version="1", non_reasoning="Is this safe ? {input}", reasoning="Is this safe ? {input}")


def make_task(n: int, *, reasoning: bool = False, words_per_input: int = 5) -> Task:
    """n examples of varying length, alternating gold labels."""
    examples = tuple(
        DecisionExample(
            id=f"ex-{i:05d}",
            labels=("Safe", "Unsafe"),
            label=("Safe", "Unsafe")[i % 2],
            input=" ".join(f"w{(7 * i + j) % 22}" for j in range(1 + i % words_per_input)),
        )
        for i in range(n)
    )
    return Task(name="toy", split="test", examples=examples, template=TEMPLATE, reasoning=reasoning)


def build_word_model(path: Path) -> Path:
    """Save a word-level tokenizer and a one-layer Llama over it to `path` (safetensors)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Every position carries a constant feature (dim 0) that the head turns into a bonus for
        # the marker and the labels, so sampled completions often reach a decision (and often not).
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[[WORDS.index("</think>"), WORDS.index("Safe"), WORDS.index("Unsafe")], 0] = 0.6
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run several times faster on one thread on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory) -> Path:
    return build_word_model(tmp_path_factory.mktemp("word-model"))


@pytest.fixture(scope="module")
def word_model(word_model_dir):
    from decal.models import load_model

    return load_model(word_model_dir)


def _rows(folder: Path) -> dict[str, dict]:
    """Records by id, without the timing field (the only one allowed to differ between runs)."""
    rows = {}
    for line in (folder / PREDICTIONS).read_text().splitlines():
        row = json.loads(line)
        row.pop("seconds")
        assert row["id"] not in rows, f"id {row['id']} doubled"
        rows[row["id"]] = row
    return rows


def _evaluate(word_model, task, out, **kw):
    model, tok = word_model
    kw.setdefault("batch_size", 4)
    return evaluate(model, tok, task, out_dir=out, model_name="word", progress=False, max_new_tokens=6, **kw)


def test_run_folder_holds_every_example_once_and_run_json(word_model, tmp_path):
    task = make_task(30)
    folder = _evaluate(word_model, task, tmp_path / "run", seed=3)
    records = read_records(folder)
    assert sorted(r.id for r in records) == [ex.id for ex in task.examples]
    for r in records:
        # a read at a fixed position: valid when the model's top token there is an option's (decal.recording)
        assert r.valid == r.argmax_is_option and r.emitted_token == r.top_token is not None
        assert r.confidence == max(r.option_probs) and r.prediction == r.labels[r.option_probs.index(r.confidence)]
        assert r.correct == (r.valid and r.prediction == r.label) and r.seed == 3 and r.prompt_version == "1"
        assert r.label_mass == pytest.approx(sum(r.option_probs))
    assert any(r.valid for r in records) and not all(r.valid for r in records)
    meta = json.loads((folder / RUN_JSON).read_text())
    assert meta["seed"] == 3 and meta["mode"] == "non-reasoning" and meta["model"] == "word"
    assert set(meta["versions"]) == {"decal", "torch", "transformers", "trl", "peft"}
    assert all(meta["versions"].values())
    assert "git_revision" in meta and meta["finished"] and meta["data_sha256"] == {}


def test_limit_scores_the_first_examples(word_model, tmp_path):
    folder = _evaluate(word_model, make_task(30), tmp_path / "run", limit=7)
    assert sorted(r.id for r in read_records(folder)) == [f"ex-{i:05d}" for i in range(7)]


def test_data_file_checksum_is_recorded(word_model, tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text('{"id": 1}\n')
    folder = evaluate(*word_model, make_task(4), out_dir=tmp_path / "run", model_name="w", progress=False, task_name=str(data))
    meta = json.loads((folder / RUN_JSON).read_text())
    assert meta["data_sha256"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}


@pytest.mark.parametrize("reasoning", [False, True])
def test_same_seed_twice_gives_identical_predictions(word_model, tmp_path, reasoning):
    task = make_task(20, reasoning=reasoning)
    a = _rows(_evaluate(word_model, task, tmp_path / "a", temperature=1.0, seed=7))
    b = _rows(_evaluate(word_model, task, tmp_path / "b", temperature=1.0, seed=7))
    assert a == b
    if reasoning:
        c = _rows(_evaluate(word_model, task, tmp_path / "c", temperature=1.0, seed=8))
        assert [r["completion"] for r in a.values()] != [r["completion"] for r in c.values()]


def test_reasoning_records_have_completions_and_invalid_ones_are_wrong(word_model, tmp_path):
    folder = _evaluate(word_model, make_task(40, reasoning=True), tmp_path / "run", temperature=1.0)
    records = read_records(folder)
    assert all(r.completion is not None for r in records)
    invalid = [r for r in records if not r.valid]
    valid = [r for r in records if r.valid]
    assert invalid and valid  # the random word model produces both
    for r in invalid:
        assert not r.correct and r.confidence == max(r.option_probs)
    for r in valid:
        assert r.emitted_token == r.prediction and "</think>" in r.completion
        assert r.confidence == r.option_probs[r.labels.index(r.prediction)]


@pytest.mark.parametrize("reasoning", [False, True])
def test_interrupted_run_with_torn_line_resumes_to_the_uninterrupted_records(word_model, tmp_path, monkeypatch, reasoning):
    import decal.evaluation as ev

    task = make_task(26, reasoning=reasoning)
    full = _rows(_evaluate(word_model, task, tmp_path / "full", temperature=1.0, seed=1, batch_size=3))
    calls = {"n": 0}
    original = ev.score_records

    def crash_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "score_records", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(word_model, task, tmp_path / "cut", temperature=1.0, seed=1, batch_size=3)
    monkeypatch.setattr(ev, "score_records", original)
    predictions = tmp_path / "cut" / PREDICTIONS
    assert len(predictions.read_text().splitlines()) == 9
    with predictions.open("a") as f:  # a crash in the middle of a write
        f.write('{"id": "ex-00025", "task": "to')
    _evaluate(word_model, task, tmp_path / "cut", temperature=1.0, seed=1, batch_size=3)
    assert _rows(tmp_path / "cut") == full


def test_resume_with_other_settings_is_refused(word_model, tmp_path):
    _evaluate(word_model, make_task(6), tmp_path / "run", seed=1)
    with pytest.raises(ConfigError, match="other settings \\(seed: 1 -> 2\\)"):
        _evaluate(word_model, make_task(6), tmp_path / "run", seed=2)


def test_empty_split_and_duplicate_ids_are_errors(word_model, tmp_path):
    empty = Task(name="toy", split="test", examples=(), template=TEMPLATE)
    with pytest.raises(DataError, match="no examples"):
        _evaluate(word_model, empty, tmp_path / "a")
    dup = make_task(3)
    dup = Task(name="toy", split="test", examples=dup.examples + dup.examples[:1], template=TEMPLATE)
    with pytest.raises(DataError, match="duplicate ids"):
        _evaluate(word_model, dup, tmp_path / "b")


def test_forced_decision_is_invalid_and_wrong():
    from decal.decision import Decision, DecisionTokens
    from decal.engines.base import GeneratedDecision, OptionScores
    from decal.recording import RunFields, record_from_generation, record_from_scores

    ex = DecisionExample(id="1", labels=("A", "B", "C"), label="B")
    tokens = DecisionTokens(labels=("A", "B", "C"), token_ids=(1, 2, 3), tokens=("A", "B", "C"))
    run = RunFields(task="t", split="s")

    def rollout(option):
        return GeneratedDecision(completion_ids=[9], completion="", decision=Decision(0 if option >= 0 else -1, option),
                                 option_probs=[0.1, 0.3, 0.2], emitted_token=None, valid=option >= 0, forced=option < 0,
                                 top_token="B", top_token_id=2)

    rec = record_from_generation(ex, rollout(-1), tokens, run=run)
    assert (rec.prediction, rec.correct, rec.valid, rec.confidence) == ("B", False, False, 0.3)
    rec = record_from_generation(ex, rollout(2), tokens, run=run)
    assert (rec.prediction, rec.correct, rec.valid, rec.confidence) == ("C", False, True, 0.2)
    rec = record_from_scores(ex, OptionScores([0.1, 0.3, 0.2], "B", 2, True), tokens, run=run)
    assert (rec.prediction, rec.correct, rec.valid) == ("B", True, True)
    with pytest.raises(ValueError, match="3 values"):
        record_from_scores(ex, OptionScores([0.5, 0.5], "B", 2, True), tokens, run=run)


# --- the command line --------------------------------------------------------------------------


@pytest.fixture
def toy_tasks(monkeypatch):
    """`decal evaluate --task toyN` loads make_task(N); `--task empty` an empty split."""
    import decal.commands.evaluate as cmd

    def load(task, split, *, data_dir, reasoning):
        if task == "empty":
            return Task(name="empty", split=split, examples=(), template=TEMPLATE, reasoning=reasoning)
        if task == "long":
            ex = DecisionExample(id="long", labels=("Safe", "Unsafe"), label="Safe", input="w1 " * 200)
            return Task(name="long", split=split, examples=(ex,), template=TEMPLATE, reasoning=reasoning)
        return make_task(int(task.removeprefix("toy")), reasoning=reasoning)

    monkeypatch.setattr(cmd, "_load_task", load)


def _cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_run_folder_and_prints_summary(word_model_dir, tmp_path, toy_tasks, capsys):
    code, out, err = _cli(capsys, "evaluate", "--model", str(word_model_dir), "--task", "toy12", "--split", "test",
                          "--out", str(tmp_path), "--name", "../../escape", "--no-progress")
    assert code == 0, err
    folder = tmp_path / "escape"  # the run name cannot leave --out
    assert len(read_records(folder)) == 12
    assert "accuracy" in out and "ECE" in out and "invalid" in out and "confidence>0.99" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model-anywhere/x/y", "--task", "toy3"], "unknown model"),
        (["--model", "{model}", "--adapter", "{tmp}/no-adapter", "--task", "toy3"], "adapter"),
        (["--model", "{model}", "--task", "empty"], "no examples"),
        (["--model", "{model}", "--task", "long"], "in the model's context of"),
        (["--model", "{model}", "--task", "toy3", "--batch-size", "0"], "batch-size"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(word_model_dir, tmp_path, toy_tasks, capsys, argv, message):
    argv = [a.format(model=word_model_dir, tmp=tmp_path) for a in argv]
    code, _, err = _cli(capsys, "evaluate", *argv, "--split", "test", "--out", str(tmp_path), "--no-progress", "--offline")
    assert code != 0
    # transformers may draw a progress bar first; decal itself prints exactly one error line
    lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err


def test_cli_on_the_builtin_task_with_tiny_qwen3(tiny_qwen3_dir, tmp_path, capsys):
    code, out, err = _cli(capsys, "evaluate", "--model", str(tiny_qwen3_dir), "--task", "builtin", "--split", "test",
                          "--limit", "5", "--out", str(tmp_path), "--name", "b", "--no-progress")
    assert code == 0, err
    records = read_records(tmp_path / "b")
    assert len(records) == 5 and records[0].labels == ["Positive", "Negative"]


_DRIVER = """
import sys, time
sys.path.insert(0, {tests!r})
import decal.commands.evaluate as cmd
import decal.evaluation as ev
from test_evaluate import make_task
cmd._load_task = lambda task, split, *, data_dir, reasoning: make_task(24, reasoning=reasoning)
original = ev.score_records
def slow(*args, **kwargs):
    time.sleep(0.25)  # time for the test to kill the process between batches
    return original(*args, **kwargs)
ev.score_records = slow
from decal.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_at_several_points_then_rerun_equals_uninterrupted(word_model_dir, word_model, tmp_path):
    """Issue #9a: kill `decal evaluate` with SIGKILL mid-run, twice, rerun; no id lost or doubled."""
    reference = _rows(evaluate(*word_model, make_task(24, reasoning=True), out_dir=tmp_path / "ref",
                               model_name=str(word_model_dir), batch_size=2, max_new_tokens=6, temperature=1.0,
                               seed=5, progress=False, task_name="toy"))
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(TESTS)))
    argv = [sys.executable, str(driver), "evaluate", "--model", str(word_model_dir), "--task", "toy", "--split", "test",
            "--reasoning", "--batch-size", "2", "--max-new-tokens", "6", "--temperature", "1", "--seed", "5",
            "--out", str(tmp_path), "--name", "killed", "--no-progress", "--dtype", "float32"]
    predictions = tmp_path / "killed" / PREDICTIONS
    for kill_at in (2, 12):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if predictions.exists() and len(predictions.read_bytes().splitlines()) >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
        assert len(predictions.read_bytes().splitlines()) < 24
    assert subprocess.run(argv, capture_output=True, timeout=300).returncode == 0
    assert _rows(tmp_path / "killed") == reference


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_examples(word_model, tmp_path):
    """Issue #9d: Python allocations while scoring 20,000 examples stay within 10% of 2,000.

    A first run over a few chunks warms up interpreter free lists and library caches, whose
    one-off growth would otherwise be charged to whichever run comes first. The batch size keeps
    a chunk (32 batches) under 2,000 examples, so both measured runs hold full chunks.
    """
    peaks = {}
    tracemalloc.start()
    try:
        for n in (4_000, 2_000, 20_000):
            task = make_task(n)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            _evaluate(word_model, task, tmp_path / f"run{n}", batch_size=60)
            peaks[n] = tracemalloc.get_traced_memory()[1] - base
            del task
    finally:
        tracemalloc.stop()
    assert sum(1 for _ in (tmp_path / "run20000" / PREDICTIONS).open()) == 20_000
    assert peaks[20_000] <= 1.10 * peaks[2_000], peaks
