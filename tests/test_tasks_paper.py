"""The paper's four datasets: split sizes, first ids, label counts, drawn splits, both layouts,
and the Appendix A prompts compared with text cut out of the paper by the test itself."""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import re
from pathlib import Path

import pytest

from decal.tasks import load_task
from decal.tasks.paper import MODERATION_FLAGS

PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "calibration-aware-rl-paper.txt"

# (task, split) -> (size, first id, label counts); counts from shared/data/SOURCES.md
EXPECTED = {
    ("commonsense_qa", "train"): (9741, "075e483d21c29a511267ef62bedc0461", {"A": 1909, "B": 1973, "C": 1946, "D": 1985, "E": 1928}),
    ("commonsense_qa", "validation"): (1221, "1afa02df02c908a558b4036e80242fac", {"A": 239, "B": 255, "C": 241, "D": 251, "E": 235}),
    ("commonsense_qa", "train500"): (500, "a69bd1bf3c06a233d696a00d71a9db36", {"A": 98, "B": 96, "C": 95, "D": 107, "E": 104}),
    ("openbookqa", "train"): (4957, "7-980", {"A": 1378, "B": 1212, "C": 1146, "D": 1221}),
    ("openbookqa", "validation"): (500, "8-376", {"A": 126, "B": 138, "C": 110, "D": 126}),
    ("openbookqa", "test"): (500, "8-343", {"A": 138, "B": 126, "C": 132, "D": 104}),
    ("openai_moderation", "train"): (500, "3", {"Safe": 355, "Unsafe": 145}),
    ("openai_moderation", "eval"): (1180, "1", {"Safe": 803, "Unsafe": 377}),
    ("openai_moderation", "all"): (1680, "1", {"Safe": 1158, "Unsafe": 522}),
    ("xstest", "test"): (450, "1", {"Safe": 250, "Unsafe": 200}),
}


@pytest.mark.parametrize("name, split", list(EXPECTED))
def test_split_size_first_id_and_label_counts(data_dir, name, split):
    size, first_id, counts = EXPECTED[name, split]
    task = load_task(name, split, data_dir=data_dir)
    assert len(task) == size
    assert task.examples[0].id == first_id
    assert dict(collections.Counter(ex.label for ex in task)) == counts
    assert len({ex.id for ex in task}) == size


def test_env_var_points_loaders_at_the_files(data_dir, monkeypatch):
    monkeypatch.setenv("DECAL_DATA_DIR", str(data_dir))
    task = load_task("xstest", "test")
    assert len(task) == 450
    assert task.data_files == (str(data_dir / "xstest" / "xstest_prompts.csv"),)
    assert load_task("commonsense_qa", "train500").data_files == (str(data_dir / "commonsense_qa" / "train.jsonl"),)


# sha256 of the comma-joined ids: the same on every run and platform (seeded PCG64 draw).
DRAWN_SHA256 = {
    ("commonsense_qa", "train500"): "09a1df6019c2dbccb0c26c673d56bba60693709b1793aec0bb8d9cd4176a71aa",
    ("openai_moderation", "train"): "75944102a8d07c9dc6e6fa3dda8fd46c9032e83b6b906a7a1ea0239c4c949f85",
}


@pytest.mark.parametrize("name, split, pool, evaluation", [
    ("commonsense_qa", "train500", "train", "validation"),
    ("openai_moderation", "train", "all", "eval"),
])
def test_drawn_training_subsets_stable_and_disjoint(data_dir, name, split, pool, evaluation):
    drawn = load_task(name, split, data_dir=data_dir)
    ids = [ex.id for ex in drawn]
    assert hashlib.sha256(",".join(ids).encode()).hexdigest() == DRAWN_SHA256[name, split]
    assert ids == [ex.id for ex in load_task(name, split, data_dir=data_dir)]
    pool_ids = [ex.id for ex in load_task(name, pool, data_dir=data_dir)]
    assert set(ids) <= set(pool_ids)
    # drawn rows keep file order
    assert ids == [i for i in pool_ids if i in set(ids)]
    eval_ids = {ex.id for ex in load_task(name, evaluation, data_dir=data_dir)}
    assert not set(ids) & eval_ids
    if name == "openai_moderation":
        assert set(ids) | eval_ids == set(pool_ids)


def test_moderation_missing_flags_are_unknown(data_dir):
    task = load_task("openai_moderation", "all", data_dir=data_dir)
    rows = [json.loads(line) for line in (data_dir / "openai_moderation" / "samples-1680.jsonl").open()]
    for ex, row in zip(task, rows, strict=True):
        present = [row[f] for f in MODERATION_FLAGS if f in row]
        assert ex.label == ("Unsafe" if 1 in present else "Safe")
    # a row with some flags missing and the others 0 is Safe (missing means unknown, not 1)
    partial = next(i for i, r in enumerate(rows) if len([f for f in MODERATION_FLAGS if f in r]) < 8 and 1 not in r.values())
    assert task.examples[partial].label == "Safe" and task.examples[partial].id == str(partial + 1)


def test_openbookqa_carries_fact(data_dir):
    task = load_task("openbookqa", "test", data_dir=data_dir)
    assert task.examples[0].fact == "using less resources usually causes money to be saved"
    assert all(ex.fact for ex in task)


# --- the Hugging Face hub layout, with in-memory rows ------------------------------------------

def _hub_rows(name: str, path: Path) -> list[dict]:
    """The file's rows rewritten in the hub dataset's column layout."""
    if name == "xstest":
        with path.open(newline="", encoding="utf-8") as f:
            return [{k: r[k] for k in ("prompt", "focus", "type", "note", "label")} for r in csv.DictReader(f)]
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    if name == "openai_moderation":
        return [{"prompt": r["prompt"], **{f: r.get(f) for f in MODERATION_FLAGS}} for r in rows]
    out = []
    for r in rows:
        q = r["question"]
        choices = {"label": [c["label"] for c in q["choices"]], "text": [c["text"] for c in q["choices"]]}
        if name == "commonsense_qa":
            out.append({"id": r["id"], "question": q["stem"], "question_concept": q["question_concept"], "choices": choices, "answerKey": r["answerKey"]})
        else:
            out.append({"id": r["id"], "question_stem": q["stem"], "choices": {"text": choices["text"], "label": choices["label"]},
                        "answerKey": r["answerKey"], "fact1": r["fact1"], "humanScore": r["humanScore"],
                        "clarity": r["clarity"], "turkIdAnonymized": r["turkIdAnonymized"]})
    return out


HUB = {
    # (task, split) -> (repo, config, hub split, file)
    ("commonsense_qa", "validation"): ("tau/commonsense_qa", None, "validation", "commonsense_qa/validation.jsonl"),
    ("commonsense_qa", "train500"): ("tau/commonsense_qa", None, "train", "commonsense_qa/train.jsonl"),
    ("openbookqa", "test"): ("allenai/openbookqa", "additional", "test", "openbookqa/test.jsonl"),
    ("openai_moderation", "eval"): ("mmathys/openai-moderation-api-evaluation", None, "train", "openai_moderation/samples-1680.jsonl"),
    ("xstest", "test"): ("walledai/XSTest", None, "test", "xstest/xstest_prompts.csv"),
}


@pytest.mark.parametrize("name, split", list(HUB))
def test_hub_layout_gives_identical_examples(data_dir, monkeypatch, name, split):
    import datasets

    repo, config, hub_split, relative = HUB[name, split]
    rows = _hub_rows(name, data_dir / relative)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return rows

    monkeypatch.delenv("DECAL_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_task(name, split)
    from_files = load_task(name, split, data_dir=data_dir)
    assert calls == [(repo, config, hub_split)]
    assert from_hub.examples == from_files.examples
    assert [ex.meta for ex in from_hub][:5] == [ex.meta for ex in from_files][:5]


def test_hub_failure_is_one_line_with_hint(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv("DECAL_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(Exception, match="DECAL_DATA_DIR") as info:
        load_task("xstest", "test")
    assert "\n" not in str(info.value)


def test_missing_data_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="xstest_prompts.csv"):
        load_task("xstest", "test", data_dir=tmp_path)


# --- Appendix A prompts, cut out of the paper here ---------------------------------------------

def _appendix() -> str:
    if not PAPER.exists():
        pytest.skip(f"paper text not found at {PAPER}")
    text = PAPER.read_text(encoding="utf-8")
    return text[text.index("\nA Experimental Details"):text.index("\nB Additional Experimental Results")]


def _paper_prompt(start: str, end: str, occurrence: int) -> str:
    """The occurrence-th block of the appendix that starts with `start` and ends with `end`."""
    blocks = re.findall(re.escape(start) + r".*?" + re.escape(end), _appendix(), flags=re.S)
    return blocks[occurrence]


def _fill(text: str, ex) -> str:
    # Plain replacement (not str.format), so the reference does not share decal's rendering code.
    values = {"{question}": ex.question or "", "{fact}": ex.fact or "", "{input}": ex.input or ""}
    values.update({f"{{option{i + 1}}}": opt for i, opt in enumerate(ex.options or ())})
    for key, value in values.items():
        text = text.replace(key, value)
    return text


CSQA_START = "Answer the following multiple-choice question by selecting the single best option (A-E)."
OBQA_START = "Answer the following multiple-choice question by selecting the single best option (A-D)."
CASES = [
    # (task, split, reasoning, start, end, occurrence)
    ("commonsense_qa", "validation", False, CSQA_START, "E. {option5}", 0),
    ("commonsense_qa", "validation", True, CSQA_START, "E. {option5}", 1),
    ("openbookqa", "test", False, OBQA_START, "D. {option4}", 0),
    ("openbookqa", "test", True, OBQA_START, "D. {option4}", 1),
    ("openai_moderation", "eval", False, "You are a safety classification assistant.", "Classification:", 0),
    ("openai_moderation", "eval", True, "You are a safety classification assistant.", "Classification:", 0),
    ("xstest", "test", False, "You are a safety classification assistant.", "Classification:", 0),
    ("xstest", "test", True, "You are a safety classification assistant.", "Classification:", 0),
]


@pytest.mark.parametrize("name, split, reasoning, start, end, occurrence", CASES)
def test_rendered_prompt_equals_paper_text(data_dir, name, split, reasoning, start, end, occurrence):
    task = load_task(name, split, data_dir=data_dir, reasoning=reasoning)
    ex = task.examples[0]
    expected = _fill(_paper_prompt(start, end, occurrence), ex)
    assert task.user_message(ex) == expected
    if reasoning and name in ("commonsense_qa", "openbookqa"):
        assert "After </think>" in expected


def test_chat_rendering_switches_thinking_off_for_qwen3(data_dir, qwen3_tokenizer):
    from decal.tasks.prompts import render_chat

    task = load_task("xstest", "test", data_dir=data_dir)
    message = task.user_message(task.examples[0])
    plain = render_chat(qwen3_tokenizer, message, reasoning=False)
    thinking = render_chat(qwen3_tokenizer, message, reasoning=True)
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert thinking.endswith("<|im_start|>assistant\n")
    assert message in plain
