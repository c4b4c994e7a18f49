"""The decision log as `decal serve` writes it: ids, rows, group commit on one thread, the monitor's feed.

- `ServingEpoch` is what answers a batch: the calibrator, the threshold and the settings an epoch
  row of the store holds (`epoch_settings`), with the identities every row records.
- `DecisionLog.record` gives each answer a new id (a random UUID: unique across restarts and
  replicas), writes the rows of every request waiting at that moment in one transaction (group
  commit, on one writer thread, so the event loop never waits on the disk), feeds the monitor,
  and returns the ids only when the rows are durable; the handler answers after that.
- `DecisionLog.feedback` joins labels to ids in one transaction; `parse_feedback` checks the
  request and `feedback_results` turns the outcomes into per-item statuses (200, 404, 409, 422).
- `feedback_records` turns the labelled decisions back into prediction records, for
  `decal calibrate --fit-feedback`.
- A lock on ``STATE_DIR/serve.lock`` keeps a second server off the same state dir.

Without `--state-dir` there is no log: answers still get ids (`new_id`), nothing is stored, and
feedback and the monitor are unavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .decider import InputError, json_type
from .monitor import Monitor
from .settings import CalibratorInfo, ThresholdInfo
from .store import DecisionRow, DecisionStore, Epoch, FeedbackOutcome

__all__ = ["ServingEpoch", "epoch_settings", "new_id", "input_fields", "decision_row", "DecisionLog",
           "feedback_records", "parse_feedback", "feedback_results", "MAX_FEEDBACK_ITEMS", "StateDirBusy"]

logger = logging.getLogger(__name__)

MAX_FEEDBACK_ITEMS = 1000
_INPUT_FIELDS = ("question", "options", "fact", "input")
_STATUS = {"added": 200, "duplicate": 200, "unknown_id": 404, "not_an_option": 422, "conflict": 409}
_ERROR_TYPE = {404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error"}


class StateDirBusy(ValueError):
    """Another `decal serve` holds the state dir."""


def new_id() -> str:
    """A decision id: ``dec-`` and 32 random hex digits."""
    return f"dec-{uuid.uuid4().hex}"


def epoch_settings(*, model: str, adapter: str | None, calibrator: CalibratorInfo | None, threshold: ThresholdInfo | None,
                   reference: dict | None, alarm_alpha: float, monitor_window: int, task: str | None = None) -> dict:
    """The JSON an epoch row holds: enough for `decal monitor` to redo the monitor without the files."""
    return {
        "model": model, "adapter": adapter, "task": task,
        "calibrator": None if calibrator is None else {**calibrator.to_dict(), "params": calibrator.calibrator.to_dict()},
        "threshold": None if threshold is None else threshold.to_dict(),
        "reference": reference, "alarm_alpha": float(alarm_alpha), "monitor_window": int(monitor_window),
    }


@dataclass(frozen=True)
class ServingEpoch:
    """The calibrator, threshold and settings that answer batches from `epoch.started` on."""

    epoch: Epoch
    calibrator: CalibratorInfo | None
    threshold: ThresholdInfo | None

    @property
    def id(self) -> int:
        return self.epoch.id

    @property
    def calibrator_id(self) -> str | None:
        return None if self.calibrator is None else self.calibrator.sha256

    @property
    def threshold_id(self) -> str | None:
        if self.threshold is None:
            return None
        return self.threshold.sha256 or f"value:{self.threshold.value!r}"


def input_fields(example) -> dict:
    """The fields of a served input the model saw, as JSON-ready values (no id)."""
    out = {}
    for key in _INPUT_FIELDS:
        value = getattr(example, key)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def decision_row(answer, epoch: ServingEpoch, example, *, decision_id: str, endpoint: str, now: float,
                 log_bodies: bool) -> DecisionRow:
    """The store row of one answer (`decal.serve.decider.Answer`)."""
    text = json.dumps(input_fields(example), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    record, settings = answer.record, epoch.epoch.settings
    return DecisionRow(
        id=decision_id, time=now, epoch=epoch.id, endpoint=endpoint,
        input_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), input=text if log_bodies else None,
        labels=list(record.labels), decision=record.prediction, option_probs=[float(p) for p in record.option_probs],
        confidence=float(record.confidence), calibrated_probs=[float(p) for p in answer.calibrated_probs],
        calibrated_confidence=float(answer.calibrated_confidence), label_mass=record.label_mass, defer=bool(answer.defer),
        valid=bool(record.valid), model=settings["model"], adapter=settings["adapter"],
        calibrator=epoch.calibrator_id, threshold=epoch.threshold_id,
    )


@dataclass(eq=False)
class _Job:
    kind: str  # "decisions" or "feedback"
    payload: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    result: Any = field(default=None)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the request gave up (deadline); the rows are stored all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _lock_state_dir(state_dir: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(state_dir / "serve.lock", "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StateDirBusy(f"--state-dir {state_dir}: another decal serve is using it (serve.lock is held)") from None
    return handle


class DecisionLog:
    """The server's decision log over a `DecisionStore`, feeding its `Monitor` (module docstring).

    Args:
        store: the open store; lock: the state dir's lock handle (released by `close`).
        log_bodies: store each input's text (else only its hash).
    """

    def __init__(self, store: DecisionStore, *, lock=None, log_bodies: bool = False):
        self.store, self.log_bodies = store, log_bodies
        self.monitor = Monitor()
        self._lockfile = lock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decal-log")
        self._lock = threading.Lock()
        self._pending: list[_Job] = []
        self._draining = False

    @classmethod
    def open(cls, state_dir: str | os.PathLike, *, log_bodies: bool = False) -> "DecisionLog":
        """Open (or create) the store under `state_dir` and lock it; fast, so bad state dirs fail at startup.

        Raises:
            StateDirBusy: another server holds the state dir.
            DataError, ValueError, NotADirectoryError: see `decal.serve.store.open_store`.
        """
        from .store import open_store

        store = open_store(state_dir)
        try:
            lock = _lock_state_dir(Path(state_dir))
        except StateDirBusy:
            store.close()
            raise
        return cls(store, lock=lock, log_bodies=log_bodies)

    def resume(self, settings: dict) -> Epoch:
        """Blocking: rebuild the monitor from the store, then continue its last epoch if it had
        these settings, else start a new one. Returns the epoch now served."""
        self.monitor.rebuild(self.store)
        normal = json.loads(json.dumps(settings, sort_keys=True, allow_nan=False))
        epochs = self.store.epochs()
        epoch = epochs[-1] if epochs and epochs[-1].settings == normal else self.store.add_epoch(normal, started=time.time())
        self.monitor.start_epoch(epoch)
        return epoch

    def new_epoch(self, settings: dict) -> Epoch:
        """Blocking (run it with `call`): record a new epoch and make it the monitor's current one."""
        epoch = self.store.add_epoch(settings, started=time.time())
        self.monitor.start_epoch(epoch)
        return epoch

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the writer thread, in order with the writes (e.g. starting an epoch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _submit(self, kind: str, payload: list):
        loop = asyncio.get_running_loop()
        job = _Job(kind, payload, loop.create_future(), loop)
        with self._lock:
            self._pending.append(job)
            start = not self._draining
            self._draining = True
        if start:
            self._executor.submit(self._drain)
        return await job.future

    async def record(self, answers: Sequence, epochs: Sequence[ServingEpoch], examples: Sequence, *, endpoint: str) -> list[str]:
        """Log one request's answers; returns their ids once the rows are durable.

        Raises:
            Exception: the store failed (the request must not be answered).
        """
        now = time.time()
        rows = [decision_row(a, e, ex, decision_id=new_id(), endpoint=endpoint, now=now, log_bodies=self.log_bodies)
                for a, e, ex in zip(answers, epochs, examples)]
        await self._submit("decisions", rows)
        return [r.id for r in rows]

    async def feedback(self, items: Sequence[tuple[str, str]]) -> list[FeedbackOutcome]:
        """Join (id, label) items to decisions; the outcomes are durable when this returns."""
        return await self._submit("feedback", list(items))

    def _drain(self) -> None:
        """Writer thread: write every waiting job (decisions in one transaction, then feedback in one)."""
        with self._lock:
            jobs, self._pending = self._pending, []
        decisions = [j for j in jobs if j.kind == "decisions"]
        labels = [j for j in jobs if j.kind == "feedback"]
        # Decisions first: a label can only name an id its client already received, whose row
        # was committed by an earlier drain.
        self._write(decisions, self._write_decisions)
        self._write(labels, self._write_feedback)
        with self._lock:
            if self._pending:
                self._executor.submit(self._drain)
            else:
                self._draining = False

    def _write(self, jobs: list[_Job], write: Callable[[list[_Job]], None]) -> None:
        if not jobs:
            return
        error = None
        try:
            write(jobs)
        except Exception as e:  # the store failed: these requests get 500, the server goes on
            logger.error("the decision log could not write %d requests: %s: %s", len(jobs), type(e).__name__, e)
            error = e
        for job in jobs:
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, job.result, error)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

    def _write_decisions(self, jobs: list[_Job]) -> None:
        rows = [row for job in jobs for row in job.payload]
        self.store.append(rows)
        self._feed(self.monitor.observe_decisions, rows)

    def _write_feedback(self, jobs: list[_Job]) -> None:
        outcomes = self.store.add_feedback([item for job in jobs for item in job.payload], time=time.time())
        start = 0
        for job in jobs:
            job.result, start = outcomes[start : start + len(job.payload)], start + len(job.payload)
        self._feed(self.monitor.observe_labels, [(o.decision, o.label) for o in outcomes if o.status == "added"])

    @staticmethod
    def _feed(observe, items) -> None:
        # The monitor is fed before the requests are answered, so /v1/monitor counts every
        # acknowledged item; a monitor failure is logged and never fails a stored request.
        try:
            observe(items)
        except Exception as e:
            logger.error("the monitor failed on %d items: %s: %s", len(items), type(e).__name__, e)

    def close(self) -> None:
        """Finish pending writes, close the store, release the state dir."""
        self._executor.shutdown(wait=True)
        self.store.close()
        if self._lockfile is not None:
            self._lockfile.close()


def feedback_records(state_dir: str | os.PathLike) -> tuple[list, dict]:
    """The labelled decisions of a decision log as prediction records, for refitting a calibrator.

    Only the decisions of the latest epoch's model and adapter count (the raw probabilities a
    calibrator maps belong to them; the calibrator and threshold that answered do not matter).
    Each record holds the raw option probabilities and confidence, the label as gold, and
    ``correct`` as the monitor counts it.

    Returns:
        (records, run metadata with a one-line ``summary`` of what was used and left out).

    Raises:
        FileNotFoundError: no decision log; ValueError: no labelled decision of that model.
    """
    from ..records import PredictionRecord
    from .store import open_store

    store = open_store(state_dir, create=False)
    try:
        epochs = store.epochs()
        labelled = list(store.feedback())
    finally:
        store.close()
    if not epochs:
        raise ValueError(f"{state_dir}: the decision log has no epoch yet")
    latest = epochs[-1].settings
    model, adapter, task = latest.get("model"), latest.get("adapter"), latest.get("task") or "feedback"
    rows = [(fb, row) for fb, row in labelled if (row.model, row.adapter) == (model, adapter)]
    if not rows:
        raise ValueError(f"{state_dir}: no labelled decision of model {model!r} (adapter {adapter!r}); "
                         f"send labels to POST /v1/feedback first ({len(labelled)} labelled decisions of other models)")
    records = [
        PredictionRecord(id=row.id, task=task, split="feedback", label=fb.label, prediction=row.decision,
                         correct=row.is_correct(fb.label), valid=row.valid, confidence=row.confidence,
                         option_probs=list(row.option_probs), labels=list(row.labels), model=row.model, adapter=row.adapter,
                         extra={"decided_at": row.time, "labelled_at": fb.time, "epoch": row.epoch})
        for fb, row in rows
    ]
    left_out = len(labelled) - len(rows)
    summary = (f"feedback: {len(records)} labelled decisions of model {model}"
               + (f" (adapter {adapter})" if adapter else "")
               + (f"; {left_out} labelled decisions of other models left out" if left_out else ""))
    meta = {"task": task, "split": "feedback", "model": model, "adapter": adapter, "state_dir": str(state_dir),
            "n": len(records), "left_out": left_out, "summary": summary}
    return records, meta


def parse_feedback(body: dict) -> list[tuple[str, str] | InputError]:
    """The items of ``{"feedback": [{"id": ..., "label": ...}, ...]}``: (id, label), or an `InputError` per bad item.

    Raises:
        InputError: the request itself is malformed (no array, too many items, unknown field).
    """
    for key in body:
        if key != "feedback":
            raise InputError(key, "unknown field; the request takes feedback")
    if "feedback" not in body:
        raise InputError("feedback", "missing")
    items = body["feedback"]
    if not isinstance(items, list):
        raise InputError("feedback", f"must be an array of {{\"id\", \"label\"}} objects; got {json_type(items)}")
    if not items:
        raise InputError("feedback", "must hold at least one item")
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise InputError("feedback", f"holds {len(items)} items; at most {MAX_FEEDBACK_ITEMS} per request")
    return [_feedback_item(item, f"feedback[{i}]") for i, item in enumerate(items)]


def _feedback_item(item, param: str) -> tuple[str, str] | InputError:
    if not isinstance(item, dict):
        return InputError(param, f"must be an object {{\"id\", \"label\"}}; got {json_type(item)}")
    for key in item:
        if key not in ("id", "label"):
            return InputError(f"{param}.{key}", "unknown field; an item takes id and label")
    for key in ("id", "label"):
        if key not in item:
            return InputError(f"{param}.{key}", "missing")
        if not isinstance(item[key], str):
            return InputError(f"{param}.{key}", f"must be a string; got {json_type(item[key])}")
    return item["id"], item["label"]


def _error(status: int, message: str, param: str) -> dict:
    return {"message": message, "type": _ERROR_TYPE[status], "param": param, "code": status}


def feedback_results(parsed: Sequence, outcomes: Sequence[FeedbackOutcome]) -> list[dict]:
    """Per item, in request order: ``{"id", "label", "status"}`` plus ``result`` (200) or ``error``.

    `outcomes` are those of the well-formed items of `parsed`, in order.
    """
    results, done = [], iter(outcomes)
    for i, item in enumerate(parsed):
        param = f"feedback[{i}]"
        if isinstance(item, InputError):
            results.append({"id": None, "label": None, "status": 422, "error": _error(422, item.message, item.param)})
            continue
        outcome = next(done)
        status = _STATUS[outcome.status]
        entry = {"id": outcome.id, "label": outcome.label, "status": status}
        if status == 200:
            entry["result"] = outcome.status
        elif outcome.status == "unknown_id":
            entry["error"] = _error(404, f"no decision with id {outcome.id!r}", f"{param}.id")
        elif outcome.status == "not_an_option":
            entry["error"] = _error(422, f"{outcome.label!r} is not one of the decision's labels {outcome.decision.labels}",
                                    f"{param}.label")
        else:
            entry["error"] = _error(409, f"decision {outcome.id!r} already has the label {outcome.existing!r}; "
                                         "a label cannot be changed", f"{param}.label")
        results.append(entry)
    return results
