"""Known truth end to end: `true_probs` on task files, records, make_record, and the truth metrics
(true calibration error and its squared form, mean overconfidence, Bayes accuracy) with their
bootstrap intervals in `summarize`, `metrics_report` and `decal metrics`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from decal import metrics as m
from decal.cli import main
from decal.errors import DataError
from decal.records import PredictionRecord, RecordWriter, read_records, records_to_arrays
from decal.tasks import load_task

LABELS = ["Positive", "Negative"]


def _record(i: int, *, truth=(0.7, 0.3), pred: str = "Positive", label: str = "Positive", conf: float = 0.8, **kw):
    probs = [conf, 1 - conf] if pred == "Positive" else [1 - conf, conf]
    return PredictionRecord(
        id=str(i), task="verdicts", split="test", label=label, prediction=pred, correct=pred == label, valid=True,
        confidence=conf, option_probs=probs, labels=list(LABELS), true_probs=None if truth is None else list(truth), **kw,
    )


# --- metric functions: hand-computed values ------------------------------------------------------

TRUTH = np.array([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9], [0.95, 0.05]])
PRED = np.array([0, 1, 0, 0])  # p* = 0.7, 0.5, 0.1, 0.95


def test_hand_computed_values():
    conf = np.array([0.9, 0.5, 0.6, 0.95])  # gaps +0.2, 0, +0.5, 0
    assert m.true_calibration_error(conf, TRUTH, PRED) == pytest.approx(0.7 / 4)
    assert m.true_calibration_error_rms(conf, TRUTH, PRED) == pytest.approx(np.sqrt((0.04 + 0.25) / 4))
    assert m.mean_overconfidence(conf, TRUTH, PRED) == pytest.approx(0.7 / 4)
    under = np.array([0.6, 0.5, 0.1, 0.95])  # -0.1, 0, 0, 0
    assert m.mean_overconfidence(under, TRUTH, PRED) == pytest.approx(-0.025)
    assert m.true_calibration_error(under, TRUTH, PRED) == pytest.approx(0.025)
    assert m.bayes_accuracy(TRUTH) == pytest.approx((0.7 + 0.5 + 0.9 + 0.95) / 4)


def test_reporting_the_true_probability_gives_zero():
    p_star = TRUTH[np.arange(4), PRED]
    assert m.true_calibration_error(p_star, TRUTH, PRED) == 0.0
    assert m.true_calibration_error_rms(p_star, TRUTH, PRED) == 0.0
    assert m.mean_overconfidence(p_star, TRUTH, PRED) == 0.0


def test_always_certain_predictor_scores_the_mean_of_one_minus_p_star():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500)
    truth = np.stack([p, 1 - p], axis=1)
    pred = rng.integers(0, 2, 500)
    p_star = truth[np.arange(500), pred]
    ones = np.ones(500)
    assert m.true_calibration_error(ones, truth, pred) == pytest.approx(np.mean(1 - p_star))
    assert m.mean_overconfidence(ones, truth, pred) == pytest.approx(np.mean(1 - p_star))
    assert m.true_calibration_error_rms(ones, truth, pred) == pytest.approx(np.sqrt(np.mean((1 - p_star) ** 2)))


def test_order_invariance_and_bootstrap_interval():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.5, 1, 300)
    truth = np.stack([p, 1 - p], axis=1)
    pred = np.zeros(300, dtype=int)
    conf = np.clip(p + rng.normal(0.05, 0.1, 300), 0, 1)
    perm = rng.permutation(300)
    assert m.true_calibration_error(conf[perm], truth[perm], pred[perm]) == pytest.approx(m.true_calibration_error(conf, truth, pred))
    low, high = m.bootstrap_ci(m.mean_overconfidence, conf, truth, pred, n_resamples=200, seed=0)
    assert low < m.mean_overconfidence(conf, truth, pred) < high


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: m.true_calibration_error([0.5], [[0.7, 0.2]], [0]), "true_probs"),
        (lambda: m.true_calibration_error([0.5], [[0.7, 0.3]], [2]), "prediction"),
        (lambda: m.true_calibration_error([1.5], [[0.7, 0.3]], [0]), "confidence"),
        (lambda: m.mean_overconfidence([0.5, 0.4], [[0.7, 0.3]], [0, 0]), "same number"),
        (lambda: m.bayes_accuracy([0.7, 0.3]), "true_probs"),
    ],
)
def test_invalid_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- records ---------------------------------------------------------------------------------------

def test_records_carry_true_probs_only_when_known(tmp_path):
    with RecordWriter(tmp_path / "predictions.jsonl") as w:
        w.write_batch([_record(0), _record(1, truth=(0.2, 0.8), pred="Negative", label="Negative")])
    back = read_records(tmp_path)
    assert [r.true_probs for r in back] == [[0.7, 0.3], [0.2, 0.8]]
    assert records_to_arrays(back).true_probs.tolist() == [[0.7, 0.3], [0.2, 0.8]]
    # Records of tasks without a truth are written exactly as before: no true_probs key at all.
    assert "true_probs" not in json.loads(_record(2, truth=None).to_json())
    assert records_to_arrays([_record(2, truth=None)]).true_probs is None


def test_mixed_or_malformed_true_probs_are_errors(tmp_path):
    with pytest.raises(DataError, match="true_probs"):
        records_to_arrays([_record(0), _record(1, truth=None)])
    row = json.loads(_record(0).to_json())
    for bad in ([0.7], [0.7, 1.3], "0.7,0.3"):
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps({**row, "true_probs": bad}) + "\n")
        with pytest.raises(DataError, match="field 'true_probs'|true_probs"):
            read_records(path)


def test_records_copy_the_examples_truth():
    from decal.decision import DecisionTokens
    from decal.engines.base import OptionScores
    from decal.recording import RunFields, record_from_scores

    def record(ex):
        tokens = DecisionTokens(labels=ex.labels, token_ids=(1, 2), tokens=tuple(ex.labels))
        return record_from_scores(ex, OptionScores([0.3, 0.6], "x", 2, True), tokens, run=RunFields(task="t", split="test"))

    task = load_task("verdicts", "test", n=3)
    for ex in task:
        rec = record(ex)
        assert rec.true_probs == list(ex.true_probs) and rec.prediction == "Negative"
    assert record(load_task("builtin", "test", n=1).examples[0]).true_probs is None


def test_calibrated_copy_keeps_the_truth():
    assert _record(0).with_calibration([0.6, 0.4], 0.6, calibrator="platt").true_probs == [0.7, 0.3]


# --- summaries, metrics.json and the CLI ----------------------------------------------------------

def _truth_records(n: int, seed: int = 0) -> list[PredictionRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = float(rng.uniform(0.05, 0.95))
        label = "Positive" if rng.uniform() < p else "Negative"
        pred = "Positive" if rng.uniform() < 0.7 else "Negative"
        out.append(_record(i, truth=(p, 1 - p), pred=pred, label=label, conf=float(rng.uniform(0.5, 1.0))))
    return out


def test_summarize_and_report_add_the_truth_keys_only_with_truth():
    records = _truth_records(200)
    s = m.summarize(records)
    assert tuple(s) == m.SUMMARY_KEYS + m.TRUTH_KEYS
    conf = np.array([r.confidence for r in records])
    truth = np.array([r.true_probs for r in records])
    pred = np.array([LABELS.index(r.prediction) for r in records])
    assert s["tce"] == pytest.approx(m.true_calibration_error(conf, truth, pred))
    assert s["tce_rms"] == pytest.approx(m.true_calibration_error_rms(conf, truth, pred))
    assert s["mean_overconfidence"] == pytest.approx(m.mean_overconfidence(conf, truth, pred))
    assert s["bayes_accuracy"] == pytest.approx(m.bayes_accuracy(truth))
    report = m.metrics_report(records, n_resamples=100, seed=0)
    assert list(report["metrics"])[-4:] == list(m.TRUTH_KEYS)
    for key in m.TRUTH_KEYS:
        entry = report["metrics"][key]
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], key
    # The same resamples as every other metric: the interval equals bootstrap_ci with the same seed.
    assert (report["metrics"]["tce"]["ci_low"], report["metrics"]["tce"]["ci_high"]) == pytest.approx(
        m.bootstrap_ci(m.true_calibration_error, conf, truth, pred, n_resamples=100, seed=0))
    plain = [_record(i, truth=None, label=LABELS[i % 2]) for i in range(5)]
    assert tuple(m.summarize(plain)) == m.SUMMARY_KEYS


def test_decal_metrics_prints_and_writes_the_truth_metrics(tmp_path, capsys):
    with RecordWriter(tmp_path / "predictions.jsonl") as w:
        w.write_batch(_truth_records(60))
    assert main(["metrics", str(tmp_path), "--bootstrap", "30", "--no-figure"]) == 0
    out = capsys.readouterr().out
    rows = {line.strip("│┃ ").split()[0] for line in out.splitlines() if line.strip("│┃ ")}
    assert set(m.TRUTH_KEYS) <= rows
    written = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert written["tce"]["value"] == pytest.approx(m.summarize(read_records(tmp_path))["tce"])


def test_evaluate_on_the_verdicts_task_writes_the_truth(tiny_qwen3, qwen3_tokenizer, tmp_path):
    from decal.evaluation import evaluate

    task = load_task("verdicts:variant=ood", "test", n=4)
    evaluate(tiny_qwen3, qwen3_tokenizer, task, out_dir=tmp_path, model_name="tiny", progress=False)
    records = read_records(tmp_path)
    assert {r.id: r.true_probs for r in records} == {ex.id: list(ex.true_probs) for ex in task}
    assert "tce" in m.summarize(records)


# --- task files ------------------------------------------------------------------------------------

def test_task_file_true_probs_and_reasoning(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"id": "a", "input": "x", "labels": ["Yes", "No"], "label": "Yes", "true_probs": [0.8, 0.2], "reasoning": "x says yes."},
        {"id": "b", "input": "y", "labels": ["Yes", "No"], "label": "No", "true_probs": [0.4, 0.6], "reasoning": "y says no."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(path, "all")
    assert [ex.true_probs for ex in task] == [(0.8, 0.2), (0.4, 0.6)]
    assert [ex.reasoning for ex in task] == ["x says yes.", "y says no."]
    csv = tmp_path / "t.csv"
    csv.write_text('id,input,labels,label,true_probs,reasoning\na,x,Yes|No,Yes,"[0.8, 0.2]",because\n')
    assert load_task(csv, "all").examples[0].true_probs == (0.8, 0.2)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"true_probs": [0.8]}, "field 'true_probs'"),
        ({"true_probs": [0.8, 0.3]}, "must sum to 1"),
        ({"true_probs": [1.2, -0.2]}, "field 'true_probs'"),
        ({"reasoning": 3}, "field 'reasoning'"),
    ],
)
def test_bad_truth_fields_are_one_error_line(tmp_path, capsys, extra, needle):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a", "input": "x", "labels": ["Yes", "No"], "label": "Yes", **extra}) + "\n")
    assert main(["tasks", "show", str(path), "--split", "all"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and ":1:" in err[0]
