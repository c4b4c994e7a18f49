"""The HTTP layer of `decal serve`: a FastAPI app over a `Decider` and a `BatchQueue`.

Endpoints:

- ``POST /v1/decide`` ``{"inputs": [...]}`` -> per input the decision, ``option_probs`` (label ->
  probability), the label mass, raw and calibrated confidence, ``defer`` with the reasons and the
  guarantees that apply (`decal.serve.policy`), the option set with ``--conformal``, ``valid``
  (and ``reasoning`` in reasoning mode), plus the model, adapter, calibrator, threshold and
  conformal identities;
- ``POST /v1/moderations``: OpenAI's moderation schema (`decal.serve.moderation`), for two-label
  safety tasks;
- every answer of both carries a ``decision_id``; with `--state-dir` its row is in the decision log
  before the response is sent (`decal.serve.decision_log`);
- ``POST /v1/feedback`` ``{"feedback": [{"id", "label"}, ...]}`` joins labels to decision ids, with a
  status per item (200, 404 unknown id, 409 another label already given, 422 not an option);
- ``GET /v1/monitor``: the monitor's figures and alarms (`decal.serve.monitor`);
- ``POST /v1/admin/reload`` (and SIGHUP): load the calibrator and threshold again, or new ones,
  without a restart; batches already running finish under the old ones;
- ``GET /health`` (alive), ``GET /ready`` (model loaded and one warm-up decision made),
  ``GET /metrics`` (Prometheus), ``GET /v1/info`` (settings; never the API key).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 401 (missing or
wrong bearer token, compared in constant time; /health and /ready need none), 404, 405, 413 (body
over the limit, by Content-Length or as it streams), 422 (malformed JSON, missing field, wrong
type, too many inputs, an input past the model's context; ``param`` names the field and index),
503 with Retry-After (queue full, not ready, shutting down), 504 (past the deadline: the server's
`--request-timeout`, or a shorter ``X-Request-Timeout`` header in seconds), 500 (a failed batch;
other requests are unaffected). Request bodies are never logged unless `log_bodies`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import signal
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

from starlette.requests import Request

from .batching import BatchQueue, DeadlineExceeded, QueueFull
from .decider import Decider, InputError, json_type
from .decision_log import DecisionLog, ServingEpoch, feedback_results, new_id, parse_feedback
from .metrics import ServeMetrics
from .moderation import moderation_response, parse_moderation
from .settings import ServeConfig, load_served_calibrator, load_threshold
from .store import Epoch

__all__ = ["ServerState", "create_app", "error_body"]

logger = logging.getLogger(__name__)

_OPEN_PATHS = ("/health", "/ready")  # load balancers probe these without a key
_ENDPOINTS = ("/v1/decide", "/v1/moderations", "/v1/feedback", "/v1/monitor", "/v1/admin/reload", "/v1/info", "/health",
              "/ready", "/metrics")
_ERROR_TYPES = {
    401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error", 503: "overloaded_error",
    504: "timeout_error",
}
_PREPARE_INLINE = 8  # inputs tokenized on the event loop; more go to a thread


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


class _BodyTooLarge(Exception):
    pass


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "param": param, "code": status}}


class ServerState:
    """What the app shares across requests: settings, metrics, the decider once loaded, the queue.

    Args:
        config: the `ServeConfig`.
        loader: blocking; returns a warmed-up `Decider` (run on a thread after the server starts).
        info: the static part of GET /v1/info (model, task, calibrator and threshold identities).
        unsafe_label: the label /v1/moderations flags; None disables the endpoint (404).
        log: the open decision log (`--state-dir`), resumed after the model loads; None: no log.
        epoch_settings: (calibrator, threshold) -> the settings an epoch records (the server's
            reference window under that calibrator); None: model and adapter only.
    """

    def __init__(self, config: ServeConfig, *, loader: Callable[[], Decider], info: dict, unsafe_label: str | None,
                 log: DecisionLog | None = None, epoch_settings: Callable[[object, object], dict] | None = None):
        self.config, self.loader, self.info, self.unsafe_label = config, loader, info, unsafe_label
        self.log, self.epoch_settings = log, epoch_settings or (lambda c, t: {"model": config.model, "adapter": config.adapter})
        self.decider: Decider | None = None
        self.epoch: ServingEpoch | None = None  # what answers the next batch (swapped on the engine thread)
        self.sources = {"calibrator": config.calibrator, "threshold": config.threshold}  # what a reload reads again
        self.reload_lock = asyncio.Lock()
        self.load_error: str | None = None
        self.queue: BatchQueue | None = None
        self.metrics = ServeMetrics(queue_depth=lambda: self.queue.depth if self.queue else 0)
        if log is not None:
            from .monitor import MonitorCollector

            self.metrics.registry.register(MonitorCollector(lambda: self.log.monitor if self.ready else None))
        self.on_fatal: Callable[[], None] | None = None  # the server sets it: stop after a failed load
        self.accepted = self.answered = 0

    @property
    def ready(self) -> bool:
        return self.decider is not None


def _api_key_digest(key: str | None) -> bytes | None:
    return None if key is None else hashlib.sha256(key.encode()).digest()


class _Guard:
    """Pure ASGI middleware: counts and times every request, checks the bearer token and body size."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.key_digest = _api_key_digest(state.config.api_key)
        self.max_body = state.config.max_body_bytes

    def _authorized(self, headers: dict) -> bool:
        if self.key_digest is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # Digests have one length, so compare_digest's time depends on neither the key nor its length.
        given = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(given, self.key_digest) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.perf_counter(), self.state
        path = scope["path"]
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        state.accepted += 1
        try:
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"0")
            if path not in _OPEN_PATHS and not self._authorized(headers):
                await _send_json(send_counted, 401, error_body(401, "missing or wrong API key; send 'Authorization: Bearer KEY'"),
                                 {"www-authenticate": "Bearer"})
            elif length.isdigit() and int(length) > self.max_body:
                message = f"request body of {int(length)} bytes exceeds the limit of {self.max_body}"
                await _send_json(send_counted, 413, error_body(413, message))
            else:
                await self.app(scope, self._limited(receive), send_counted)
        finally:
            state.answered += 1
            endpoint = path if path in _ENDPOINTS else "other"
            state.metrics.observe_request(endpoint, status[0], time.perf_counter() - start)

    def _limited(self, receive):
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge()
            return message

        return limited


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _json_response(status: int, body: Any, headers: dict | None = None):
    from fastapi.responses import Response

    # allow_nan=False: a non-finite number must never reach a client as invalid JSON.
    return Response(json.dumps(body, allow_nan=False), status_code=status, headers=headers, media_type="application/json")


def _error_response(e: _HTTPError):
    return _json_response(e.status, error_body(e.status, e.message, e.param), e.headers)


async def _read_json(request, state: ServerState, *, allow_empty: bool = False) -> dict:
    try:
        raw = await request.body()
    except _BodyTooLarge:
        raise _HTTPError(413, f"request body exceeds the limit of {state.config.max_body_bytes} bytes") from None
    if state.config.log_bodies:
        logger.info("%s %s body: %s", request.method, request.url.path, raw.decode("utf-8", errors="replace"))
    if not raw.strip():
        if allow_empty:
            return {}
        raise _HTTPError(422, "empty body; send a JSON object", param="body")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _HTTPError(422, "invalid JSON: nested too deeply", param="body") from None
    except UnicodeDecodeError as e:
        raise _HTTPError(422, f"body is not UTF-8 text ({e.reason} at byte {e.start})", param="body") from None
    except json.JSONDecodeError as e:
        raise _HTTPError(422, f"invalid JSON: {e.msg} (line {e.lineno} column {e.colno})", param="body") from None
    if not isinstance(body, dict):
        raise _HTTPError(422, f"must be a JSON object; got {json_type(body)}", param="body")
    return body


def _timeout(request, state: ServerState) -> float:
    limit = state.config.request_timeout_s
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return limit
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise _HTTPError(422, f"must be a number of seconds > 0; got {raw!r}", param="X-Request-Timeout")
    return min(value, limit)


def _decider(state: ServerState) -> Decider:
    if state.decider is None:
        why = "the model failed to load" if state.load_error else "the model is loading"
        raise _HTTPError(503, f"not ready: {why}; retry later", headers={"Retry-After": "5"})
    return state.decider


def _run_batch(state: ServerState, batch) -> list:
    """The queue's batch function (engine thread): answers, each with the epoch that gave it.

    A reload swaps the calibrator, threshold and epoch on this thread between batches, so one
    batch is answered and labelled under one epoch.
    """
    epoch = state.epoch
    return [(answer, epoch) for answer in state.decider.decide(batch)]


async def _decide(state: ServerState, raw_inputs, *, param: str, deadline: float, endpoint: str):
    """Parse, prepare, score, then log: (decider, answers, their epochs, their decision ids)."""
    decider = _decider(state)
    examples = decider.parse(raw_inputs, param=param, max_inputs=state.config.max_inputs)
    if len(examples) <= _PREPARE_INLINE:
        prepared = decider.prepare(examples, param=param)
    else:
        prepared = await asyncio.to_thread(decider.prepare, examples, param=param)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before scoring")
    answered = await state.queue.submit(prepared, timeout=remaining)
    answers, epochs = [a for a, _ in answered], [e for _, e in answered]
    if state.log is None:
        ids = [new_id() for _ in answers]
    else:
        try:
            ids = await state.log.record(answers, epochs, examples, endpoint=endpoint)
        except Exception as e:  # durable before answered: no row, no answer
            raise _HTTPError(500, f"the decision log could not store the answers ({type(e).__name__}); they were not given") from e
    state.metrics.observe_answers(answers)
    return decider, answers, epochs, ids


def _identities(state: ServerState, epoch: ServingEpoch | None) -> dict:
    keys = ("model", "adapter", "engine", "task", "labels", "mode", "prompt_version")
    out = {k: state.info.get(k) for k in keys}
    # The conformal sets and the label-mass floor are fixed for the server's life; a reload swaps
    # the calibrator and threshold (`decal.serve.policy`).
    fixed = {"conformal": state.info.get("conformal"), "min_label_mass": state.info.get("min_label_mass")}
    if epoch is None:
        return {**out, "calibrator": state.info.get("calibrator"), "threshold": state.info.get("threshold"), **fixed, "epoch": None}
    calibrator, threshold = epoch.calibrator, epoch.threshold
    return {**out, "calibrator": calibrator.to_dict() if calibrator else None,
            "threshold": threshold.to_dict() if threshold else None, **fixed, "epoch": epoch.id}


def _route(state: ServerState, handler):
    """Wrap a handler: every failure becomes one JSON error; nothing escapes to the server."""

    async def endpoint(request: Request):
        try:
            deadline = time.monotonic() + _timeout(request, state)
            return await handler(request, deadline)
        except _HTTPError as e:
            return _error_response(e)
        except InputError as e:
            return _error_response(_HTTPError(422, e.message, param=e.param))
        except QueueFull as e:
            return _error_response(_HTTPError(503, str(e), headers={"Retry-After": str(e.retry_after)}))
        except DeadlineExceeded as e:
            return _error_response(_HTTPError(504, f"request timed out: {e}"))
        except Exception as e:  # a failed batch: answer 500, keep serving
            logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
            return _error_response(_HTTPError(500, f"internal error ({type(e).__name__}); the request was not scored"))

    return endpoint


def create_app(state: ServerState):
    """The FastAPI app; its lifespan starts the batching worker and loads the model on a thread."""
    from fastapi import FastAPI
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = state.config

    @asynccontextmanager
    async def lifespan(app):
        state.queue = BatchQueue(
            lambda batch: _run_batch(state, batch), max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000.0, max_queue=config.max_queue, on_batch=state.metrics.observe_batch,
        )
        state.queue.start()
        loading = asyncio.create_task(_load(state))
        hangup = _on_sighup(state)
        try:
            yield
        finally:
            await state.queue.close()
            if not loading.done():
                loading.cancel()
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if state.decider is not None:
                state.decider.engine.close()  # vLLM: stop its engine processes
            if state.log is not None:
                state.log.close()  # after the queue: every answered request is logged
            logger.info("stopped: answered %d of %d requests", state.answered, state.accepted)

    app = FastAPI(title="decal serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 and 405 in the same shape as every other error
        message = {404: f"no such endpoint: {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return _json_response(exc.status_code, error_body(exc.status_code, message.get(exc.status_code, str(exc.detail))),
                              getattr(exc, "headers", None))

    @app.get("/health")
    async def health():
        return _json_response(200, {"status": "ok"})

    @app.get("/ready")
    async def ready():
        if state.ready:
            return _json_response(200, {"ready": True})
        reason = f"failed to load: {state.load_error}" if state.load_error else "loading"
        return _json_response(503, {"ready": False, "reason": reason}, {"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/info")
    async def info():
        limits = {k: getattr(config, k) for k in ("max_batch_size", "max_wait_ms", "max_queue", "max_inputs",
                                                   "max_body_bytes", "request_timeout_s")}
        engine = _engine_info(state.decider.engine) if state.decider is not None else {}
        current = _identities(state, state.epoch)
        return _json_response(200, {**state.info, **engine, "calibrator": current["calibrator"], "threshold": current["threshold"],
                                    "epoch": current["epoch"], "state_dir": config.state_dir, "ready": state.ready,
                                    "limits": limits, "moderation": state.unsafe_label is not None,
                                    "unsafe_label": state.unsafe_label})

    async def decide(request: Request, deadline: float):
        body = await _read_json(request, state)
        for key in body:
            if key != "inputs":
                raise InputError(key, "unknown field; the request takes inputs")
        if "inputs" not in body:
            raise InputError("inputs", "missing")
        decider, answers, epochs, ids = await _decide(state, body["inputs"], param="inputs", deadline=deadline,
                                                       endpoint="/v1/decide")
        results = [{**a.to_dict(reasoning=decider.reasoning), "decision_id": i} for a, i in zip(answers, ids)]
        return _json_response(200, {**_identities(state, epochs[0]), "results": results})

    async def moderations(request: Request, deadline: float):
        if state.unsafe_label is None:
            raise _HTTPError(404, "/v1/moderations needs a two-label safety task (labels such as Safe/Unsafe, or --unsafe-label)")
        body = await _read_json(request, state)
        texts = parse_moderation(body)
        _, answers, _, ids = await _decide(state, texts, param="input", deadline=deadline, endpoint="/v1/moderations")
        return _json_response(200, moderation_response(answers, model=state.info["model"], unsafe_label=state.unsafe_label,
                                                       decision_ids=ids))

    app.add_api_route("/v1/decide", _route(state, decide), methods=["POST"])
    app.add_api_route("/v1/moderations", _route(state, moderations), methods=["POST"])
    _add_log_routes(app, state)
    return _Guard(app, state)


def _add_log_routes(app, state: ServerState) -> None:
    """POST /v1/feedback, GET /v1/monitor, POST /v1/admin/reload."""

    async def monitor(request: Request, deadline: float):
        return _json_response(200, {"state_dir": state.config.state_dir, **_log(state).monitor.snapshot()})

    async def feedback(request: Request, deadline: float):
        log = _log(state)
        parsed = parse_feedback(await _read_json(request, state))
        items = [p for p in parsed if not isinstance(p, InputError)]
        results = feedback_results(parsed, await log.feedback(items) if items else [])
        counts = {"added": sum(r.get("result") == "added" for r in results),
                  "duplicate": sum(r.get("result") == "duplicate" for r in results),
                  "errors": sum(r["status"] != 200 for r in results)}
        return _json_response(200, {"results": results, "counts": counts})

    async def reload(request: Request, deadline: float):
        body = await _read_json(request, state, allow_empty=True)
        changes = {}
        for key, value in body.items():
            if key not in ("calibrator", "threshold"):
                raise InputError(key, "unknown field; a reload takes calibrator and threshold (paths; null for none)")
            if value is not None and not isinstance(value, str):
                raise InputError(key, f"must be a path (or a value, for threshold) or null; got {json_type(value)}")
            changes[key] = value
        return _json_response(200, await _reload(state, changes, source="POST /v1/admin/reload"))

    app.add_api_route("/v1/feedback", _route(state, feedback), methods=["POST"])
    app.add_api_route("/v1/admin/reload", _route(state, reload), methods=["POST"])
    app.add_api_route("/v1/monitor", _route(state, monitor), methods=["GET"])


def _log(state: ServerState) -> DecisionLog:
    if state.log is None:
        raise _HTTPError(404, "the decision log is off: start decal serve with --state-dir DIR for feedback and the monitor")
    _decider(state)  # the log is resumed while the model loads: 503 until then
    return state.log


async def _reload(state: ServerState, changes: dict, *, source: str) -> dict:
    """Load the calibrator and threshold (`changes` names new ones), start an epoch, swap between batches.

    Raises:
        _HTTPError: 422 for a file that cannot be loaded; the old calibrator and threshold stay.
    """
    decider = _decider(state)
    async with state.reload_lock:
        sources = {**state.sources, **changes}
        try:
            calibrator, threshold = await asyncio.to_thread(
                lambda: (load_served_calibrator(sources["calibrator"]) if sources["calibrator"] else None,
                         load_threshold(sources["threshold"]) if sources["threshold"] is not None else None))
            decider.policy.check_fits(threshold, calibrated=calibrator is not None)  # labels and scale
            settings = await asyncio.to_thread(state.epoch_settings, calibrator, threshold)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise _HTTPError(422, f"reload failed, still serving epoch {state.epoch.id}: {' '.join(str(e).split())}") from e
        if state.log is not None:
            epoch = await state.log.call(lambda: state.log.new_epoch(settings))
        else:
            epoch = Epoch(state.epoch.id + 1, time.time(), settings)
        serving = ServingEpoch(epoch, calibrator, threshold)

        def swap() -> None:  # on the engine thread, between batches
            decider.calibrator, decider.threshold, state.epoch = calibrator, threshold, serving

        await state.queue.run_exclusive(swap)
        state.sources = sources
    identities = _identities(state, serving)
    logger.info("reloaded (%s): epoch %d, calibrator %s, threshold %s", source, epoch.id,
                (identities["calibrator"] or {}).get("sha256"), (identities["threshold"] or {}).get("value"))
    return {"epoch": epoch.id, "calibrator": identities["calibrator"], "threshold": identities["threshold"]}


def _on_sighup(state: ServerState) -> bool:
    """SIGHUP reloads the calibrator and threshold files (main thread only; False where not installed)."""
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        try:
            await _reload(state, {}, source="SIGHUP")
        except _HTTPError as e:
            logger.error("error: %s", e.message)

    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # not the main thread, or no SIGHUP
        return False
    return True


def _engine_info(engine) -> dict:
    return {**engine.info(), "shared_prefix_tokens": getattr(engine, "shared_prefix_tokens", 0)}


async def _load(state: ServerState) -> None:
    from .engine import batching_defaults

    try:
        decider = await asyncio.to_thread(state.loader)
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {' '.join(str(e).split())}"
        logger.error("error: the model failed to load: %s", state.load_error)
        if state.on_fatal is not None:
            state.on_fatal()
        return
    config, engine = state.config, decider.engine
    state.queue.max_batch_size, state.queue.max_wait_s = batching_defaults(
        engine.name, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
        call_size=engine.call_size(config.max_batch_size),
    )
    settings = state.epoch_settings(decider.calibrator, decider.threshold)
    try:
        epoch = await asyncio.to_thread(state.log.resume, settings) if state.log else Epoch(1, time.time(), settings)
    except Exception as e:
        state.load_error = f"the decision log could not be resumed: {type(e).__name__}: {' '.join(str(e).split())}"
        logger.error("error: %s", state.load_error)
        if state.on_fatal is not None:
            state.on_fatal()
        return
    state.epoch = ServingEpoch(epoch, decider.calibrator, decider.threshold)
    state.decider = decider
    state.metrics.ready.set(1)
    logger.info("ready")
