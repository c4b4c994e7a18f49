"""The HTTP layer of `decal serve` in process, on a stub engine (no model): loading and readiness,
a failing batch, body logging, and the API key check. The real server is tested in test_serve.py.
"""

from __future__ import annotations

import logging
import threading

import pytest

from decal.engines import Engine, OptionScores
from decal.serve.app import ServerState, create_app
from decal.serve.decider import Decider
from decal.serve.settings import ServeConfig
from decal.tasks.generic import DEFAULT_TEMPLATES
from decal.tasks.schema import DecisionExample, Task

MARKER = "quokka-marker-9127"


class StubEngine(Engine):
    """Option probabilities from the prompt length; an input holding "FAIL" makes the batch raise."""

    # The server asks the engine registry for the capabilities of `name` (its queue's batching:
    # `decal.serve.engine.batching_defaults`); the stub batches as the hf engine does.
    name = "hf"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fail_token = tokenizer("FAIL", add_special_tokens=False)["input_ids"][0]

    def context_length(self):
        return 300

    def score(self, sequences, decision_tokens, *, batch_size=8):
        if any(self.fail_token in s for s in sequences):
            raise RuntimeError("stub engine failure")
        # The top token is the likelier option's decision token, so each decision is valid (a model
        # that answers with a label; `decal.recording`'s validity rule).
        out = []
        for s, dt in zip(sequences, decision_tokens, strict=True):
            probs = [0.5 / len(s), 0.25]
            top = dt.token_ids[max(range(2), key=probs.__getitem__)]
            out.append(OptionScores(option_probs=probs, top_token=dt.tokens[dt.token_ids.index(top)], top_token_id=top,
                                    top_is_option=True))
        return out

    def info(self):
        return {"engine": "stub", "engine_version": None, "engine_options": {}}


def _task() -> Task:
    ex = DecisionExample(id="0", labels=("Safe", "Unsafe"), label="Safe", input="hello")
    return Task(name="t", split="all", examples=(ex,), template=DEFAULT_TEMPLATES["classification"])


def _client(tokenizer, *, loader=None, **config):
    from starlette.testclient import TestClient

    cfg = ServeConfig(model="stub", task="t", **config)
    task = _task()
    loader = loader or (lambda: Decider(task, StubEngine(tokenizer), model_name="stub"))
    state = ServerState(cfg, loader=loader, info={"model": "stub", "labels": list(task.labels)}, unsafe_label="Unsafe")
    return TestClient(create_app(state)), state


def _wait_ready(client):
    import time

    for _ in range(200):
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("not ready")


def test_loading_then_ready(qwen3_tokenizer):
    gate = threading.Event()
    task = _task()

    def loader():
        gate.wait(10)
        return Decider(task, StubEngine(qwen3_tokenizer), model_name="stub")

    client, state = _client(qwen3_tokenizer, loader=loader)
    with client:
        assert client.get("/health").json() == {"status": "ok"}
        r = client.get("/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "reason": "loading"} and r.headers["retry-after"] == "5"
        r = client.post("/v1/decide", json={"inputs": ["hi"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "loading" in r.json()["error"]["message"]
        gate.set()
        _wait_ready(client)
        (answer,) = client.post("/v1/decide", json={"inputs": ["hi"]}).json()["results"]
        assert answer["decision"] == "Unsafe" and answer["option_probs"]["Unsafe"] == 0.25
        assert client.get("/v1/info").json()["engine"] == "stub"


def test_failed_load_is_reported_and_stops_the_server(qwen3_tokenizer):
    def loader():
        raise RuntimeError("weights missing")

    client, state = _client(qwen3_tokenizer, loader=loader)
    stopped = threading.Event()
    state.on_fatal = stopped.set
    with client:
        assert stopped.wait(10)
        r = client.get("/ready")
        assert r.status_code == 503 and "weights missing" in r.json()["reason"]
        assert "failed to load" in client.post("/v1/decide", json={"inputs": ["hi"]}).json()["error"]["message"]


def test_failed_batch_answers_500_and_the_next_request_is_served(qwen3_tokenizer):
    client, _ = _client(qwen3_tokenizer)
    with client:
        _wait_ready(client)
        r = client.post("/v1/decide", json={"inputs": ["FAIL now"]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert client.post("/v1/decide", json={"inputs": ["fine"]}).status_code == 200
        assert 'decal_errors_total{kind="internal"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize("log_bodies", [False, True])
def test_bodies_are_logged_only_when_asked(qwen3_tokenizer, caplog, log_bodies):
    client, _ = _client(qwen3_tokenizer, log_bodies=log_bodies)
    with caplog.at_level(logging.DEBUG), client:
        _wait_ready(client)
        client.post("/v1/decide", json={"inputs": [MARKER]})
        client.post("/v1/decide", json={"inputs": [MARKER, 3]})  # a 422 does not log it either
        client.post("/v1/decide", content=b'{"inputs": [' + MARKER.encode())
    assert (MARKER in caplog.text) == log_bodies


def test_api_key(qwen3_tokenizer):
    client, _ = _client(qwen3_tokenizer, api_key="s3cret")
    with client:
        _wait_ready(client)  # /ready needs no key
        assert client.post("/v1/decide", json={"inputs": ["hi"]}).status_code == 401
        for header in ("Bearer s3cre", "Bearer s3cret2", "Token s3cret", "s3cret", "Bearer  "):
            assert client.post("/v1/decide", json={"inputs": ["hi"]}, headers={"Authorization": header}).status_code == 401, header
        for header in ("Bearer s3cret", "bearer s3cret"):
            assert client.post("/v1/decide", json={"inputs": ["hi"]}, headers={"Authorization": header}).status_code == 200
        assert client.get("/v1/info").status_code == 401
        assert "s3cret" not in client.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).text


def test_moderation_needs_a_safety_task(qwen3_tokenizer):
    from starlette.testclient import TestClient

    task = _task()
    state = ServerState(ServeConfig(model="stub", task="t"), loader=lambda: Decider(task, StubEngine(qwen3_tokenizer), model_name="stub"),
                        info={"model": "stub"}, unsafe_label=None)
    with TestClient(create_app(state)) as client:
        _wait_ready(client)
        r = client.post("/v1/moderations", json={"input": "hi"})
        assert r.status_code == 404 and "two-label safety task" in r.json()["error"]["message"]


def test_serve_help_names_every_endpoint(capsys):
    from decal.cli import main
    from decal.serve.app import _ENDPOINTS

    assert main(["serve", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the help text
    missing = [path for path in _ENDPOINTS if path not in out]
    assert not missing, f"`decal serve --help` does not name {missing}"
