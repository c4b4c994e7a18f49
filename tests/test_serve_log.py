"""The decision log, feedback, monitor and reload of `decal serve`, in process on the stub engine (no model).

The real server process (SIGKILL, restart, SIGHUP, a real model) is tested in test_serve_prod.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from test_serve_app import StubEngine, _task, _wait_ready

from decal.serve.app import ServerState, create_app
from decal.serve.decider import Decider
from decal.serve.decision_log import DecisionLog, epoch_settings
from decal.serve.settings import ServeConfig, load_served_calibrator, load_threshold
from decal.serve.store import open_store


def _platt_file(tmp_path, a: float = 2.0, b: float = -1.0):
    from decal.calibrators import PlattScaling

    cal = PlattScaling()
    cal.a_, cal.b_ = a, b
    path = tmp_path / f"platt-{a}-{b}.json"
    cal.save(path)
    return str(path)


def _threshold_file(tmp_path, value: float, target: float = 0.8):
    path = tmp_path / f"threshold-{value}.json"
    path.write_text(json.dumps({"calibration_run": "none", "choice": {"threshold": value, "target_accuracy": target, "delta": 0.05}}))
    return str(path)


def _app(tokenizer, state_dir, *, calibrator=None, threshold=None, log_bodies=False):
    """A `ServerState` wired as `decal.serve.server.build_state` wires it, on the stub engine."""
    from starlette.testclient import TestClient

    config = ServeConfig(model="stub", task="t", state_dir=None if state_dir is None else str(state_dir),
                         calibrator=calibrator, threshold=threshold, log_bodies=log_bodies)
    task = _task()
    cal = load_served_calibrator(calibrator) if calibrator else None
    thr = load_threshold(threshold) if threshold else None

    def settings(c, t):
        return epoch_settings(model="stub", adapter=None, calibrator=c, threshold=t, reference=None, alarm_alpha=0.05,
                              monitor_window=500)

    log = DecisionLog.open(state_dir, log_bodies=log_bodies) if state_dir is not None else None
    state = ServerState(config, loader=lambda: Decider(task, StubEngine(tokenizer), model_name="stub", calibrator=cal, threshold=thr),
                        info={"model": "stub", "labels": list(task.labels)}, unsafe_label="Unsafe", log=log,
                        epoch_settings=settings)
    return TestClient(create_app(state)), state


TEXTS = ["hello", "hello there friend", "a b c d e f g h i j", "one two", "x " * 30]


def test_every_answer_gets_an_id_and_a_stored_row(qwen3_tokenizer, tmp_path):
    calibrator, threshold = _platt_file(tmp_path), _threshold_file(tmp_path, 0.6)
    client, _ = _app(qwen3_tokenizer, tmp_path / "state", calibrator=calibrator, threshold=threshold)
    with client:
        _wait_ready(client)
        body = client.post("/v1/decide", json={"inputs": TEXTS[:3] + [{"input": TEXTS[3], "id": "mine"}]}).json()
        moderation = client.post("/v1/moderations", json={"input": [TEXTS[4]]}).json()
    results = body["results"]
    ids = [r["decision_id"] for r in results] + [moderation["results"][0]["decal"]["decision_id"]]
    assert len(set(ids)) == 5 and all(i.startswith("dec-") for i in ids) and results[3]["id"] == "mine"
    store = open_store(tmp_path / "state", create=False)
    rows = {r.id: r for r in store.decisions()}
    assert list(rows) == ids  # logged in answer order, nothing else
    for answer, text in zip(results, TEXTS):
        row = rows[answer["decision_id"]]
        assert row.decision == answer["decision"] and row.defer == answer["defer"] and row.valid == answer["valid"]
        assert row.option_probs == list(answer["option_probs"].values()) and row.confidence == answer["confidence"]
        assert row.calibrated_probs == list(answer["calibrated_option_probs"].values())
        assert row.calibrated_confidence == answer["calibrated_confidence"]
        assert row.label_mass == pytest.approx(sum(answer["option_probs"].values()), abs=1e-15)
        assert row.input is None  # no --log-bodies: only the hash
        canonical = json.dumps({"input": text}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        assert row.input_sha256 == hashlib.sha256(canonical.encode()).hexdigest()
        assert row.model == "stub" and row.endpoint == "/v1/decide" and row.epoch == body["epoch"] == 1
        assert row.calibrator == body["calibrator"]["sha256"] and row.threshold == body["threshold"]["sha256"]
    assert rows[ids[4]].endpoint == "/v1/moderations"


def test_log_bodies_stores_the_input(qwen3_tokenizer, tmp_path):
    client, _ = _app(qwen3_tokenizer, tmp_path, log_bodies=True)
    with client:
        _wait_ready(client)
        client.post("/v1/decide", json={"inputs": ["quokka text"]})
    (row,) = open_store(tmp_path, create=False).decisions()
    assert json.loads(row.input) == {"input": "quokka text"}


def test_feedback_statuses_per_item_then_correct_answers(qwen3_tokenizer, tmp_path):
    client, _ = _app(qwen3_tokenizer, tmp_path, threshold=_threshold_file(tmp_path, 0.2))
    with client:
        _wait_ready(client)
        first = client.post("/v1/decide", json={"inputs": TEXTS[:2]}).json()["results"]
        a, b = (r["decision_id"] for r in first)
        r = client.post("/v1/feedback", json={"feedback": [
            {"id": a, "label": "Unsafe"}, {"id": a, "label": "Unsafe"}, {"id": a, "label": "Safe"}, {"id": "dec-nope", "label": "Safe"},
            {"id": b, "label": "unsafe"}, {"id": b}, ["x"], {"id": b, "label": "Safe", "note": 1}, {"id": b, "label": "Safe"},
        ]})
        assert r.status_code == 200
        results = r.json()["results"]
        assert [x["status"] for x in results] == [200, 200, 409, 404, 422, 422, 422, 422, 200]
        assert [x.get("result") for x in results] == ["added", "duplicate", None, None, None, None, None, None, "added"]
        assert [x["error"]["param"] for x in results if x["status"] != 200] == [
            "feedback[2].label", "feedback[3].id", "feedback[4].label", "feedback[5].label", "feedback[6]", "feedback[7].note"]
        assert results[2]["error"]["type"] == "conflict_error" and "already has the label 'Unsafe'" in results[2]["error"]["message"]
        assert r.json()["counts"] == {"added": 2, "duplicate": 1, "errors": 6}
        for bad, param in (({}, "feedback"), ({"feedback": {}}, "feedback"), ({"feedback": []}, "feedback"),
                           ({"feedback": [], "x": 1}, "x")):
            response = client.post("/v1/feedback", json=bad)
            assert response.status_code == 422 and response.json()["error"]["param"] == param
        again = client.post("/v1/decide", json={"inputs": TEXTS[:2]}).json()["results"]
        assert [r["option_probs"] for r in again] == [r["option_probs"] for r in first]  # still answers, the same
        monitor = client.get("/v1/monitor").json()
    assert monitor["decisions"] == 4 and monitor["labelled"] == 2
    assert monitor["epoch"]["labelled_answered"] == 2  # threshold 0.2: both answered
    assert monitor["labelled_window"]["accuracy"] == 0.5  # the stub decides Unsafe: right for a, wrong for b


def test_monitor_figures_match_the_log(qwen3_tokenizer, tmp_path):
    calibrator = _platt_file(tmp_path, 1.0, 2.5)  # the stub's confidence 0.25 -> 0.80: answered
    client, _ = _app(qwen3_tokenizer, tmp_path / "s", calibrator=calibrator, threshold=_threshold_file(tmp_path, 0.55, 0.9))
    with client:
        _wait_ready(client)
        results = [r for t in TEXTS for r in client.post("/v1/decide", json={"inputs": [t, t + " more"]}).json()["results"]]
        client.post("/v1/feedback", json={"feedback": [{"id": r["decision_id"], "label": "Unsafe"} for r in results[:6]]})
        monitor = client.get("/v1/monitor").json()
        metrics = client.get("/metrics").text
    conf = np.array([r["calibrated_confidence"] for r in results])
    answered = ~np.array([r["defer"] for r in results])
    analysis = monitor["analysis_window"]
    assert monitor["decisions"] == analysis["decisions"] == len(results) == 10 and monitor["labelled"] == 6
    assert analysis["deferral_rate"] == pytest.approx(1 - answered.mean())
    assert analysis["estimated_accuracy"] == pytest.approx(conf[answered].mean())  # the label-free estimate
    assert analysis["mean_label_mass"] == pytest.approx(np.mean([sum(r["option_probs"].values()) for r in results]))
    assert monitor["promise"] == {"target_accuracy": 0.9, "delta": 0.05, "threshold": 0.55}
    guarantee = monitor["alarms"]["guarantee"]
    assert guarantee["labels"] == int(answered[:6].sum()) and guarantee["level"] == 0.05
    assert "decal_monitor_decisions 10.0" in metrics and "decal_monitor_labelled 6.0" in metrics


def test_no_state_dir_means_ids_but_no_feedback_or_monitor(qwen3_tokenizer):
    client, _ = _app(qwen3_tokenizer, None)
    with client:
        _wait_ready(client)
        (answer,) = client.post("/v1/decide", json={"inputs": ["hi"]}).json()["results"]
        assert answer["decision_id"].startswith("dec-")
        for method, path in (("POST", "/v1/feedback"), ("GET", "/v1/monitor")):
            r = client.request(method, path, json={"feedback": [{"id": answer["decision_id"], "label": "Safe"}]})
            assert r.status_code == 404 and "--state-dir" in r.json()["error"]["message"]


def test_reload_swaps_calibrator_and_threshold_and_the_log_says_which_answered(qwen3_tokenizer, tmp_path):
    old_cal, new_cal = _platt_file(tmp_path, 2.0, -1.0), _platt_file(tmp_path, 0.5, 0.5)
    client, state = _app(qwen3_tokenizer, tmp_path / "s", calibrator=old_cal, threshold="0.3")
    with client:
        _wait_ready(client)
        before = client.post("/v1/decide", json={"inputs": ["hello"]}).json()
        r = client.post("/v1/admin/reload", json={"calibrator": new_cal, "threshold": "0.9"})
        assert r.status_code == 200 and r.json()["epoch"] == 2
        after = client.post("/v1/decide", json={"inputs": ["hello"]}).json()
        bad = client.post("/v1/admin/reload", json={"calibrator": str(tmp_path / "missing.json")})
        assert bad.status_code == 422 and "still serving epoch 2" in bad.json()["error"]["message"]
        assert client.post("/v1/admin/reload", json={"calibrator": 3}).status_code == 422
        same = client.post("/v1/decide", json={"inputs": ["hello"]}).json()
        info = client.get("/v1/info").json()
        reread = client.post("/v1/admin/reload").json()  # no body: the same files again, a new epoch
    assert before["epoch"] == 1 and after["epoch"] == same["epoch"] == 2 and reread["epoch"] == 3
    assert before["calibrator"]["path"] == old_cal and after["calibrator"]["path"] == new_cal
    assert before["threshold"]["value"] == 0.3 and after["threshold"]["value"] == 0.9
    assert after["results"][0]["calibrated_confidence"] != before["results"][0]["calibrated_confidence"]
    assert info["calibrator"]["path"] == new_cal and info["epoch"] == 2
    store = open_store(tmp_path / "s", create=False)
    rows = list(store.decisions())
    assert [r.epoch for r in rows] == [1, 2, 2]
    assert rows[0].calibrator == before["calibrator"]["sha256"] != rows[1].calibrator == after["calibrator"]["sha256"]
    assert [r.threshold for r in rows] == ["value:0.3", "value:0.9", "value:0.9"]
    assert [e.settings["calibrator"]["path"] for e in store.epochs()] == [old_cal, new_cal, new_cal]


def test_restart_continues_the_epoch_and_rebuilds_the_monitor(qwen3_tokenizer, tmp_path):
    threshold = _threshold_file(tmp_path, 0.2)
    client, _ = _app(qwen3_tokenizer, tmp_path / "s", threshold=threshold)
    with client:
        _wait_ready(client)
        ids = [r["decision_id"] for r in client.post("/v1/decide", json={"inputs": TEXTS}).json()["results"]]
        client.post("/v1/feedback", json={"feedback": [{"id": i, "label": "Safe"} for i in ids[:3]]})
        first = client.get("/v1/monitor").json()
    client, _ = _app(qwen3_tokenizer, tmp_path / "s", threshold=threshold)  # same settings: same epoch
    with client:
        _wait_ready(client)
        resumed = client.get("/v1/monitor").json()
    assert resumed == first
    client, _ = _app(qwen3_tokenizer, tmp_path / "s", threshold="0.5")  # other settings: a new epoch
    with client:
        _wait_ready(client)
        other = client.get("/v1/monitor").json()
    assert other["epoch"]["id"] == 2 and other["epoch"]["decisions"] == 0 and other["decisions"] == 5 and other["labelled"] == 3
