"""`decal serve --threshold FILE --conformal FILE --min-label-mass M`: the deferral rules (issue #23).

`decal.serve.policy` on records (which rule defers, which guarantee an answer carries, files that
do not fit the server), then the real server as a subprocess on a loopback port, whose answers
must be what the policy makes of the served raw values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from decal.calibrators import apply_calibrator, load_calibrator
from decal.cli import main
from decal.errors import ConfigError, DataError
from decal.records import PredictionRecord, read_records
from decal.selective import RiskControl, Target
from decal.serve.policy import load_policy

LABELS = ("Safe", "Unsafe")


def _record(i: int, probs, *, calibrated=None) -> PredictionRecord:
    pred = int(np.argmax(probs))
    r = PredictionRecord(id=str(i), task="t", split="s", label=LABELS[0], prediction=LABELS[pred], correct=pred == 0,
                         valid=True, confidence=float(probs[pred]), option_probs=[float(p) for p in probs], labels=list(LABELS))
    return r if calibrated is None else r.with_calibration(calibrated, calibrated[pred], calibrator="platt")


def _risk_file(path, thresholds, *, scale="calibrated_confidence", labels=LABELS, targets=None):
    if targets is None:
        targets, calibration = (Target("precision", "Safe", 0.99), Target("recall", "Unsafe", 0.95)), (
            {"value": 0.995, "n": 200}, {"value": 0.97, "n": 100})
    else:
        calibration = tuple({"value": t.level, "n": 100} for t in targets)
    rc = RiskControl(tuple(labels), thresholds, tuple(targets), 0.05, "auto", "per-class", 0.025, 500, 0.3,
                     (True,) * len(targets), calibration, 107)
    path.write_text(json.dumps({**rc.to_dict(), "scale": scale}))
    return path


def test_threshold_band_defers_inside_and_names_the_guarantee_outside(tmp_path):
    policy, info = load_policy(threshold=str(_risk_file(tmp_path / "t.json", {"Safe": 0.9, "Unsafe": 0.6})), conformal=None,
                               min_label_mass=None, labels=LABELS, calibrated=True)
    records = [
        _record(0, [0.3, 0.2], calibrated=[0.95, 0.05]),  # confident Safe: answered, precision(Safe) applies
        _record(1, [0.3, 0.2], calibrated=[0.7, 0.3]),  # Safe below 0.9: inside the band
        _record(2, [0.1, 0.4], calibrated=[0.3, 0.7]),  # Unsafe above 0.6: answered
    ]
    v = policy.decide(records)
    assert (v[0].defer, v[0].guarantees) == (False, ("precision(Safe)>=0.99",))
    assert v[1].defer and v[1].reasons == ("confidence 0.7 below the Safe threshold 0.9",) and v[1].guarantees == ()
    assert not v[2].defer and v[2].guarantees == ()  # recall(Unsafe) promises nothing about one answer
    assert info["threshold"]["band"]["Safe"] == {"deferred_below": 0.9, "always_deferred": False}
    assert info["threshold"]["guarantees"] == ["precision(Safe)>=0.99", "recall(Unsafe)>=0.95"]


def test_label_mass_and_option_sets_defer_too(tmp_path):
    from decal.conformal import ConformalSets, save_conformal

    sets = ConformalSets(0.2).fit(np.array([[0.9, 0.1]] * 8 + [[0.2, 0.8]] * 2), [0] * 8 + [1] * 2)
    save_conformal(tmp_path / "c.json", sets, labels=LABELS, scale="option_probs / label mass")
    policy, _ = load_policy(threshold=None, conformal=str(tmp_path / "c.json"), min_label_mass=0.5, labels=LABELS, calibrated=False)
    v = policy.decide([_record(0, [0.95, 0.04]), _record(1, [0.55, 0.4]), _record(2, [0.2, 0.1])])
    assert not v[0].defer and v[0].option_set == ["Safe"] and v[0].guarantees == ("option set coverage>=0.8",)
    assert v[1].defer and v[1].option_set == [] and "the option set is empty" in v[1].reasons
    assert v[2].defer and "label mass 0.3 below 0.5" in v[2].reasons


def test_files_that_do_not_fit_the_server_are_refused(tmp_path):
    file = str(_risk_file(tmp_path / "t.json", {"Safe": 0.9, "Unsafe": 0.6}))
    with pytest.raises(ConfigError, match="compare 'calibrated_confidence' but this server gives 'full-vocabulary confidence'"):
        load_policy(threshold=file, conformal=None, min_label_mass=None, labels=LABELS, calibrated=False)
    with pytest.raises(DataError, match="differ from the task's"):
        load_policy(threshold=file, conformal=None, min_label_mass=None, labels=("Yes", "No"), calibrated=True)
    with pytest.raises(ConfigError, match="--min-label-mass"):
        load_policy(threshold=None, conformal=None, min_label_mass=1.5, labels=LABELS, calibrated=True)
    with pytest.raises(FileNotFoundError, match="--conformal"):
        load_policy(threshold=None, conformal=str(tmp_path / "none.json"), min_label_mass=None, labels=LABELS, calibrated=True)
    # a value and a file of an earlier release still work
    assert load_policy(threshold="0.7", conformal=None, min_label_mass=None, labels=LABELS, calibrated=False)[0].threshold.value == 0.7


def test_reload_rereads_the_threshold_file_and_refuses_one_that_does_not_fit(qwen3_tokenizer, tmp_path):
    """POST /v1/admin/reload (what SIGHUP runs) checks a threshold file as start-up does: labels and scale."""
    from test_serve_app import _wait_ready
    from test_serve_log import _app, _platt_file

    answered = [Target("precision", "Unsafe", 0.9)]
    path = _risk_file(tmp_path / "t.json", {"Safe": 0.0, "Unsafe": 0.0}, targets=answered)
    other_labels = _risk_file(tmp_path / "yn.json", {"Yes": 0.0, "No": 0.0}, labels=("Yes", "No"),
                              targets=[Target("precision", "No", 0.9)])
    raw_scale = _risk_file(tmp_path / "raw.json", {"Safe": 0.0, "Unsafe": 0.0}, scale="full-vocabulary confidence",
                           targets=answered)
    client, _ = _app(qwen3_tokenizer, tmp_path / "s", calibrator=_platt_file(tmp_path), threshold="0.3")
    text = "hello there friend"  # the stub engine decides Unsafe
    with client:
        _wait_ready(client)
        for change, why in (({"threshold": str(other_labels)}, "differ from the task's"),
                            ({"threshold": str(raw_scale)}, "serve with the calibrator"),
                            ({"calibrator": None, "threshold": str(path)}, "serve with the calibrator")):
            r = client.post("/v1/admin/reload", json=change)
            assert r.status_code == 422 and why in r.json()["error"]["message"], r.json()
            assert "still serving epoch 1" in r.json()["error"]["message"]
        assert client.post("/v1/decide", json={"inputs": [text]}).json()["threshold"]["value"] == 0.3
        assert client.post("/v1/admin/reload", json={"threshold": str(path)}).json()["epoch"] == 2
        (first,) = client.post("/v1/decide", json={"inputs": [text]}).json()["results"]
        # The same file, now with Unsafe never answered: a reload without a body reads it again.
        _risk_file(path, {"Safe": 0.0, "Unsafe": None}, targets=answered)
        assert client.post("/v1/admin/reload").json()["epoch"] == 3
        body = client.post("/v1/decide", json={"inputs": [text]}).json()
        # ... and one for other labels at the same path is refused; epoch 3 keeps serving.
        other_labels.replace(path)
        refused = client.post("/v1/admin/reload")
        kept = client.post("/v1/decide", json={"inputs": [text]}).json()
    assert first["decision"] == "Unsafe" and not first["defer"] and first["guarantees"] == ["precision(Unsafe)>=0.9"]
    (second,) = body["results"]
    assert second["defer"] and second["guarantees"] == []
    assert second["deferred_because"] == ["Unsafe is never answered: no threshold met its targets"]
    assert body["epoch"] == 3 and body["threshold"]["band"]["Unsafe"]["always_deferred"]
    assert refused.status_code == 422 and "still serving epoch 3" in refused.json()["error"]["message"]
    assert kept["epoch"] == 3 and kept["results"][0]["deferred_because"] == second["deferred_because"]


@pytest.mark.slow
def test_served_answers_follow_threshold_conformal_and_label_mass(tmp_path, tiny_qwen3_dir):
    import httpx

    from decal.serve.process import ServeProcess
    from test_serve import _env, _evaluate, _safety_rows, _write_jsonl

    rows = _safety_rows(24, seed=7)
    task = _write_jsonl(tmp_path / "task.jsonl", rows)
    raw = _evaluate(str(tiny_qwen3_dir), str(task), tmp_path / "eval")
    run = tmp_path / "eval" / "run"
    assert main(["calibrate", "--method", "temperature", "--fit", str(run), "--apply", str(run), "--out", str(tmp_path / "cal")]) == 0
    calibrated = read_records(tmp_path / "cal" / "run")
    conf = np.array([r.calibrated_confidence for r in calibrated])
    thresholds = {lab: float(np.median(conf)) for lab in LABELS}  # some answered, some deferred
    threshold = _risk_file(tmp_path / "threshold.json", thresholds)
    assert main(["conformal", str(tmp_path / "cal" / "run"), "--alpha", "0.3", "--out", str(tmp_path / "sets")]) == 0
    min_mass = float(np.median([r.label_mass for r in raw.values()]))
    args = ["--dtype", "float32", "--model", str(tiny_qwen3_dir), "--task", str(task), "--threads", "1",
            "--calibrator", str(tmp_path / "cal" / "calibrator.json"), "--threshold", str(threshold),
            "--conformal", str(tmp_path / "sets" / "conformal.json"), "--min-label-mass", str(min_mass)]
    with ServeProcess(args, env=_env()) as server:
        body = httpx.post(f"{server.url}/v1/decide", json={"inputs": [{"input": r["input"], "id": r["id"]} for r in rows]},
                          timeout=600).json()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert server.returncode == 0
    assert "results" in body, body
    assert body["threshold"]["thresholds"] == thresholds and body["conformal"]["alpha"] == 0.3 and body["min_label_mass"] == min_mass
    # What the policy makes of the served raw values, offline, with the same files.
    served = [PredictionRecord(**{**raw[a["id"]].__dict__, "option_probs": list(a["option_probs"].values()),
                                  "confidence": a["confidence"]}) for a in body["results"]]
    policy, _ = load_policy(threshold=str(threshold), conformal=str(tmp_path / "sets" / "conformal.json"),
                            min_label_mass=min_mass, labels=LABELS, calibrated=True)
    verdicts = policy.decide(apply_calibrator(load_calibrator(tmp_path / "cal" / "calibrator.json"), served))
    for a, v in zip(body["results"], verdicts):
        assert a["label_mass"] == pytest.approx(sum(a["option_probs"].values()), rel=1e-12)
        assert (a["defer"], a["deferred_because"], a["guarantees"], a["option_set"]) == (v.defer, list(v.reasons), list(v.guarantees), v.option_set)
    kinds = {reason.split(" ")[0] for a in body["results"] for reason in a["deferred_because"]}
    assert {"confidence", "label"} <= kinds  # both the band and the label mass deferred some
    assert any(not a["defer"] for a in body["results"]) or pytest.fail("every answer deferred: the test checks one branch only")
    assert "decal_label_mass_mean" in metrics and "decal_low_label_mass_ratio" in metrics
