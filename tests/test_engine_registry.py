"""Tests for the engine registry (issue #21 item 7) and the remote engine's parts that need no vLLM server.

- every engine declares its name, options, capabilities and build steps; options of one engine
  given to another fail in one line naming the engine that takes them; no caller outside
  `decal.engines` compares engine names (an AST scan of the source);
- experiment configs with `engine: remote` plan `--engine remote --server-url ...` commands, and
  refuse a missing URL or an API key in a config;
- the remote engine's HTTP fleet (`decal.engines.remote.Fleet`) against a real HTTP server on a
  loopback port (the standard library's, answering as scripted): retries on 5xx and 429 honouring
  Retry-After, no retry on 4xx, requests moving to a live replica, one line when every replica is
  down, and the bearer token sent but never in an error message;
- `logprob_refusal` on answers shaped like those of servers that cannot give exact probabilities.

The records of the remote engine against real vLLM servers are tested in tests/test_remote.py
(and under faults in tests/test_remote_faults.py).
"""

from __future__ import annotations

import ast
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from decal.engines import EngineOptions, check_engine_options, engine_kind, engine_names
from decal.engines.registry import engine_kinds, option_args
from decal.engines.remote import Fleet, RemoteEngineError, RemoteOptions, logprob_refusal
from decal.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src" / "decal"


# --- the registry --------------------------------------------------------------------------------


def test_engines_declare_capabilities_options_and_build_steps():
    assert engine_names() == ("hf", "vllm", "remote")
    caps = {k.name: k.capabilities for k in engine_kinds()}
    assert all(c.exact_probabilities for c in caps.values())
    assert [n for n, c in caps.items() if c.shared_adapters] == ["vllm", "remote"]
    assert [n for n, c in caps.items() if c.per_request_seeds] == ["vllm", "remote"]
    assert [n for n, c in caps.items() if c.data_parallel] == ["vllm"]
    assert [n for n, c in caps.items() if not c.loads_weights] == ["remote"]
    assert [n for n, c in caps.items() if c.local_forward] == ["hf"]
    assert all(callable(k.build) for k in engine_kinds())
    assert engine_kind("remote").flag("server_urls") == "--server-url"


@pytest.mark.parametrize("engine, options, message", [
    ("remote", EngineOptions(), "--engine remote needs --server-url"),
    ("remote", EngineOptions(tensor_parallel_size=2, extra={"server_urls": ["http://127.0.0.1:1/v1"]}),
     "--tensor-parallel-size applies to --engine vllm only, not remote"),
    ("vllm", EngineOptions(extra={"server_urls": ["http://127.0.0.1:1/v1"]}), "--server-url applies to --engine remote only"),
    ("hf", EngineOptions(extra={"max_concurrency": 2}), "--max-concurrency applies to --engine remote only, not hf"),
    ("remote", EngineOptions(extra={"server_urls": ["http://127.0.0.1:1/v1"], "max_concurency": 2}),
     "is not an option of the remote engine; did you mean max_concurrency?"),
    ("remote", EngineOptions(extra={"server_urls": ["http://127.0.0.1:1"]}), "must be the base of the OpenAI API, ending in /v1"),
    ("remote", EngineOptions(extra={"server_urls": ["http://me:secret@127.0.0.1:1/v1"]}), "has credentials in it"),
    ("remote", EngineOptions(extra={"server_urls": ["ftp://127.0.0.1/v1"]}), "is not an http(s) URL"),
    ("remote", EngineOptions(extra={"server_urls": ["http://a:1/v1", "http://a:1/v1"]}), "lists a URL twice"),
    ("remote", EngineOptions(extra={"server_urls": ["http://a:1/v1"], "max_concurrency": 0}), "`max_concurrency` must be an integer >= 1"),
    ("remote", EngineOptions(extra={"server_urls": ["http://a:1/v1"], "server_timeout": -1}), "`server_timeout` must be"),
    ("remote", EngineOptions(extra={"server_urls": ["http://a:1/v1"], "api_key": "k"}), "api_key is never an engine option"),
    ("vlm", EngineOptions(), "unknown engine 'vlm'; choose one of: hf, vllm, remote. Did you mean: vllm?"),
])
def test_bad_options_fail_in_one_line_naming_the_engine_that_takes_them(engine, options, message):
    with pytest.raises(ConfigError) as e:
        check_engine_options(engine, options)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "secret" not in str(e.value)


def test_option_args_invert_the_cli_flags():
    args = option_args("remote", {"server_urls": ["http://a:1/v1", "http://b:2/v1"], "max_concurrency": 4,
                                  "served_model_name": "guard"})
    assert args == ["--server-url", "http://a:1/v1", "--server-url", "http://b:2/v1", "--max-concurrency", "4",
                    "--served-model-name", "guard"]
    assert option_args("vllm", {"tensor_parallel_size": 2, "enforce_eager": False, "y": [1, 2]}) == [
        "--tensor-parallel-size", "2", "--engine-arg", "enforce_eager=false", "--engine-arg", "y=[1, 2]"]


def _engine_name_comparisons(path: Path) -> list[str]:
    names = set(engine_names())
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = [o.value for o in operands if isinstance(o, ast.Constant)]
            consts += [e.value for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts
                       if isinstance(e, ast.Constant)]
            if names & {c for c in consts if isinstance(c, str)}:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_no_caller_compares_engine_names():
    """Callers ask the registry for capabilities (issue #21 item 7); only `decal.engines` knows names."""
    offenders = [hit for path in SRC.rglob("*.py") if "engines" not in path.relative_to(SRC).parts
                 for hit in _engine_name_comparisons(path)]
    assert offenders == []


# --- experiment configs --------------------------------------------------------------------------


def _config(tmp_path, evaluation: dict) -> Path:
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "remote-grid", "output_dir": str(tmp_path / "exp"), "models": [{"name": "smol", "path": "smollm2-135m-instruct"}],
        "methods": [{"name": "base", "method": "base"}],
        "train_tasks": [{"task": "builtin", "split": "train", "evaluations": [{"task": "builtin", "split": "test"}]}],
        "evaluation": evaluation,
    }), encoding="utf-8")
    return path


def test_a_remote_config_plans_remote_commands_in_one_engine_group(tmp_path):
    from decal.experiments import build_plan, load_experiment_config as load_config

    urls = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    config = load_config(_config(tmp_path, {"engine": "remote", "engine_options": {"server_urls": urls,
                                                                                   "max_concurrency": 8}}))
    (step,) = [s for s in build_plan(config, tmp_path / "runs") if s.kind == "evaluate"]
    assert step.commands[0][0] == "evaluate"
    command = step.commands[0]
    at = command.index("--engine")
    assert command[at + 1] == "remote"
    pairs = list(zip(command, command[1:]))
    assert [v for k, v in pairs if k == "--server-url"] == urls and ("--max-concurrency", "8") in pairs
    assert step.info["engine"] == "remote" and step.info["engine_group"]


@pytest.mark.parametrize("evaluation, message", [
    ({"engine": "remote"}, "--engine remote needs --server-url"),
    ({"engine": "remote", "engine_options": {"server_urls": ["http://127.0.0.1:1/v1"], "api_key": "k"}},
     "api_key is never an engine option"),
    ({"engine": "remot"}, "unknown engine 'remot'"),
])
def test_bad_remote_configs_fail_at_load(tmp_path, evaluation, message):
    from decal.experiments import load_experiment_config as load_config

    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, evaluation))


# --- the HTTP fleet, against a scripted real HTTP server -------------------------------------------


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers, body) of the server's script."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self):
        server = self.server
        with server.lock:
            server.seen.append((time.monotonic(), self.headers.get("Authorization")))
            status, headers, body = server.script.pop(0) if server.script else (200, {}, {"ok": True})
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    servers = []

    def start(script):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
        server.script, server.seen, server.lock = list(script), [], threading.Lock()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _fleet(urls, **kw):
    return Fleet(RemoteOptions(server_urls=tuple(urls), **{"server_retries": 3, **kw}), api_key="sekrit-token")


def test_retries_5xx_and_429_honouring_retry_after_with_the_bearer_token(scripted):
    server, url = scripted([(503, {}, {"error": {"message": "overloaded"}}),
                            (429, {"Retry-After": "1"}, {"error": {"message": "slow down"}})])
    fleet = _fleet([url])
    try:
        start = time.monotonic()
        assert fleet.post("/completions", {"x": 1}) == {"ok": True}
    finally:
        fleet.close()
    times = [t for t, _ in server.seen]
    assert len(times) == 3 and all(auth == "Bearer sekrit-token" for _, auth in server.seen)
    # The 503 waits the first backoff (0.5 s, jittered to 0.375-0.625 s); the 429 waits its
    # Retry-After of 1 s exactly, not a backoff.
    assert 0.3 <= times[1] - times[0] <= 0.9
    assert 0.95 <= times[2] - times[1] <= 1.6
    assert times[0] - start < 0.5


def test_a_4xx_is_not_retried_and_its_message_is_one_line_without_the_key(scripted):
    server, url = scripted([(400, {}, {"error": {"message": "bad\nrequest"}})])
    fleet = _fleet([url])
    try:
        with pytest.raises(RemoteEngineError) as e:
            fleet.post("/completions", {})
    finally:
        fleet.close()
    assert len(server.seen) == 1
    assert "HTTP 400: bad request" in str(e.value) and "\n" not in str(e.value) and "sekrit" not in str(e.value)


def test_requests_move_to_a_live_replica_and_every_replica_down_is_one_line(scripted):
    _, live = scripted([])
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
    fleet = _fleet([dead, live])
    try:
        assert fleet.post_many("/completions", [{"i": i} for i in range(6)]) == [{"ok": True}] * 6
        assert fleet.replicas[0].last_error and fleet.replicas[1].sent >= 6
    finally:
        fleet.close()
    fleet = _fleet([dead, "http://127.0.0.1:7/v1"], server_retries=2)
    try:
        with pytest.raises(RemoteEngineError) as e:
            fleet.post("/completions", {})
    finally:
        fleet.close()
    message = str(e.value)
    assert message.startswith("every one of the 2 servers failed after 3 attempts") and "\n" not in message
    assert dead in message and "rerun the same command to resume" in message and "sekrit" not in message


def test_at_most_max_concurrency_requests_in_flight_per_replica(scripted):
    import http.server

    active, peak, lock = [0], [0], threading.Lock()

    class Slow(_Scripted):
        def _answer(self):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= 1
            super()._answer()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.script, server.seen, server.lock = [], [], threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fleet = _fleet([f"http://127.0.0.1:{server.server_address[1]}/v1"], max_concurrency=3)
    try:
        assert len(fleet.post_many("/completions", [{}] * 12)) == 12
    finally:
        fleet.close()
        server.shutdown()
        server.server_close()
    assert peak[0] == 3


# --- the log-probability checks ------------------------------------------------------------------


def _answer(position: dict, token_ids=(5,)):
    return {"choices": [{"index": 0, "token_ids": list(token_ids),
                         "logprobs": {"top_logprobs": [{f"token_id:{k}": v for k, v in position.items()}]}}]}


GOOD = {"greedy": _answer({5: -0.1, 7: -3.0, 9: -4.0}), "hot": _answer({5: -0.1, 7: -3.0, 9: -4.0}),
        "top": _answer({5: -0.1, 3: -3.5, 7: -3.0})}


@pytest.mark.parametrize("change, message", [
    ({}, None),
    ({"greedy": _answer({5: -0.1, 2: -2.0, 4: -3.0})}, "ignores logprob_token_ids (no log-probability for token ids [7, 9]"),
    ({"hot": _answer({5: -0.7, 7: -1.5, 9: -2.0})}, "returns processed log-probabilities"),
    ({"top": _answer({5: 12.0, 3: 9.0})}, "not log-probabilities (its top tokens' probabilities sum to"),
    ({"greedy": {"choices": [{"index": 0, "token_ids": [5], "logprobs": {"top_logprobs": [{"Safe": -0.1}]}}]}},
     "log-probabilities keyed by id"),
    ({"greedy": {"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:7": -0.1}]}}]}},
     "does not return generated token ids"),
])
def test_logprob_refusals_name_what_differs(change, message):
    refusal = logprob_refusal({**GOOD, **change}, [7, 9])
    assert refusal is None if message is None else message in refusal


def test_https_with_a_private_ca(tmp_path, monkeypatch, scripted):
    """An https URL: the certificate is checked (refused without the CA), and accepted with
    SSL_CERT_FILE naming it."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server, url = scripted([])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    url = url.replace("http://", "https://")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    fleet = _fleet([url], server_retries=0)
    try:
        with pytest.raises(RemoteEngineError, match="CERTIFICATE_VERIFY_FAILED"):
            fleet.get("/models")
    finally:
        fleet.close()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    fleet = _fleet([url])
    try:
        assert fleet.get("/models") == {"ok": True}
    finally:
        fleet.close()
    assert [auth for _, auth in server.seen] == ["Bearer sekrit-token"]
