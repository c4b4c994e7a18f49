"""The parts of `decal serve` in process: batching queue, input parsing, moderation schema pieces,
threshold and calibrator loading, bind rules, and the decider against `decal.evaluation`.

The real server, as a subprocess over HTTP, is tested in tests/test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from conftest import LOGPROB_ATOL_TINY, assert_logprobs_close
from decal.errors import ConfigError, DataError
from decal.serve.batching import BatchQueue, DeadlineExceeded, QueueFull
from decal.serve.decider import Decider, InputError
from decal.serve.moderation import OPENAI_CATEGORIES, parse_moderation, unsafe_label_of
from decal.serve.settings import ServeConfig, ThresholdInfo, check_bind, is_loopback, load_threshold
from decal.tasks.generic import DEFAULT_TEMPLATES
from decal.tasks.schema import DecisionExample, Task


# --- batching queue ----------------------------------------------------------------------------


def _run(coro):
    return asyncio.run(coro)


class _Recorder:
    """A blocking batch function that records batch sizes and can be slowed or made to fail."""

    def __init__(self, delay: float = 0.0, fail_on=None):
        self.batches: list[list] = []
        self.delay, self.fail_on = delay, fail_on
        self.lock = threading.Lock()

    def __call__(self, payloads):
        with self.lock:
            self.batches.append(list(payloads))
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("engine failed")
        return [p * 10 for p in payloads]


def test_queue_batches_concurrent_requests_and_keeps_order():
    rec = _Recorder(delay=0.05)

    async def main():
        q = BatchQueue(rec, max_batch_size=4, max_wait_s=0.2, max_queue=100)
        q.start()
        results = await asyncio.gather(*(q.submit([i, i + 100], timeout=10) for i in range(5)))
        await q.close()
        return results

    results = _run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(5)]
    assert all(len(b) <= 4 for b in rec.batches)
    assert sum(len(b) for b in rec.batches) == 10
    assert max(len(b) for b in rec.batches) == 4  # concurrent inputs were scored together


def test_queue_starts_a_lone_input_early_and_gathers_a_burst():
    rec = _Recorder()

    async def main():
        q = BatchQueue(rec, max_batch_size=32, max_wait_s=5.0, max_queue=100)
        q.start()
        start = time.monotonic()
        assert await q.submit([1], timeout=30) == [10]
        lone = time.monotonic() - start  # no more inputs came: it went after a tenth of the wait

        async def later(i):
            await asyncio.sleep(0.05 * i)
            return await q.submit([i], timeout=30)

        burst = await asyncio.gather(*(later(i) for i in range(2, 7)))  # one every 50 ms
        await q.close()
        return lone, burst

    lone, burst = _run(main())
    assert lone < 2.5
    assert burst == [[i * 10] for i in range(2, 7)]
    assert rec.batches == [[1], [2, 3, 4, 5, 6]]  # the burst became one batch


def test_queue_full_raises_with_retry_after():
    rec = _Recorder()

    async def main():
        q = BatchQueue(rec, max_batch_size=32, max_wait_s=1.0, max_queue=3)
        q.start()
        first = asyncio.create_task(q.submit([1, 2], timeout=10))
        await asyncio.sleep(0.05)  # the first request waits for its batch to fill
        with pytest.raises(QueueFull) as info:
            await q.submit([3, 4], timeout=10)
        assert info.value.retry_after >= 1
        out = await first
        await q.close()
        return out

    assert _run(main()) == [10, 20]


def test_deadline_drops_unstarted_inputs_and_other_requests_still_answer():
    rec = _Recorder(delay=0.2)

    async def main():
        q = BatchQueue(rec, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        q.start()
        slow = asyncio.create_task(q.submit([1], timeout=10))
        await asyncio.sleep(0.02)
        with pytest.raises(DeadlineExceeded):
            await q.submit([2], timeout=0.05)  # queued behind a 0.2 s batch
        after = await q.submit([3], timeout=10)
        out = await slow
        await q.close()
        return out, after

    assert _run(main()) == ([10], [30])
    assert [2] not in rec.batches  # the timed-out input was never scored


def test_timed_out_inputs_leave_the_queue():
    rec = _Recorder()

    async def main():
        q = BatchQueue(rec, max_batch_size=32, max_wait_s=0.5, max_queue=4)
        q.start()
        with pytest.raises(DeadlineExceeded):
            await q.submit([1, 2, 3], timeout=0.05)  # waits for a batch that is not full yet
        assert q.depth == 0
        out = await q.submit([4, 5, 6, 7], timeout=10)  # the whole queue is free again
        await q.close()
        return out

    assert _run(main()) == [40, 50, 60, 70]
    assert rec.batches == [[4, 5, 6, 7]]


def test_failed_batch_fails_only_its_requests():
    rec = _Recorder(fail_on=2)

    async def main():
        q = BatchQueue(rec, max_batch_size=1, max_wait_s=0.0, max_queue=10)
        q.start()
        with pytest.raises(RuntimeError, match="engine failed"):
            await q.submit([2], timeout=10)
        ok = await q.submit([5], timeout=10)
        await q.close()
        return ok

    assert _run(main()) == [50]


def test_close_answers_everything_queued_then_refuses():
    rec = _Recorder(delay=0.02)

    async def main():
        q = BatchQueue(rec, max_batch_size=2, max_wait_s=0.0, max_queue=100)
        q.start()
        pending = [asyncio.create_task(q.submit([i], timeout=10)) for i in range(7)]
        await asyncio.sleep(0)
        await q.close()
        results = await asyncio.gather(*pending)
        with pytest.raises(QueueFull):
            await q.submit([99], timeout=1)
        return results

    assert _run(main()) == [[i * 10] for i in range(7)]


# --- input parsing -----------------------------------------------------------------------------


def _task(kind: str, labels=("Safe", "Unsafe"), options=None) -> Task:
    ex = DecisionExample(id="0", labels=labels, label=labels[0], input="x" if options is None else None,
                         question="q" if options is not None else None, options=options)
    return Task(name="t", split="all", examples=(ex,), template=DEFAULT_TEMPLATES[kind])


def test_parse_classification_strings_and_objects():
    d = Decider(_task("classification"), engine=None, model_name="m")
    exs = d.parse(["hello", {"input": "bye", "id": 7}])
    assert [e.input for e in exs] == ["hello", "bye"]
    assert [e.id for e in exs] == ["0", "7"]
    assert all(e.labels == ("Safe", "Unsafe") for e in exs)


@pytest.mark.parametrize(
    "raw, param",
    [
        ("hello", "inputs"),
        ([], "inputs"),
        ([1], "inputs[0]"),
        (["ok", None], "inputs[1]"),
        (["   "], "inputs[0]"),
        ([{"input": "a", "question": "b"}], "inputs[0].question"),
        ([{"id": "a"}], "inputs[0].input"),
        ([{"input": ["a"]}], "inputs[0].input"),
        ([{"input": "a", "id": [1]}], "inputs[0].id"),
        ([{"input": "a", "id": True}], "inputs[0].id"),
        (["\ud800"], "inputs[0]"),
        (["a"] * 5, "inputs"),
    ],
)
def test_parse_errors_name_field_and_index(raw, param):
    d = Decider(_task("classification"), engine=None, model_name="m")
    with pytest.raises(InputError) as info:
        d.parse(raw, max_inputs=4)
    assert info.value.param == param


def test_parse_multiple_choice_needs_objects_with_one_option_per_label():
    d = Decider(_task("multiple_choice", labels=("A", "B", "C"), options=("x", "y", "z")), engine=None, model_name="m")
    (ex,) = d.parse([{"question": "Which?", "options": ["1", "2", "3"]}])
    assert ex.options == ("1", "2", "3") and ex.question == "Which?"
    for raw, param in [
        (["Which?"], "inputs[0]"),
        ([{"question": "Which?", "options": ["1", "2"]}], "inputs[0].options"),
        ([{"question": "Which?", "options": ["1", 2, "3"]}], "inputs[0].options[1]"),
        ([{"question": "Which?"}], "inputs[0].options"),
        ([{"options": ["1", "2", "3"]}], "inputs[0].question"),
        ([{"question": "Which?", "options": "1,2,3"}], "inputs[0].options"),
    ]:
        with pytest.raises(InputError) as info:
            d.parse(raw)
        assert info.value.param == param, raw


# --- moderation pieces -------------------------------------------------------------------------


def test_parse_moderation_forms():
    assert parse_moderation({"input": "a"}) == ["a"]
    assert parse_moderation({"input": ["a", "b"], "model": "omni-moderation-latest"}) == ["a", "b"]
    assert parse_moderation({"input": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == ["a\nb"]
    for body, param in [
        ({}, "input"),
        ({"input": 3}, "input"),
        ({"input": ["a", 3]}, "input[1]"),
        ({"input": ["a", {"type": "text", "text": "b"}]}, "input[1]"),
        ({"input": [{"type": "image_url", "image_url": {"url": "x"}}]}, "input[0].type"),
        ({"input": [{"type": "text", "text": 3}]}, "input[0].text"),
        ({"input": "a", "model": 4}, "model"),
        ({"input": "a", "temperature": 0}, "temperature"),
    ]:
        with pytest.raises(InputError) as info:
            parse_moderation(body)
        assert info.value.param == param, body


def test_unsafe_label_and_openai_categories():
    assert unsafe_label_of(("Safe", "Unsafe")) == "Unsafe"
    assert unsafe_label_of(("safe", "UNSAFE")) == "UNSAFE"
    assert unsafe_label_of(("allow", "block")) is None
    assert unsafe_label_of(("allow", "block"), "block") == "block"
    assert unsafe_label_of(("A", "B", "C")) is None
    with pytest.raises(ValueError, match="unsafe-label"):
        unsafe_label_of(("A", "B", "C"), "A")
    assert len(OPENAI_CATEGORIES) == len(set(OPENAI_CATEGORIES)) == 13


# --- threshold, calibrator, bind ---------------------------------------------------------------


def test_threshold_defer_matches_apply_threshold():
    from decal.selective import apply_threshold

    rng = np.random.default_rng(0)
    conf = np.concatenate([rng.uniform(size=200), [0.0, 0.5, 1.0, 0.7]])
    correct = rng.uniform(size=conf.size) < 0.5
    for t in (0.0, 0.5, 0.7, 1.0, None):
        info = ThresholdInfo(value=t, source="value")
        accepted = sum(not info.defers(float(c)) for c in conf)
        assert accepted == apply_threshold(conf, correct, t).n_accepted


def test_load_threshold_value_and_file(tmp_path):
    assert load_threshold("0.7").value == 0.7
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError):
            load_threshold(bad)
    with pytest.raises(FileNotFoundError):
        load_threshold(str(tmp_path / "missing.json"))
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"choice": {"threshold": 0.83, "target_accuracy": 0.9, "delta": 0.05, "coverage": 0.4}}))
    info = load_threshold(str(good))
    assert (info.value, info.target_accuracy, info.delta, info.coverage) == (0.83, 0.9, 0.05, 0.4)
    assert len(info.sha256) == 64
    none = tmp_path / "none.json"
    none.write_text(json.dumps({"choice": {"threshold": None, "target_accuracy": 0.99, "delta": 0.05}}))
    assert load_threshold(str(none)).defers(1.0)  # no threshold reached the target: defer everything
    for name, body, field in [
        ("a.json", {"x": 1}, "choice"),
        ("b.json", {"choice": {}}, "choice.threshold"),
        ("c.json", {"choice": {"threshold": "high"}}, "choice.threshold"),
        ("d.json", {"choice": {"threshold": 2}}, "choice.threshold"),
    ]:
        (tmp_path / name).write_text(json.dumps(body))
        with pytest.raises(DataError, match=f"field '{field}'"):
            load_threshold(str(tmp_path / name))


def test_bind_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    check_bind("127.0.0.1", api_key=None, insecure=False)
    check_bind("0.0.0.0", api_key="k", insecure=False)
    check_bind("0.0.0.0", api_key=None, insecure=True)
    with pytest.raises(ConfigError, match="--api-key"):
        check_bind("0.0.0.0", api_key=None, insecure=False)


def test_config_rejects_bad_limits():
    ServeConfig(model="m", task="t")
    for kwargs in ({"max_batch_size": 0}, {"max_queue": 4, "max_inputs": 8}, {"max_wait_ms": -1},
                   {"request_timeout_s": 0}, {"engine": "tgi"}, {"api_key": " "}, {"port": 70000}):
        with pytest.raises(ConfigError):
            ServeConfig(model="m", task="t", **kwargs)


# --- the decider against decal.evaluation, in process (tiny Qwen3, real tokenizer) --------------


def _safety_task(n: int) -> Task:
    words = ["kill", "process", "bake", "a", "cake", "hurt", "someone", "python", "the", "how", "do", "I"]
    rng = np.random.default_rng(1)
    examples = tuple(
        DecisionExample(id=f"e{i}", labels=("Safe", "Unsafe"), label=("Safe", "Unsafe")[i % 2],
                        input=" ".join(rng.choice(words, size=1 + (i * 7) % 23)))
        for i in range(n)
    )
    return Task(name="safety", split="all", examples=examples, template=DEFAULT_TEMPLATES["classification"])


@pytest.mark.slow
@pytest.mark.parametrize("reasoning", [False, True])
def test_decider_equals_evaluate_whatever_the_batch(tmp_path, tiny_qwen3, qwen3_tokenizer, reasoning):
    from dataclasses import replace

    from decal.evaluation import evaluate
    from decal.records import read_records
    from decal.engines import as_engine

    task = replace(_safety_task(12), reasoning=reasoning)
    evaluate(tiny_qwen3, qwen3_tokenizer, task, out_dir=tmp_path, model_name="tiny", batch_size=4, max_new_tokens=6,
             progress=False)
    expected = {r.id: r for r in read_records(tmp_path)}
    decider = Decider(task, as_engine(tiny_qwen3, qwen3_tokenizer), model_name="tiny", max_new_tokens=6)
    prepared = decider.prepare(task.examples)
    rng = np.random.default_rng(0)
    for sizes in ([1] * 12, [12], [5, 7], [3, 1, 8]):  # whatever the batch composition
        order = rng.permutation(12)
        start = 0
        for size in sizes:
            batch = [prepared[i] for i in order[start : start + size]]
            start += size
            for p, a in zip(batch, decider.decide(batch), strict=True):
                want = expected[p.example.id]
                assert a.record.prediction == want.prediction and a.record.valid == want.valid
                assert a.record.emitted_token == want.emitted_token and a.record.completion == want.completion
                assert_logprobs_close(a.record.option_probs, want.option_probs, atol=LOGPROB_ATOL_TINY)
                assert_logprobs_close([a.record.confidence], [want.confidence], atol=LOGPROB_ATOL_TINY)
                assert a.calibrated.confidence == a.record.confidence and not a.defer


@pytest.mark.slow
def test_shared_prefix_cache_scores_as_the_plain_engine(tiny_qwen3, qwen3_tokenizer):
    from decal.engines import as_engine
    from decal.scoring import encode_prompts
    from decal.serve.prefix import PrefixCachedModel, SharedPrefix, with_shared_prefix
    from decal.tasks.prompts import render_chat

    plain = as_engine(tiny_qwen3, qwen3_tokenizer)
    mc = Task(name="mc", split="all", template=DEFAULT_TEMPLATES["multiple_choice"], examples=tuple(
        DecisionExample(id=str(i), labels=("A", "B", "C"), label="A", question=" ".join(["why"] * (1 + 3 * i)) + "?",
                        options=(f"x{i}", "y y", "z")) for i in range(6)))
    for task in (_safety_task(10), mc):
        cached = with_shared_prefix(plain, task)
        assert isinstance(cached.model, PrefixCachedModel) and cached.shared_prefix_tokens >= 8
        d_plain = Decider(task, plain, model_name="tiny")
        d_cached = Decider(task, cached, model_name="tiny")
        prepared = d_plain.prepare(task.examples)
        for batch in (prepared, prepared[:1], prepared[2:5]):  # mixed lengths, padding in the middle
            for a, b in zip(d_cached.decide(batch), d_plain.decide(batch), strict=True):
                assert a.record.prediction == b.record.prediction and a.record.top_token == b.record.top_token
                assert_logprobs_close(a.record.option_probs, b.record.option_probs, atol=LOGPROB_ATOL_TINY)
        assert cached.model.hits == 4 and cached.model.misses == 0  # 1 check + 3 batches
    # a prompt without the prefix goes to the model unchanged
    foreign = encode_prompts(qwen3_tokenizer, [render_chat(qwen3_tokenizer, "Something else entirely.", reasoning=False)])
    prefix = SharedPrefix(tiny_qwen3, SharedPrefix.common_ids(qwen3_tokenizer, _safety_task(2)))
    wrapped = as_engine(PrefixCachedModel(tiny_qwen3, prefix), qwen3_tokenizer)
    dt = Decider(_safety_task(2), plain, model_name="tiny").prepare(_safety_task(2).examples[:1])[0].tokens
    a, b = wrapped.score(foreign, dt), plain.score(foreign, dt)
    assert a[0].option_probs == b[0].option_probs and wrapped.model.misses == 1
