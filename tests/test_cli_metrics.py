"""`decal metrics`, `decal calibrate` and `decal threshold` on synthetic run folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from decal.cli import main
from decal.metrics import summarize
from decal.records import PredictionRecord, RecordWriter, read_records


def _write_run(folder, n: int, *, seed: int, task: str, split: str = "test"):
    """An overconfident binary guard run: confidence ~0.9-1, accuracy ~0.75."""
    rng = np.random.default_rng(seed)
    names = ["Safe", "Unsafe"]
    records = []
    for i in range(n):
        conf = float(np.clip(1 - rng.exponential(0.04), 0.5, 1.0))
        pred = int(rng.integers(2))
        correct = bool(rng.random() < 0.75)
        label = pred if correct else 1 - pred
        probs = [0.0, 0.0]
        probs[pred], probs[1 - pred] = conf, (1 - conf) * 0.5  # the rest is elsewhere in the vocabulary
        records.append(PredictionRecord(
            id=f"{task}-{i}", task=task, split=split, label=names[label], prediction=names[pred],
            correct=correct, valid=True, confidence=conf, option_probs=probs, labels=names, model="toy",
        ))
    with RecordWriter(folder / "predictions.jsonl") as w:
        w.write_batch(records)
    (folder / "run.json").write_text(json.dumps({"model": "toy", "task": task}))
    return folder


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "runs" / "grpo"
    (root / "moderation").mkdir(parents=True)
    (root / "xstest").mkdir(parents=True)
    return _write_run(root / "moderation", 300, seed=0, task="moderation"), _write_run(root / "xstest", 150, seed=1, task="xstest")


@pytest.mark.parametrize("command", ["metrics", "calibrate", "threshold"])
def test_help_parses(command, capsys):
    assert main([command, "--help"]) == 0
    assert "Examples:" in capsys.readouterr().out


def test_metrics_writes_json_and_figure(runs, capsys):
    run = runs[0]
    assert main(["metrics", str(run), "--bootstrap", "50", "--n-bins", "8"]) == 0
    out = capsys.readouterr().out
    assert "ece" in out and "95% CI" in out
    report = json.loads((run / "metrics.json").read_text())
    assert report["n"] == 300 and report["n_bins"] == 8 and report["bootstrap"] == 50 and report["binning"] == "equal_mass"
    expected = summarize(read_records(run), n_bins=8)
    assert report["metrics"]["ece"]["value"] == pytest.approx(expected["ece"])
    assert report["metrics"]["ece"]["ci_low"] < report["metrics"]["ece"]["value"] < report["metrics"]["ece"]["ci_high"]
    assert (run / "reliability.png").stat().st_size > 0 and (run / "reliability.svg").stat().st_size > 0


def test_metrics_without_bootstrap_has_null_intervals(runs):
    run = runs[1]
    assert main(["metrics", str(run), "--bootstrap", "0", "--binning", "equal_width", "--no-figure"]) == 0
    report = json.loads((run / "metrics.json").read_text())
    assert all(m["ci_low"] is None and m["ci_high"] is None for m in report["metrics"].values())
    assert not (run / "reliability.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["metrics", "{tmp}/missing"], "no such run folder"),
        (["metrics", "{run}", "--binning", "quantile", "--bootstrap", "0"], "`binning` must be one of"),
        (["metrics", "{run}", "--n-bins", "0", "--bootstrap", "0"], "`n_bins` must be a positive integer"),
        (["metrics", "{bad}", "--bootstrap", "0"], "predictions.jsonl:2: field 'confidence'"),
        (["calibrate", "--method", "histogram", "--fit", "{run}", "--apply", "{run}", "--out", "{tmp}/o"], "Unknown calibrator 'histogram'"),
        (["calibrate", "--method", "platt", "--fit", "{run}", "--fit-fraction", "1.5", "--out", "{tmp}/o"], "--fit-fraction"),
        (["threshold", "{run}", "--target-accuracy", "1.2"], "target 'accuracy>=1.2' must be a number in (0, 1)"),
        (["threshold", "{run}", "--target", "precision(Maybe)>=0.9"], "label 'Maybe' of target"),
        (["threshold", "{run}", "--target", "precison(Safe)>=0.9"], "Did you mean: precision?"),
        (["conformal", "{run}", "--alpha", "1.5", "--apply", "{run}", "--out", "{tmp}/o"], "`alpha` must be in (0, 1)"),
        (["conformal", "{run}", "--apply", "{bad}", "--out", "{tmp}/o"], "predictions.jsonl:2: field 'confidence'"),
    ],
)
def test_errors_are_one_line(runs, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (runs[0] / "predictions.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["confidence"] = 1.5
    (bad / "predictions.jsonl").write_text("\n".join([lines[0], json.dumps(row)]) + "\n")
    argv = [a.format(tmp=tmp_path, run=runs[0], bad=bad) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize("columns", ["40", "300"])
def test_tables_keep_whole_cells_whatever_the_terminal_width(runs, tmp_path, capsys, monkeypatch, columns):
    """Captured output is not a terminal: COLUMNS must not fold cells into fragments (issue #13)."""
    monkeypatch.setenv("COLUMNS", columns)
    moderation, xstest = runs
    assert main(["calibrate", "--method", "platt", "--fit", str(moderation), "--fit-fraction", "0.5",
                 "--apply", str(xstest), "--out", str(tmp_path / "cal")]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "ECE before" in out and "Brier after" in out
    assert main(["metrics", str(xstest), "--bootstrap", "10", "--no-figure"]) == 0
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines() if "│" in line]
    assert {"accuracy", "ece", "auroc", "brier"} <= {r[0] for r in rows}


def test_calibrate_fits_on_a_fraction_and_writes_the_rest(runs, tmp_path, capsys):
    moderation, xstest = runs
    out = tmp_path / "cal"
    argv = ["calibrate", "--method", "isotonic", "--fit", str(moderation), "--fit-fraction", "0.5", "--seed", "3",
            "--apply", str(xstest), "--out", str(out)]
    assert main(argv) == 0
    assert "held-out" in capsys.readouterr().out
    rest = read_records(out / "moderation")
    applied = read_records(out / "xstest")
    assert len(rest) == 150 and len(applied) == 150
    # the held-out half is disjoint from the fitted half, and the same seed gives the same split
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_fit"] == 150
    meta = json.loads((out / "xstest" / "run.json").read_text())
    assert meta["model"] == "toy"  # copied from the source
    assert meta["calibration"]["method"] == "isotonic" and meta["calibration"]["subset"] == "all"
    assert json.loads((out / "moderation" / "run.json").read_text())["calibration"]["subset"] == "held-out"
    assert json.loads((out / "calibrator.json").read_text())["method"] == "isotonic"
    # calibration lowers the ECE of both evaluated runs
    for r in summary["runs"]:
        assert r["after"]["ece"] < r["before"]["ece"]
    ids_first = {r.id for r in rest}
    assert main([*argv[:-1], str(tmp_path / "cal2")]) == 0
    assert {r.id for r in read_records(tmp_path / "cal2" / "moderation")} == ids_first


def test_calibrate_accepts_several_runs_after_one_apply(runs, tmp_path):
    moderation, xstest = runs
    other = tmp_path / "ours" / "xstest"
    other.mkdir(parents=True)
    _write_run(other, 40, seed=5, task="xstest")
    out = tmp_path / "cal"
    assert main(["calibrate", "--method", "platt", "--fit", str(moderation), "--apply", str(xstest), str(other),
                 "--out", str(out)]) == 0
    # two runs named xstest: their folders take the parent's name too
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["grpo--xstest", "ours--xstest"]
    assert main(["metrics", str(out / "ours--xstest"), "--bootstrap", "0", "--no-figure"]) == 0


def test_threshold_reports_coverage_on_other_runs(runs, tmp_path, capsys):
    moderation, xstest = runs
    out = tmp_path / "cal"
    assert main(["calibrate", "--method", "temperature", "--fit", str(moderation), "--apply", str(xstest), "--out", str(out)]) == 0
    capsys.readouterr()
    result = tmp_path / "threshold.json"
    assert main(["threshold", str(moderation), "--target-accuracy", "0.6", "--apply", str(xstest), str(out / "xstest"),
                 "--out", str(result)]) == 0
    assert "threshold" in capsys.readouterr().out
    report = json.loads(result.read_text())
    (guarantee,) = report["guarantees"]
    assert guarantee["target"] == "accuracy>=0.6" and guarantee["certified"] and guarantee["delta"] == 0.05
    assert guarantee["calibration"]["value"] >= 0.6 and report["n_calibration"] == 300
    assert report["mode"] == "shared" and len(set(report["thresholds"].values())) == 1
    assert [a["run"] for a in report["applied"]] == [str(xstest), str(out / "xstest")]
    for a in report["applied"]:
        assert 0 <= a["deferral_rate"] < 1 and a["n"] == 150


def _all_right_run(folder, n: int):
    folder.mkdir()
    records = [PredictionRecord(id=f"r{i}", task="t", split="test", label="Safe", prediction="Safe", correct=True,
                                valid=True, confidence=0.9, option_probs=[0.9, 0.1], labels=["Safe", "Unsafe"], model="toy")
               for i in range(n)]
    with RecordWriter(folder / "predictions.jsonl") as w:
        w.write_batch(records)
    return folder


def test_an_undefined_auroc_is_one_warning_line_and_n_a(tmp_path, capsys):
    """All predictions right: AUROC has no value. The CLI says so in one line without Python's
    source-line format, each message once per command, and the table reads n/a rather than nan."""
    folder = _all_right_run(tmp_path / "all-right", 20)
    assert main(["metrics", str(folder), "--bootstrap", "20"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["warning: AUROC is undefined: all 20 predictions are correct; returning nan."]
    # The row whose first cell is `auroc`; the title holds the run path, which may contain any word.
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in captured.out.splitlines() if "│" in line]
    auroc_row = next(cells for cells in rows if cells and cells[0] == "auroc")
    assert auroc_row[1] == "n/a"
    # calibrate scores each run before and after calibration: each message twice, shown once
    other = _all_right_run(tmp_path / "other", 20)
    assert main(["calibrate", "--method", "platt", "--fit", str(folder), "--fit-fraction", "0.5",
                 "--apply", str(other), "--out", str(tmp_path / "cal")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: AUROC is undefined: all 10 predictions are correct; returning nan.",
        "warning: AUROC is undefined: all 20 predictions are correct; returning nan.",
    ]
    # the next command warns again (once per command, not once per process)
    assert main(["metrics", str(folder), "--bootstrap", "0"]) == 0
    assert capsys.readouterr().err.count("warning: AUROC is undefined") == 1
