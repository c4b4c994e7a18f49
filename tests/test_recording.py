"""One path from engine outputs to prediction records (issue #20 items 2-6).

- the record rules of `decal.recording` on hand-made scores and rollouts (valid, prediction,
  confidence, correct, label mass, argmax_is_option), with and without a gold label;
- one decision-token function whose cache key is exactly what it reads, per-example decision
  tokens in GRPO, and the position check that refuses a label merging with its prompt;
- evaluation, rollouts, swap and serve all build their records through the module, and
  `decal evaluate` and a real `decal serve` process give the same record fields for the same
  inputs on the machine's default dtype (`--dtype auto`);
- resuming refuses, in one line, every changed setting that can change a record;
- fallbacks are counted, recorded and warned about.

Most tests use the real Qwen3 tokenizer with a tiny Qwen3 whose output head puts its mass on the
two labels (`peaked_dir`): with the random tiny model every option probability is about 7e-6 and
its top token is never an option, so a test of `valid` or `argmax_is_option` could not fail there.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import peaked_qwen3_model

from decal.cli import main
from decal.decision import CONTEXT_TAIL, Decision, DecisionTokens, check_decision_positions, option_token_ids
from decal.engines.base import Engine, GeneratedDecision, OptionScores, check_lengths
from decal.errors import ConfigError, DataError, DecisionPositionError, PromptTooLongError
from decal.records import PredictionRecord, RecordWriter, read_records, records_to_arrays
from decal.recording import RunFields, record_from_generation, record_from_scores
from decal.tasks.schema import DecisionExample, PromptTemplate, Task

LABELS = ("Safe", "Unsafe")
TOKENS = DecisionTokens(labels=LABELS, token_ids=(10, 20), tokens=("Safe", "Un"))
RUN = RunFields(task="t", split="s", model="m", seed=0, prompt_version="1")
WORDS = ["kill", "process", "bake", "a", "cake", "hurt", "someone", "python", "the", "how", "do", "I", "knife", "garden"]


def _example(label: str | None = "Safe", **kw) -> DecisionExample:
    return DecisionExample(id="e1", labels=LABELS, label=label, input="x", **kw)


def _scores(probs, top: int) -> OptionScores:
    return OptionScores(option_probs=list(probs), top_token=f"t{top}", top_token_id=top, top_is_option=top in (10, 20))


def _generation(option: int, probs, *, top: int, index: int = 3) -> GeneratedDecision:
    forced = index < 0
    return GeneratedDecision(completion_ids=[1, 2, 3, 4], completion="abc", decision=Decision(index, option),
                             option_probs=list(probs), emitted_token=None if forced else f"e{option}",
                             valid=not forced and option >= 0, forced=forced, top_token=f"t{top}", top_token_id=top)


# --- the rules, by hand ------------------------------------------------------------------------


def test_a_read_whose_top_token_is_an_option_is_valid_and_decides_it():
    rec = record_from_scores(_example("Unsafe"), _scores([0.25, 0.5], top=20), TOKENS, run=RUN)
    assert (rec.prediction, rec.valid, rec.correct, rec.argmax_is_option) == ("Unsafe", True, True, True)
    assert rec.confidence == 0.5 and rec.label_mass == 0.75 and rec.emitted_token == "t20"
    assert (rec.task, rec.split, rec.model, rec.seed, rec.prompt_version) == ("t", "s", "m", 0, "1")


def test_a_read_whose_top_token_is_not_an_option_is_invalid_forced_and_wrong():
    # the constrained argmax is the gold label, but the model's own token there is "t99"
    rec = record_from_scores(_example("Unsafe"), _scores([0.01, 0.03], top=99), TOKENS, run=RUN)
    assert (rec.prediction, rec.valid, rec.correct, rec.argmax_is_option) == ("Unsafe", False, False, False)
    assert rec.confidence == 0.03 and rec.label_mass == pytest.approx(0.04)


def test_a_rollout_decides_its_emitted_option_even_below_the_argmax():
    # sampled: the model emitted option 0 though option 1 is likelier there, and its top token is option 1
    rec = record_from_generation(_example("Safe"), _generation(0, [0.3, 0.6], top=20), TOKENS, run=RUN)
    assert (rec.prediction, rec.valid, rec.correct, rec.confidence) == ("Safe", True, True, 0.3)
    assert rec.argmax_is_option and rec.completion == "abc" and rec.emitted_token == "e0"
    assert rec.extra == {"decision_index": 3, "forced": False, "n_completion_tokens": 4}
    # an emitted non-option token: invalid, the forced decision's confidence, never correct
    rec = record_from_generation(_example("Unsafe"), _generation(-1, [0.3, 0.6], top=99), TOKENS, run=RUN)
    assert (rec.prediction, rec.valid, rec.correct, rec.confidence, rec.argmax_is_option) == ("Unsafe", False, False, 0.6, False)
    rec = record_from_generation(_example("Unsafe"), _generation(-1, [0.3, 0.6], top=20, index=-1), TOKENS, run=RUN)
    assert not rec.valid and rec.extra["forced"] and rec.emitted_token is None


def test_probabilities_are_clipped_at_one_and_truth_is_copied():
    ex = _example(true_probs=(0.4, 0.6))
    rec = record_from_scores(ex, _scores([1.0000001, 0.0], top=10), TOKENS, run=RUN)
    assert rec.confidence == 1.0 and rec.option_probs == [1.0, 0.0] and rec.label_mass == 1.0
    assert rec.true_probs == [0.4, 0.6]
    with pytest.raises(ValueError, match="must have 2 values"):
        record_from_scores(ex, _scores([0.5], top=10), TOKENS, run=RUN)


def test_a_decision_without_gold_has_no_label_or_correct_and_metrics_refuse_it(tmp_path):
    rec = record_from_scores(_example(label=None), _scores([0.25, 0.5], top=20), TOKENS, run=RUN)
    assert rec.label is None and rec.correct is None and rec.valid
    row = json.loads(rec.to_json())
    assert row["label"] is None and row["correct"] is None
    assert PredictionRecord.from_dict(row, require_gold=False) == rec
    with RecordWriter(tmp_path / "predictions.jsonl") as w:
        w.write_batch([rec])
    with pytest.raises(DataError, match=r"predictions.jsonl:1: field 'label': missing required field"):
        read_records(tmp_path)
    with pytest.raises(DataError, match="record 'e1' has no gold label"):
        records_to_arrays([rec])
    assert records_to_arrays([rec], require_gold=False).label_index.tolist() == [-1]
    with pytest.raises(DataError, match="both be set or both be null"):
        PredictionRecord.from_dict({**row, "correct": True}, require_gold=False)


def test_records_of_older_runs_read_top_is_option_and_get_their_label_mass():
    old = {"id": "a", "task": "t", "split": "s", "label": "Safe", "prediction": "Safe", "correct": True, "valid": True,
           "confidence": 0.5, "option_probs": [0.5, 0.25], "labels": list(LABELS), "top_is_option": False}
    rec = PredictionRecord.from_dict(old)
    assert rec.argmax_is_option is False and rec.label_mass == 0.75
    assert "top_is_option" not in json.loads(rec.to_json())


# --- decision tokens: one function, one cache, the position check -------------------------------


def test_the_cache_key_is_exactly_the_tail_the_tokens_are_computed_from(qwen3_tokenizer, monkeypatch):
    import decal.decision as decision

    calls = []
    real = decision._option_token_ids
    monkeypatch.setattr(decision, "_option_token_ids", lambda tok, labels, tail: calls.append(tail) or real(tok, labels, tail))
    tok = copy.deepcopy(qwen3_tokenizer)  # a tokenizer of its own: an empty cache
    tail = "y" * (CONTEXT_TAIL - 8) + "Answer:\n"  # exactly the characters read
    a = option_token_ids(tok, LABELS, context="x" * 500 + tail)
    b = option_token_ids(tok, LABELS, context="z" * 50 + tail)  # differs only before the tail read
    assert a == b and len(calls) == 1 and calls[0] == tail
    # a context that differs 100 characters from its end is another entry (the old key, the last
    # 32 characters, took it for the first)
    cut = CONTEXT_TAIL - 100
    other = tail[:cut] + "q" + tail[cut + 1 :]
    option_token_ids(tok, LABELS, context=other)
    assert len(calls) == 2
    assert option_token_ids(tok, LABELS, context=other) == a and len(calls) == 2  # cached
    assert a == real(tok, LABELS, tail)


@pytest.mark.parametrize("end, fine", [("Answer:", True), ("Answer\n", True), ("Answer ", False), ("Answer.", False)])
def test_the_position_check_refuses_a_label_that_merges_with_its_prompt(qwen3_tokenizer, end, fine):
    # Qwen3: "Answer " + "Safe" is "Answer" + "ĠSafe", so after the prompt's last token "Ġ" the
    # decision token "ĠSafe" would be read one position too late; "." merges the same way
    context = f"<|im_start|>user\nIs it safe?<|im_end|>\n{end}"
    tokens = option_token_ids(qwen3_tokenizer, LABELS, context=context)
    ids = qwen3_tokenizer(context, add_special_tokens=False)["input_ids"]
    if fine:
        check_decision_positions(qwen3_tokenizer, [ids], [context], [tokens], names=["ex-7"])
        return
    with pytest.raises(DecisionPositionError, match=r"^example 'ex-7': the prompt's \d+ token ids are not a prefix") as e:
        check_decision_positions(qwen3_tokenizer, [ids], [context], [tokens], names=["ex-7"])
    assert "\n" not in str(e.value) and e.value.name == "ex-7"


def test_labels_whose_decision_token_is_not_first_are_refused(qwen3_tokenizer):
    # "Unsure" is Un+sure and "Unsafe" one token, so they differ at once; "Yes please"/"Yes no" share "Yes"
    tokens = option_token_ids(qwen3_tokenizer, ("Yes please", "Yes no"), context="Answer:\n")
    ids = qwen3_tokenizer("Answer:\n", add_special_tokens=False)["input_ids"]
    with pytest.raises(DecisionPositionError, match=r"first token after the prompt for label 'Yes please' is 'Yes'"):
        check_decision_positions(qwen3_tokenizer, [ids], ["Answer:\n"], [tokens], names=["q"])


def _no_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_grpo_parses_and_trains_each_example_on_its_own_decision_tokens(qwen3_tokenizer):
    from decal.training.grpo import grpo_dataset
    from decal.training.rewards import DecisionReward

    # a chat template that ends with the user's text: the examples' contexts differ where the label goes
    tok = _no_template(qwen3_tokenizer, "{{ messages[0]['content'] }}")
    template = PromptTemplate(name="bare", version="1", non_reasoning="{input}", reasoning="{input}")
    examples = tuple(DecisionExample(id=f"e{i}", labels=LABELS, label="Safe", input=text)
                     for i, text in enumerate(["Label:", "Label."]))
    data = grpo_dataset(Task(name="t", split="train", examples=examples, template=template), tok, reasoning=False)
    own = [list(option_token_ids(tok, LABELS, context=text).token_ids) for text in ("Label:", "Label.")]
    assert data["option_token_ids"] == own and own[0] != own[1]  # "Safe" after ":", ".Safe" after "."
    first = option_token_ids(tok, LABELS, context="Label:")
    reward = DecisionReward(tok, first, reasoning=False, stop_ids=[])
    # each completion emits its own row's "Safe" token: both are right only with per-row tokens
    got = reward(completion_ids=[[own[0][0]], [own[1][0]]], label=["Safe", "Safe"], option_token_ids=own)
    assert got == [1.0, 1.0] and reward.last_option_ids == own
    assert reward(completion_ids=[[own[0][0]], [own[1][0]]], label=["Safe", "Safe"]) == [1.0, 0.0]


# --- one prompt-length check -------------------------------------------------------------------


def test_one_length_check_names_the_longest_prompt_for_engines_and_training():
    import decal.scoring
    import decal.training.memory

    assert not hasattr(decal.scoring, "check_prompt_lengths") and not hasattr(decal.training.memory, "check_prompt_lengths")
    with pytest.raises(PromptTooLongError, match=r"^example 'b' has a prompt of 12 tokens, too long to fit with 1 new "
                                                 r"token in the model's context of 10 tokens \(2 of 3 prompts are\)\."):
        check_lengths(10, [9, 12, 10], names=["a", "b", "c"])
    with pytest.raises(PromptTooLongError, match=r"over `max_prompt_length` \(9 tokens\) \(2 of 3 prompts are\)\. Cut"):
        check_lengths(None, [9, 12, 10], names=["a", "b", "c"], max_prompt_length=9, fix="Cut.")
    check_lengths(11, [9, 10, 10], names=["a", "b", "c"])  # prompt + 1 fits exactly
    check_lengths(None, [10**6])  # no stated limit


# --- every path builds its records in decal.recording -------------------------------------------


@pytest.fixture(scope="module")
def safety_task_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    rows = [{"id": f"e{i}", "input": " ".join(rng.choice(WORDS, size=1 + (i * 7) % 29)), "labels": list(LABELS),
             "label": LABELS[int(rng.integers(2))]} for i in range(16)]
    path = tmp_path_factory.mktemp("recording-task") / "safety.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory, qwen3_tokenizer, safety_task_file) -> Path:
    from decal.tasks import load_task
    from decal.tasks.prompts import render_chat

    task = load_task(str(safety_task_file), "all")
    prompts = [render_chat(qwen3_tokenizer, task.user_message(ex), reasoning=False) for ex in task.examples]
    return peaked_qwen3_model(qwen3_tokenizer, prompts, tmp_path_factory.mktemp("peaked-qwen3"))


@pytest.fixture(scope="module")
def peaked_records(tmp_path_factory, peaked_dir, safety_task_file) -> tuple[dict, dict]:
    """`decal evaluate --dtype auto` on the safety file: ({id: record}, run.json)."""
    out = tmp_path_factory.mktemp("recording-eval")
    assert main(["evaluate", "--model", str(peaked_dir), "--task", str(safety_task_file), "--split", "all",
                 "--out", str(out), "--name", "run", "--no-progress", "--batch-size", "4", "--dtype", "auto"]) == 0
    return {r.id: r for r in read_records(out / "run")}, json.loads((out / "run" / "run.json").read_text())


def test_the_peaked_fixture_gives_both_labels_and_invalid_reads(peaked_records):
    records, _ = peaked_records
    valid = [r for r in records.values() if r.valid]
    assert {r.prediction for r in valid} == set(LABELS) and 0 < len(valid) < len(records)
    assert all(r.label_mass > 0.5 for r in valid)
    assert all(r.valid == r.argmax_is_option for r in records.values())
    assert all(r.correct == (r.valid and r.prediction == r.label) for r in records.values())


@pytest.mark.slow
def test_decal_serve_answers_with_the_records_of_decal_evaluate_on_the_default_dtype(peaked_dir, safety_task_file,
                                                                                    peaked_records):
    """The same inputs give the same record fields from `decal evaluate` and from a real `decal serve`
    process's `/v1/decide`, gold aside, both on `--dtype auto`.

    Tolerance: in float32 both run the same computation up to batch composition, padding and the
    server's shared-prefix cache, which change the order of sums: the label logits are about 16,
    so each rounding moves them by about 16 * 2^-24 = 1e-6, and a few dozen roundings through two
    layers stay under 1e-5 relative on the probabilities (measured: 1.3e-6). CPU bfloat16 is not
    bit-reproducible across processes (CHANGELOG: ~3e-3 on option probabilities); bfloat16 keeps 8
    significant bits, so a relative 2^-5 covers a few roundings through the two layers. The
    fixture's label logits differ by several units, so the discrete fields agree either way.
    """
    import httpx

    from decal.serve.process import ServeProcess

    records, run = peaked_records
    rtol, atol = (1e-5, 1e-7) if run["dtype"] == "float32" else (2 ** -5, 1e-4)
    rows = [json.loads(line) for line in safety_task_file.read_text().splitlines()]
    server = ServeProcess(["--dtype", "auto", "--model", str(peaked_dir), "--task", str(safety_task_file),
                           "--threads", "1", "--max-wait-ms", "50"]).start()
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            body = client.post("/v1/decide", json={"inputs": [{"id": r["id"], "input": r["input"]} for r in rows]}).json()
            assert client.get("/v1/info").json()["dtype"] == run["dtype"]
    finally:
        assert server.stop() == 0
    answers = body["results"]
    assert [a["id"] for a in answers] == [r["id"] for r in rows]
    for a in answers:
        want = records[a["id"]]
        assert (a["decision"], a["valid"], a["emitted_token"], a["argmax_is_option"]) == (
            want.prediction, want.valid, want.emitted_token, want.argmax_is_option)
        assert "label" not in a and "correct" not in a
        np.testing.assert_allclose(list(a["option_probs"].values()), want.option_probs, rtol=rtol, atol=atol)
        np.testing.assert_allclose([a["confidence"], a["label_mass"]], [want.confidence, want.label_mass], rtol=rtol, atol=atol)


def test_evaluation_rollouts_swap_and_serve_build_records_in_the_one_module(tmp_path, peaked_dir, safety_task_file,
                                                                           monkeypatch):
    """Every path's records come from `decal.recording._record`: counted per path, and each row's
    record fields equal what the rules give for its option probabilities."""
    import decal.recording as recording
    from decal.analysis.rollouts import RolloutConfig, run_rollouts
    from decal.analysis.swap import SwapConfig, run_swap
    from decal.engines import build_engine
    from decal.evaluation import evaluate
    from decal.serve.decider import Decider
    from decal.tasks import load_task

    built = []
    real = recording._record
    monkeypatch.setattr(recording, "_record", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    engine = build_engine("hf", str(peaked_dir), dtype="auto")
    small = load_task(str(safety_task_file), "all")
    small = replace(small, examples=small.examples[:4])
    reasoning = load_task(str(safety_task_file), "all", reasoning=True)
    reasoning = replace(reasoning, examples=reasoning.examples[:4])

    def count(fn) -> list:
        start = len(built)
        fn()
        return built[start:]

    evaluated = count(lambda: evaluate(engine, None, small, out_dir=tmp_path / "eval", model_name="p", progress=False))
    assert len(evaluated) == 4 and {r.id for r in evaluated} == {r.id for r in read_records(tmp_path / "eval")}
    rollouts = count(lambda: run_rollouts(engine, None, reasoning, tmp_path / "roll", config=RolloutConfig(
        samples=2, max_new_tokens=4, batch_size=4), model_name="p"))
    assert len(rollouts) == 8
    swaps = count(lambda: run_swap(engine, None, reasoning, tmp_path / "swap", config=SwapConfig(
        max_new_tokens=4, min_confidence=0.0, include_invalid=True), model_name="p"))
    n_swapped = sum(1 for line in (tmp_path / "swap" / "swaps.jsonl").read_text().splitlines() if json.loads(line)["swapped"])
    assert len(swaps) == 4 + n_swapped  # the greedy pass, then each swap read
    decider = Decider(small, engine, model_name="p")
    served = count(lambda: decider.decide(decider.prepare([replace(ex, label=None) for ex in small.examples])))
    assert len(served) == 4 and all(r.label is None and r.correct is None for r in served)
    # the served records equal the evaluated ones, gold aside
    by_id = {r.id: r for r in evaluated}
    for r in served:
        want = by_id[r.id]
        assert (r.prediction, r.valid, r.argmax_is_option, r.emitted_token) == (want.prediction, want.valid,
                                                                               want.argmax_is_option, want.emitted_token)
        np.testing.assert_allclose(r.option_probs, want.option_probs, rtol=0, atol=1e-6)
    # analysis rows hold every record field
    # (the optional fields left out of the JSON when None: no truth, no calibration, no option set here)
    fields = set(PredictionRecord.__dataclass_fields__) - {"extra", "true_probs", "calibrated_probs", "calibrated_confidence",
                                                           "option_set"}
    for name in ("roll/rollouts.jsonl", "swap/greedy.jsonl"):
        for line in (tmp_path / name).read_text().splitlines():
            assert fields <= set(json.loads(line))
    summary = json.loads((tmp_path / "swap" / "summary.json").read_text())
    assert summary["n_scored_one_piece"] >= 0 and "fallbacks" in summary
    assert json.loads((tmp_path / "swap" / "run.json").read_text())["fallback_counts"] == {
        "swaps_scored_one_piece": summary["n_scored_one_piece"]}


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in this process; it must fail with exit 1 and exactly one `error:` line."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_prompt_whose_ids_are_not_a_prefix_of_prompt_plus_label_is_refused_in_one_line(tmp_path, peaked_dir,
                                                                                       safety_task_file, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(peaked_dir, model)
    # a chat template that ends in a space: "...Answer: " + "Safe" tokenizes as "Answer:" + "ĠSafe"
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}\nAnswer: ")
    error = _one_error_line(capsys, ["evaluate", "--model", str(model), "--task", str(safety_task_file), "--split", "all",
                                     "--out", str(tmp_path / "runs"), "--name", "run", "--no-progress", "--dtype", "float32"])
    assert error.startswith("error: example 'e0': the prompt's ") and "not a prefix" in error
    assert not (tmp_path / "runs" / "run").exists()  # nothing scored, nothing left


# --- resume: every setting that can change a record ---------------------------------------------


@pytest.fixture(scope="module")
def resumable_runs(tmp_path_factory, tiny_qwen3_32_dir, safety_task_file):
    """A non-reasoning and a reasoning run of 4 examples, to rerun with one setting changed."""
    out = tmp_path_factory.mktemp("resume")
    base = ["evaluate", "--model", str(tiny_qwen3_32_dir), "--task", str(safety_task_file), "--split", "all", "--out", str(out),
            "--no-progress", "--limit", "4", "--batch-size", "2", "--dtype", "float32", "--seed", "0"]
    runs = {"direct": [*base, "--name", "direct"],
            "reasoning": [*base, "--name", "reasoning", "--reasoning", "--max-new-tokens", "4", "--temperature", "0"]}
    for args in runs.values():
        assert main(args) == 0
    return runs


def _with(args: list[str], flag: str, value: str | None) -> list[str]:
    if flag in args:
        i = args.index(flag)
        return args[:i] + ([flag, value] if value is not None else []) + args[i + 2 :]
    return [*args, flag, value]


@pytest.mark.parametrize("run, flag, value, key", [
    ("direct", "--dtype", "bfloat16", "dtype"),
    ("direct", "--batch-size", "3", "batch_size"),
    ("direct", "--seed", "1", "seed"),
    ("direct", "--limit", "3", "limit"),
    ("direct", "--engine", "vllm", "engine"),
    ("reasoning", "--temperature", "0.7", "temperature"),
    ("reasoning", "--max-new-tokens", "5", "max_new_tokens"),
])
def test_a_rerun_with_another_record_setting_is_refused_in_one_line(resumable_runs, run, flag, value, key, capsys):
    # refused before any weights load (`evaluation.check_run_folder`); the folder keeps its run
    error = _one_error_line(capsys, _with(resumable_runs[run], flag, value))
    assert f"holds a run with other settings ({key}: " in error


def test_the_same_rerun_resumes(resumable_runs):
    for args in resumable_runs.values():
        assert main(args) == 0


class _StubEngine(Engine):
    """Option probabilities from the prompt length; its options and fallbacks are set per test."""

    name = "stub"

    def __init__(self, tokenizer, options: dict, fallbacks: tuple = ()):
        self.tokenizer, self.options, self.fallbacks, self.dtype = tokenizer, options, fallbacks, "float32"

    def context_length(self):
        return 2048

    def score(self, sequences, decision_tokens, *, batch_size=8):
        top = decision_tokens[0].token_ids[0] if isinstance(decision_tokens, list) else decision_tokens.token_ids[0]
        return [OptionScores(option_probs=[0.5, 1 / len(s)], top_token="x", top_token_id=top, top_is_option=True)
                for s in sequences]

    def info(self):
        return {"engine": "stub", "engine_version": "1", "engine_options": dict(self.options)}


@pytest.mark.parametrize("change, key", [
    ({"options": {"max_model_len": 512}}, "engine_options"),
    ({"fallbacks": ("stop ids from the tokenizer only",)}, "fallbacks"),
    ({"marker": "</reasoning>", "reasoning": True}, "marker"),
])
def test_engine_options_fallbacks_and_marker_are_compared_too(tmp_path, qwen3_tokenizer, safety_task_file, change, key,
                                                             monkeypatch):
    from decal.evaluation import evaluate
    from decal.tasks import load_task

    reasoning = change.get("reasoning", False)
    task = load_task(str(safety_task_file), "all", reasoning=reasoning)
    if reasoning:  # the stub cannot generate: the refusal comes before any scoring
        monkeypatch.setattr(_StubEngine, "generate", lambda *a, **k: pytest.fail("scored before the refusal"), raising=False)
    first = _StubEngine(qwen3_tokenizer, {"max_model_len": 1024})
    if not reasoning:
        evaluate(first, None, task, out_dir=tmp_path, model_name="stub", progress=False, limit=2)
        assert json.loads((tmp_path / "run.json").read_text())["fallbacks"] == []
    else:
        from decal.evaluation import run_metadata

        meta = run_metadata(task, model_name="stub", adapter=None, task_name=None, seed=0, temperature=0.0,
                            max_new_tokens=256, batch_size=8, limit=2, model=first)
        (tmp_path / "run.json").write_text(json.dumps(meta))
    second = _StubEngine(qwen3_tokenizer, change.get("options", first.options), change.get("fallbacks", ()))
    with pytest.raises(ConfigError, match=rf"holds a run with other settings \({key}: "):
        evaluate(second, None, task, out_dir=tmp_path, model_name="stub", progress=False, limit=2,
                 **({"marker": change["marker"]} if "marker" in change else {}))


def test_the_analyses_refuse_with_the_same_rule(tmp_path, safety_task_file):
    from decal.analysis.rollouts import RolloutConfig, prepare_run_folder
    from decal.tasks import load_task

    task = load_task(str(safety_task_file), "all", reasoning=True)
    prepare_run_folder(tmp_path, task, RolloutConfig(), model_name="m", dtype="float32", engine="hf")
    for config, dtype, key in ((RolloutConfig(batch_size=4), "float32", "batch_size"),
                               (RolloutConfig(marker="</r>"), "float32", "marker"),
                               (RolloutConfig(), "bfloat16", "dtype")):
        with pytest.raises(ConfigError, match=rf"holds a run with other settings \({key}: "):
            prepare_run_folder(tmp_path, task, config, model_name="m", dtype=dtype, engine="hf")
    prepare_run_folder(tmp_path, task, RolloutConfig(threshold=0.5, limit=3), model_name="m", dtype="float32", engine="hf")


# --- fallbacks: counted, recorded, warned ---------------------------------------------------------


def test_engine_fallbacks_are_noted_and_warned(tmp_path):
    from decal.engines import _model_config
    from decal.engines.base import EngineOptions
    from decal.engines.vllm import _generation_config_holder, engine_kwargs

    notes: list[str] = []
    with pytest.warns(UserWarning, match="could not read the LoRA rank of adapter org/hub-adapter"):
        kwargs = engine_kwargs(EngineOptions(), on_cpu=False, adapters=["org/hub-adapter"], fallbacks=notes)
    assert kwargs["max_lora_rank"] == 16 and len(notes) == 1
    with pytest.warns(UserWarning, match="could not read the generation config"):
        holder = _generation_config_holder(str(tmp_path), notes)
    assert holder.generation_config is None and "stop at the tokenizer's EOS" in notes[1]
    with pytest.warns(UserWarning, match="prompt lengths are not checked"):
        assert _model_config(str(tmp_path), trust_remote_code=False, offline=True, fallbacks=notes) is None
    assert len(notes) == 3


def test_an_engines_fallbacks_reach_run_json(tmp_path, qwen3_tokenizer, safety_task_file):
    from decal.evaluation import evaluate
    from decal.tasks import load_task

    engine = _StubEngine(qwen3_tokenizer, {}, ("could not read the generation config of m",))
    evaluate(engine, None, load_task(str(safety_task_file), "all"), out_dir=tmp_path, model_name="stub",
             progress=False, limit=2)
    assert json.loads((tmp_path / "run.json").read_text())["fallbacks"] == ["could not read the generation config of m"]
