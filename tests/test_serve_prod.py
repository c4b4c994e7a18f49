"""`decal serve` in production, as a real process on a free loopback port with a real HTTP client.

- a bounded load (fixed number of requests, time cap) with feedback interleaved: `/v1/monitor`
  counts equal the client's; then SIGKILL during load and a restart on the same `--state-dir`:
  every acknowledged decision and feedback item is in the store, the monitor is rebuilt;
- `decal monitor` and `decal calibrate --fit-feedback` / `decal threshold` on that state dir;
- feedback for an unknown id, a label that is not an option and a conflicting relabel get 404,
  422 and 409 per item, and the server still answers correctly;
- SIGHUP loads a new calibrator without a restart, and the log records which one answered.

The tiny random Qwen3 with the real tokenizer: the model's answers do not matter here.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import numpy as np
import pytest
from test_serve import _env, _evaluate, _safety_rows, _write_jsonl

from decal.cli import main
from decal.serve.process import ServeProcess
from decal.serve.store import SQLiteStore, STORE_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_qwen3_dir):
    """The task file, a `decal evaluate` run of it (the reference window) and a Platt calibrator."""
    root = tmp_path_factory.mktemp("prod")
    task = _write_jsonl(root / "safety.jsonl", _safety_rows(24, seed=5))
    _evaluate(str(tiny_qwen3_dir), str(task), root / "eval")
    assert main(["calibrate", "--method", "platt", "--fit", str(root / "eval" / "run"), "--out", str(root / "cal"),
                 "--apply", str(root / "eval" / "run")]) == 0
    texts = [json.loads(line)["input"] for line in task.read_text().splitlines()]
    return {"root": root, "task": task, "reference": root / "eval" / "run", "calibrator": root / "cal" / "calibrator.json",
            "texts": texts, "model": str(tiny_qwen3_dir)}


def _server(served, state_dir, *extra) -> ServeProcess:
    args = ["--dtype", "float32", "--model", served["model"], "--task", str(served["task"]), "--threads", "1",
            "--max-wait-ms", "20", "--max-batch-size", "8", "--state-dir", str(state_dir), "--reference",
            str(served["reference"]), "--calibrator", str(served["calibrator"]), "--threshold", "0.5", *extra]
    return ServeProcess(args, env=_env()).start()


class _Client:
    """What the client knows: acknowledged decision ids and acknowledged feedback, and what is in flight."""

    def __init__(self):
        self.decisions: dict[str, str] = {}  # id -> decision
        self.feedback: dict[str, str] = {}  # id -> label, acknowledged (200)
        self.in_flight = 0  # inputs sent and not answered
        self.errors: list[str] = []


async def _load(url: str, texts: list[str], client: _Client, *, requests: int, time_cap: float, stop_after: int | None = None,
                on_threshold=None) -> None:
    """8 workers, `requests` requests each at most, until `time_cap` s; every third request is feedback."""
    import httpx

    deadline = time.monotonic() + time_cap
    fired = False
    rng = np.random.default_rng(0)

    async def worker(k: int):
        nonlocal fired
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for j in range(requests):
                if time.monotonic() > deadline:
                    return
                try:
                    if j % 3 == 2 and client.decisions:
                        ids = list(client.decisions)[-4:]
                        items = [{"id": i, "label": ["Safe", "Unsafe"][int(rng.integers(2))]} for i in ids[:2]]
                        items = [it for it in items if it["id"] not in client.feedback]
                        if items:
                            r = await http.post("/v1/feedback", json={"feedback": items})
                            for it, res in zip(items, r.json()["results"]):
                                if res["status"] == 200:
                                    client.feedback[it["id"]] = it["label"]
                        continue
                    inputs = [texts[(k * 7 + j) % len(texts)] for _ in range(1 + j % 2)]
                    client.in_flight += len(inputs)
                    r = await http.post("/v1/decide", json={"inputs": inputs})
                    client.in_flight -= len(inputs)
                    if r.status_code != 200:
                        client.errors.append(r.text)
                        continue
                    for res in r.json()["results"]:
                        client.decisions[res["decision_id"]] = res["decision"]
                except httpx.TransportError:  # the server was killed
                    return
                if stop_after is not None and not fired and len(client.decisions) >= stop_after:
                    fired = True
                    on_threshold()

    await asyncio.gather(*(worker(k) for k in range(8)))


def _stored(state_dir) -> tuple[dict, dict]:
    store = SQLiteStore(state_dir / STORE_FILE)  # a second connection beside the server's: WAL allows it
    try:
        return {r.id: r.decision for r in store.decisions()}, {fb.id: fb.label for fb, _ in store.feedback()}
    finally:
        store.close()


def test_load_sigkill_restart_loses_nothing_and_counts_match(served, tmp_path):
    import httpx

    state_dir = tmp_path / "state"
    client = _Client()
    server = _server(served, state_dir)
    asyncio.run(_load(server.url, served["texts"], client, requests=12, time_cap=120))
    assert not client.errors and len(client.decisions) > 40 and len(client.feedback) > 10
    monitor = httpx.get(f"{server.url}/v1/monitor").json()
    assert monitor["decisions"] == len(client.decisions) and monitor["labelled"] == len(client.feedback)
    assert monitor["reference_window"]["n"] == 24 and monitor["epoch"]["id"] == 1

    # SIGKILL in the middle of a second load
    before = len(client.decisions)
    asyncio.run(_load(server.url, served["texts"], client, requests=60, time_cap=120, stop_after=before + 30,
                      on_threshold=lambda: server.send_signal(signal.SIGKILL)))
    server.stop(timeout=30)
    assert server.returncode == -signal.SIGKILL
    decisions, labels = _stored(state_dir)
    assert client.decisions.items() <= decisions.items()  # every acknowledged decision, as answered
    assert client.feedback.items() <= labels.items()  # every acknowledged label
    assert len(decisions) - len(client.decisions) <= client.in_flight  # the rest were committed, then killed

    restarted = _server(served, state_dir)
    try:
        monitor = httpx.get(f"{restarted.url}/v1/monitor").json()
        assert monitor["decisions"] == len(decisions) and monitor["labelled"] == len(labels)
        assert monitor["epoch"]["id"] == 1  # same settings: the epoch goes on
        client.decisions.update({i: d for i, d in decisions.items() if i not in client.decisions})
        asyncio.run(_load(restarted.url, served["texts"], client, requests=6, time_cap=120))
        monitor = httpx.get(f"{restarted.url}/v1/monitor").json()
        assert (monitor["decisions"], monitor["labelled"]) == (len(client.decisions), len(client.feedback | labels))
        assert "decal_monitor_decisions" in httpx.get(f"{restarted.url}/metrics").text
    finally:
        assert restarted.stop() == 0

    assert main(["monitor", str(state_dir), "--format", "html"]) == 0
    report = (state_dir / "report" / "monitor.html").read_text()
    assert "Alarms" in report and "data:image/png;base64," in report and (state_dir / "report" / "monitor.png").is_file()
    assert json.loads((state_dir / "report" / "monitor.json").read_text())["snapshot"]["decisions"] == len(client.decisions)

    out = tmp_path / "refit"
    assert main(["calibrate", "--method", "platt", "--fit-feedback", str(state_dir), "--fit-fraction", "0.5", "--out", str(out)]) == 0
    from decal.records import read_records

    held_out = read_records(out / "feedback")
    assert len(held_out) == len(client.feedback | labels) - round(0.5 * len(client.feedback | labels))
    assert all(r.label == (client.feedback | labels)[r.id] for r in held_out)
    assert main(["threshold", str(out / "feedback"), "--target-accuracy", "0.6", "--out", str(tmp_path / "thr.json")]) == 0


def test_feedback_errors_then_correct_answers_and_sighup_reload(served, tmp_path):
    import httpx

    from decal.calibrators import PlattScaling

    calibrator = tmp_path / "calibrator.json"
    calibrator.write_bytes(served["calibrator"].read_bytes())
    server = _server(served, tmp_path / "state", "--calibrator", str(calibrator))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            text = served["texts"][0]
            first = http.post("/v1/decide", json={"inputs": [text]}).json()["results"][0]
            ident = first["decision_id"]
            assert http.post("/v1/feedback", json={"feedback": [{"id": ident, "label": "Safe"}]}).json()["results"][0]["status"] == 200
            r = http.post("/v1/feedback", json={"feedback": [
                {"id": "dec-unknown", "label": "Safe"}, {"id": ident, "label": "Harmless"}, {"id": ident, "label": "Unsafe"},
                {"id": ident, "label": "Safe"}]})
            assert r.status_code == 200
            assert [x["status"] for x in r.json()["results"]] == [404, 422, 409, 200]
            again = http.post("/v1/decide", json={"inputs": [text]}).json()["results"][0]
            assert again["decision"] == first["decision"]
            np.testing.assert_allclose(list(again["option_probs"].values()), list(first["option_probs"].values()), atol=1e-6)
            assert again["calibrated_confidence"] == pytest.approx(first["calibrated_confidence"], abs=1e-6)

            new = PlattScaling()
            new.a_, new.b_ = 0.5, 1.5
            new.save(calibrator)  # a new calibrator in the same file, then SIGHUP
            server.send_signal(signal.SIGHUP)
            for _ in range(200):
                if http.get("/v1/info").json()["epoch"] == 2:
                    break
                time.sleep(0.05)
            after = http.post("/v1/decide", json={"inputs": [text]}).json()
            assert after["epoch"] == 2 and after["calibrator"]["sha256"] != first.get("calibrator_sha", "")
            expected = float(new.transform(np.array([after["results"][0]["confidence"]]))[0])
            assert after["results"][0]["calibrated_confidence"] == pytest.approx(expected, abs=1e-9)
    finally:
        assert server.stop() == 0
    decisions, _ = _stored(tmp_path / "state")
    store = SQLiteStore(tmp_path / "state" / STORE_FILE)
    rows = list(store.decisions())
    store.close()
    assert [r.epoch for r in rows] == [1, 1, 2] and rows[2].calibrator == after["calibrator"]["sha256"] != rows[0].calibrator
    assert "reloaded (SIGHUP): epoch 2" in server.log
