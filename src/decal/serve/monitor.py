"""The monitor of `decal serve`: rolling figures, the label-free accuracy estimate and the two alarms.

Fed by the decision log (`decal.serve.decision_log`) in the order rows are committed, and rebuilt
from the store after a restart (`Monitor.rebuild`), it reports on ``GET /v1/monitor``, as
Prometheus gauges (`MonitorCollector`) and over time in `decal monitor` (`monitor_history`). The
vocabulary is NannyML's and Evidently's: the *reference window* is the calibration run, the
*analysis window* the last `window` decisions (and the last `window` labels), an *alert* an
alarm that fired.

Per epoch (one calibrator, threshold and reference window; `decal.serve.store.Epoch`):

- over all decisions of the analysis window: the deferral rate, the mean calibrated confidence,
  the mean label mass, and the **label-free accuracy estimate**: the mean calibrated confidence
  of the answered decisions, which is their expected accuracy when the calibrator holds (NannyML's
  confidence-based performance estimation); it needs no label, and it is shown beside the
  measured accuracy once labels arrive;
- over the labelled decisions of the window: the accuracy of answered decisions against the
  threshold's promise, the ECE and the Brier score of the calibrated probabilities
  (`decal.metrics`);
- the guarantee alarm on every labelled answered decision, and the drift alarm on every decision's
  calibrated confidence and label mass against the reference window (`decal.serve.alarms`).
  Their tie-breakers come from a hash of the decision id, so a replay gives the same values.

Feedback for a decision of an earlier epoch counts for that epoch. Totals (``decisions``,
``labelled``) run over the whole log.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np

from .alarms import DriftAlarm, GuaranteeAlarm
from .store import DecisionRow, DecisionStore, Epoch

__all__ = ["DRIFT_SCORES", "EpochMonitor", "Monitor", "MonitorCollector", "ReferenceRun", "monitor_history", "theta"]

DRIFT_SCORES = ("confidence", "label_mass")


def theta(decision_id: str, score: str) -> float:
    """The tie-breaker in [0, 1) of one decision's conformal p-value: a hash of its (random) id."""
    digest = hashlib.blake2b(f"{score}:{decision_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _raw(record):
    """The record before any post-hoc calibration (a calibrated record keeps its raw fields beside
    the calibrated ones, `decal.records`; those of earlier releases are read back that way)."""
    if record.calibrated_probs is None:
        return record
    return replace(record, calibrated_probs=None, calibrated_confidence=None,
                   extra={k: v for k, v in (record.extra or {}).items() if k != "calibrator"})


@dataclass(frozen=True)
class ReferenceRun:
    """The reference window's run: its records as they were before any post-hoc calibration.

    `window(calibrator)` applies the served calibrator to them, so reference and served scores
    are computed alike, however the run itself was calibrated.
    """

    source: str
    sha256: str
    records: tuple

    @classmethod
    def read(cls, run_dir) -> "ReferenceRun":
        """Read a run folder (or its predictions.jsonl); errors name the file and line."""
        from pathlib import Path

        from ..records import read_records
        from .settings import file_sha256

        path = Path(run_dir)
        file = path / "predictions.jsonl" if path.is_dir() else path
        return cls(str(path), file_sha256(file) if file.is_file() else "", tuple(_raw(r) for r in read_records(path)))

    def window(self, calibrator=None) -> dict:
        """``{"source", "sha256", "n", "confidence": [...], "label_mass": [...]}`` (JSON-ready) under `calibrator`."""
        from ..calibrators import apply_calibrator
        from ..records import records_to_arrays

        served = apply_calibrator(calibrator, self.records) if calibrator is not None else self.records
        return {"source": self.source, "sha256": self.sha256, "n": len(self.records),
                "confidence": [float(r.confidence if r.calibrated_confidence is None else r.calibrated_confidence) for r in served],
                "label_mass": records_to_arrays(list(self.records)).label_mass.tolist()}


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


class EpochMonitor:
    """The figures and alarms of one epoch (module docstring); not thread-safe (`Monitor` locks)."""

    def __init__(self, epoch: Epoch):
        s = epoch.settings
        self.epoch = epoch
        self.window = int(s.get("monitor_window", 500))
        alpha = float(s.get("alarm_alpha", 0.05))
        threshold = s.get("threshold") or {}
        self.target = threshold.get("target_accuracy")
        self.guarantee = GuaranteeAlarm(self.target, alpha=alpha) if self.target else None
        reference = s.get("reference")
        self.drift = DriftAlarm({k: (reference[k] if reference else []) for k in DRIFT_SCORES}, alpha=alpha)
        self.decision_window: deque = deque(maxlen=self.window)  # (calibrated confidence, label mass, defer)
        self.label_window: deque = deque(maxlen=self.window)  # (confidence, probs, label index, correct, answered)
        self.n_decisions = self.n_answered = self.n_labelled = self.n_labelled_answered = 0

    def observe_decision(self, row: DecisionRow) -> None:
        self.n_decisions += 1
        self.n_answered += not row.defer
        self.decision_window.append((row.calibrated_confidence, row.label_mass, row.defer))
        self.drift.update({"confidence": row.calibrated_confidence, "label_mass": row.label_mass},
                          {k: theta(row.id, k) for k in DRIFT_SCORES})

    def observe_label(self, row: DecisionRow, label: str) -> None:
        correct = row.is_correct(label)
        self.n_labelled += 1
        self.label_window.append((row.calibrated_confidence, row.calibrated_probs, row.labels.index(label), correct, not row.defer))
        if not row.defer:
            self.n_labelled_answered += 1
            if self.guarantee is not None:
                self.guarantee.update(correct)

    def _analysis(self) -> dict:
        rows = list(self.decision_window)
        answered = [c for c, _, defer in rows if not defer]
        return {"decisions": len(rows), "deferral_rate": _mean([d for _, _, d in rows]),
                "mean_confidence": _mean([c for c, _, _ in rows]), "mean_label_mass": _mean([m for _, m, _ in rows]),
                "estimated_accuracy": _mean(answered)}

    def _labelled(self) -> dict:
        from ..metrics import brier, ece

        rows = list(self.label_window)
        answered = [correct for *_, correct, ans in rows if ans]
        out = {"labelled": len(rows), "answered": len(answered), "accuracy": _mean(answered),
               "expected_accuracy": _mean([c for c, *_, ans in rows if ans]), "ece": None, "brier": None}
        if rows:
            conf = np.array([r[0] for r in rows])
            out["ece"] = ece(conf, np.array([r[3] for r in rows]), n_bins=min(10, len(rows)))
            probs = np.array([r[1] for r in rows], dtype=np.float64)
            # Without a calibrator the "calibrated" probabilities are the raw full-vocabulary ones:
            # over the options they become class_probs as in `decal.records.records_to_arrays`.
            totals = probs.sum(axis=1, keepdims=True)
            class_probs = np.where(totals > 0, probs / np.where(totals > 0, totals, 1.0), 1.0 / probs.shape[1])
            out["brier"] = brier(class_probs, np.array([r[2] for r in rows]))
        return out

    def _reference(self) -> dict | None:
        ref = self.epoch.settings.get("reference")
        if not ref:
            return None
        return {"source": ref["source"], "sha256": ref["sha256"], "n": ref["n"],
                "mean_confidence": _mean(ref["confidence"]), "mean_label_mass": _mean(ref["label_mass"])}

    def snapshot(self) -> dict:
        s = self.epoch.settings
        threshold = s.get("threshold")
        promise = None if not self.target else {
            "target_accuracy": self.target, "delta": threshold.get("delta"), "threshold": threshold.get("value")}
        guarantee = self.guarantee.to_dict() if self.guarantee else {
            "alert": False, "disabled": "no promise to watch: --threshold is not a `decal threshold` file with a target accuracy"}
        drift = {**self.drift.to_dict(), "against": "reference window" if s.get("reference") else "the stream's own past"}
        return {
            "epoch": {"id": self.epoch.id, "started": self.epoch.started, "calibrator": s.get("calibrator"),
                      "threshold": threshold, "decisions": self.n_decisions, "answered": self.n_answered,
                      "labelled": self.n_labelled, "labelled_answered": self.n_labelled_answered},
            "promise": promise, "reference_window": self._reference(), "analysis_window": self._analysis(),
            "labelled_window": self._labelled(), "alarms": {"guarantee": guarantee, "drift": drift},
        }


class Monitor:
    """Every epoch's `EpochMonitor` and the totals; thread-safe (the log writer feeds it, requests read it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.epochs: dict[int, EpochMonitor] = {}
        self.current: int | None = None
        self.decisions = self.labelled = 0

    def start_epoch(self, epoch: Epoch) -> None:
        with self._lock:
            if epoch.id not in self.epochs:
                self.epochs[epoch.id] = EpochMonitor(epoch)
            self.current = epoch.id

    def observe_decisions(self, rows: Iterable[DecisionRow]) -> None:
        with self._lock:
            for row in rows:
                self.decisions += 1
                self.epochs[row.epoch].observe_decision(row)

    def observe_labels(self, labelled: Iterable[tuple[DecisionRow, str]]) -> None:
        with self._lock:
            for row, label in labelled:
                self.labelled += 1
                self.epochs[row.epoch].observe_label(row, label)

    def snapshot(self) -> dict:
        with self._lock:
            current = self.epochs[self.current].snapshot() if self.current is not None else {}
            return {"decisions": self.decisions, "labelled": self.labelled, **current}

    def rebuild(self, store: DecisionStore) -> "Monitor":
        """Refill this (empty) monitor from a store: the state the server had when it stopped.

        Decisions, then labels, each in their order: the two streams feed separate parts of the
        state, so the result equals feeding them interleaved as they arrived.
        """
        for epoch in store.epochs():
            self.start_epoch(epoch)
        self.observe_decisions(store.decisions())
        self.observe_labels((row, fb.label) for fb, row in store.feedback())
        return self


def _events(store: DecisionStore) -> list[tuple[float, int, object]]:
    """Decisions and labels merged by time (a decision before a label of the same instant)."""
    events = [(row.time, 0, row) for row in store.decisions()]
    events += [(fb.time, 1, (row, fb)) for fb, row in store.feedback()]
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def _history_row(monitor: Monitor) -> dict:
    snap = monitor.snapshot()
    analysis, labelled, alarms = snap["analysis_window"], snap["labelled_window"], snap["alarms"]
    return {
        "decisions": snap["decisions"], "labelled": snap["labelled"], "epoch": snap["epoch"]["id"],
        "target_accuracy": (snap["promise"] or {}).get("target_accuracy"), "accuracy": labelled["accuracy"],
        "estimated_accuracy": analysis["estimated_accuracy"], "ece": labelled["ece"], "brier": labelled["brier"],
        "deferral_rate": analysis["deferral_rate"], "mean_confidence": analysis["mean_confidence"],
        "mean_label_mass": analysis["mean_label_mass"], "guarantee_e_value": alarms["guarantee"].get("e_value"),
        "guarantee_alert": alarms["guarantee"]["alert"], "drift_e_value": alarms["drift"]["e_value"],
        "drift_alert": alarms["drift"]["alert"],
    }


def monitor_history(store: DecisionStore, *, points: int = 200) -> tuple[list[dict], Monitor]:
    """The monitor's figures over time: about `points` rows, plus one at each alarm's first firing.

    Events (decisions and labels) are replayed in time order; the final state equals
    `Monitor.rebuild`'s. Returns (rows, the final monitor).
    """
    events = _events(store)
    every = max(1, math.ceil(len(events) / points))
    monitor = Monitor()
    pending = deque(store.epochs())
    rows, alerts = [], (False, False)
    for k, (time, kind, item) in enumerate(events):
        row = item if kind == 0 else item[0]
        # Epochs start in order, each before its first decision (a label may come from an older one).
        while pending and (pending[0].started <= time or pending[0].id <= row.epoch):
            monitor.start_epoch(pending.popleft())
        if kind == 0:
            monitor.observe_decisions([item])
        else:
            monitor.observe_labels([(item[0], item[1].label)])
        current = monitor.epochs[monitor.current]
        now = (current.guarantee.alert if current.guarantee else False, current.drift.alert)
        if (k + 1) % every == 0 or k + 1 == len(events) or now != alerts:
            rows.append({"time": events[k][0], **_history_row(monitor)})
            alerts = now
    return rows, monitor


class MonitorCollector:
    """Prometheus collector: the monitor's current figures as ``decal_monitor_*`` gauges, read at scrape time.

    Args:
        monitor: returns the monitor, or None while there is none (no log, or not loaded yet).
    """

    def __init__(self, monitor: Callable[[], Monitor | None]):
        self.monitor = monitor

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        monitor = self.monitor()
        snap = monitor.snapshot() if monitor is not None else {}
        if "epoch" not in snap:
            return
        analysis, labelled, alarms = snap["analysis_window"], snap["labelled_window"], snap["alarms"]
        values = {
            "decisions": ("Decisions in the decision log.", snap["decisions"]),
            "labelled": ("Decisions with a label.", snap["labelled"]),
            "accuracy": ("Accuracy of labelled answered decisions in the analysis window.", labelled["accuracy"]),
            "estimated_accuracy": ("Label-free accuracy estimate of answered decisions (mean calibrated confidence).",
                                   analysis["estimated_accuracy"]),
            "target_accuracy": ("The threshold's promised accuracy of answered decisions.", (snap["promise"] or {}).get("target_accuracy")),
            "ece": ("ECE of the labelled decisions in the analysis window.", labelled["ece"]),
            "brier": ("Brier score of the labelled decisions in the analysis window.", labelled["brier"]),
            "deferral_rate": ("Share of deferred decisions in the analysis window.", analysis["deferral_rate"]),
            "mean_confidence": ("Mean calibrated confidence in the analysis window.", analysis["mean_confidence"]),
            "mean_label_mass": ("Mean label mass in the analysis window.", analysis["mean_label_mass"]),
            "guarantee_e_value": ("E-value of the guarantee alarm (fires at 1/alpha).", alarms["guarantee"].get("e_value")),
            "guarantee_alert": ("1 once the guarantee alarm fired in this epoch.", float(alarms["guarantee"]["alert"])),
            "drift_e_value": ("E-value of the drift alarm (fires at 1/alpha).", alarms["drift"]["e_value"]),
            "drift_alert": ("1 once the drift alarm fired in this epoch.", float(alarms["drift"]["alert"])),
        }
        for name, (doc, value) in values.items():
            if value is not None:
                yield GaugeMetricFamily(f"decal_monitor_{name}", doc, value=float(value))
