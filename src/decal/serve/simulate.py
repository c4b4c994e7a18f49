"""Simulated traffic for the monitor's alarms: false-alarm rates and detection delays against a known truth.

A stream is what a server sees: a reference window (the calibration run), then decisions, a
random share of them labelled, each label drawn from the record's true probabilities
(`PredictionRecord.true_probs`, which the `verdicts` task carries). `simulate_streams` draws many
such streams from pools of records, optionally switching mid-stream to another pool (the
out-of-domain variant's records, or a miscalibrated model's), runs both alarms of
`decal.serve.alarms` on all of them at once, and reports how often each fired before the switch
(false alarms) and how many requests and labels after the switch it took to fire.

Draws are with replacement from each pool, so under no switch the reference and the stream are
i.i.d. from one distribution (exchangeable: the drift alarm's null holds exactly) and each label
is correct with probability ``pool.accuracy`` given the past (with ``target = pool.accuracy``
the guarantee alarm's least favourable null holds exactly).

`verdicts_records` builds records without a model: the `verdicts` generator's examples and true
probabilities with a model-like score (a reader that takes each verdict's sign right with
probability `read_accuracy`, counts them and reports ``sigmoid(#positive - #negative)`` as if its
reading were exact, with a label mass drawn per example). The alarms' guarantees depend only on
exchangeability and on the labels' conditional means, which hold for any records whose labels
are drawn from `true_probs`; the score's shape changes only how fast the alarms fire. The same
functions take the records of real `verdicts` runs (`decal.records.read_records`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .alarms import BET_WINDOW, conformal_p_values, first_crossing, guarantee_log_capital, simple_jumper_log

__all__ = ["StreamPool", "StreamResult", "verdicts_records", "stream_pool", "simulate_streams"]

_SIGNS = {"+": 1, "-": -1, "0": 0}


@dataclass(frozen=True)
class StreamPool:
    """Records as the monitor sees them, for drawing streams.

    confidence: (N,) calibrated confidence; label_mass: (N,) sum of the raw option probabilities;
    answered: (N,) not deferred at the threshold; p_correct: (N,) true probability that the
    decision is right (``true_probs[prediction]``).
    """

    confidence: np.ndarray
    label_mass: np.ndarray
    answered: np.ndarray
    p_correct: np.ndarray

    @property
    def accuracy(self) -> float:
        """Exact expected accuracy of answered decisions drawn from this pool."""
        return float(self.p_correct[self.answered].mean()) if self.answered.any() else float("nan")

    @property
    def coverage(self) -> float:
        return float(self.answered.mean())


def _signs(rationale: str) -> list[int]:
    head = rationale.split(":")[0]
    return [_SIGNS[item.strip().split(" ")[-1]] for item in head.split(",")]


def verdicts_records(variant: str = "in", *, splits: Sequence[str] = ("train", "validation", "test"),
                     read_accuracy: float = 0.97, sharpness: float = 1.0, mass: tuple[float, float] = (18.0, 2.0),
                     seed: int = 0) -> list:
    """Model-like prediction records on the `verdicts` generator's examples (module docstring).

    Args:
        variant: "in" or "ood" (`decal.tasks.verdicts`).
        splits: the splits whose examples become records (ids are prefixed by nothing: the
            splits' ids are already distinct).
        read_accuracy: probability that the simulated reader takes a verdict's sign right; a
            misread sign is one of the two others, uniformly.
        sharpness: the reader reports ``sigmoid(sharpness * (#positive - #negative))`` of what it
            read; above 1 it is overconfident (a miscalibrated model).
        mass: Beta(a, b) parameters of the label mass (the probability on the two decision tokens).
        seed: of the reader's errors and the label masses.

    Returns:
        `PredictionRecord`s with `true_probs`, each with the generator's gold label.
    """
    from ..records import PredictionRecord
    from ..tasks import load_task

    rng = np.random.default_rng([seed, 0 if variant == "in" else 1])
    spec = "verdicts" if variant == "in" else f"verdicts:variant={variant}"
    records = []
    for split in splits:
        for ex in load_task(spec, split).examples:
            signs = np.array(_signs(ex.reasoning))
            wrong = rng.random(len(signs)) >= read_accuracy
            shift = rng.integers(1, 3, size=len(signs))  # to one of the two other signs
            read = np.where(wrong, (signs + 1 + shift) % 3 - 1, signs)
            p_positive = 1.0 / (1.0 + math.exp(-sharpness * float((read == 1).sum() - (read == -1).sum())))
            label_mass = float(rng.beta(*mass))
            probs = [label_mass * p_positive, label_mass * (1.0 - p_positive)]
            k = int(np.argmax(probs))
            records.append(PredictionRecord(
                id=f"{split}-{ex.id}", task=spec, split=split, label=ex.label, prediction=ex.labels[k],
                correct=ex.labels[k] == ex.label, valid=True, confidence=probs[k], option_probs=probs,
                labels=list(ex.labels), true_probs=list(ex.true_probs), model=f"verdicts-reader-{read_accuracy:g}-{sharpness:g}",
            ))
    return records


def stream_pool(records: Sequence, *, calibrator=None, threshold: float | None = None) -> StreamPool:
    """A `StreamPool` from records with `true_probs`: calibrated as served, answered at `threshold`.

    Args:
        records: `PredictionRecord`s that carry `true_probs`.
        calibrator: a fitted `decal.calibrators` calibrator (None: confidences as they are).
        threshold: answer when the calibrated confidence is >= it (None: answer every decision).
    """
    from ..calibrators import apply_calibrator
    from ..records import records_to_arrays

    raw = records_to_arrays(list(records))
    if raw.true_probs is None:
        raise ValueError("the records carry no `true_probs`; the simulation draws labels from them")
    served = records_to_arrays(apply_calibrator(calibrator, records)) if calibrator is not None else raw
    rows = np.arange(len(raw.confidence))
    answered = np.ones(len(rows), dtype=bool) if threshold is None else served.confidence >= threshold
    return StreamPool(confidence=served.confidence, label_mass=raw.label_mass, answered=answered,
                      p_correct=raw.true_probs[rows, raw.prediction_index])


@dataclass(frozen=True)
class StreamResult:
    """Per stream: the step at which each alarm first fired (-1: never), and the label counts.

    guarantee_step, drift_step: (S,) first firing step (0-based decision index in the stream).
    labels_before: (S, T) labels that had arrived up to and including each step.
    switch: the step of the switch (None: no switch).
    """

    guarantee_step: np.ndarray
    drift_step: np.ndarray
    labels_before: np.ndarray
    switch: int | None

    def false_alarm_rate(self, alarm: str) -> float:
        """Share of streams where `alarm` fired before the switch (at all, with no switch)."""
        step = getattr(self, f"{alarm}_step")
        end = self.labels_before.shape[1] if self.switch is None else self.switch
        return float(np.mean((step >= 0) & (step < end)))

    def detection(self, alarm: str) -> dict:
        """Share of streams where `alarm` fired after the switch, and median delays in requests and labels."""
        step = getattr(self, f"{alarm}_step")
        fired = step >= self.switch
        rows = np.flatnonzero(fired)
        requests = step[rows] - self.switch + 1
        labels_at_switch = self.labels_before[rows, self.switch - 1] if self.switch > 0 else np.zeros(len(rows))
        labels = self.labels_before[rows, step[rows]] - labels_at_switch
        return {"rate": float(fired.mean()), "n": int(fired.sum()),
                "median_requests": float(np.median(requests)) if len(rows) else float("nan"),
                "median_labels": float(np.median(labels)) if len(rows) else float("nan")}


def simulate_streams(pool: StreamPool, shifted: StreamPool | None = None, *, n_streams: int = 500, n_reference: int = 500,
                     n_before: int = 500, n_after: int = 500, label_rate: float = 0.2, target: float,
                     alpha: float = 0.05, window: int = BET_WINDOW, seed: int = 0) -> StreamResult:
    """Draw `n_streams` streams and run both alarms on each (module docstring).

    Args:
        pool: the in-domain records (reference window and the stream before the switch).
        shifted: the records after the switch (None: `pool` throughout, no switch).
        n_reference, n_before, n_after: lengths of the reference window and the two parts.
        label_rate: share of decisions that get a label (labels arrive with their decision).
        target: the promised accuracy of answered decisions the guarantee alarm tests.
        alpha: each alarm's level; window: the guarantee alarm's bet memory.
    """
    rng = np.random.default_rng(seed)
    after = shifted if shifted is not None else pool
    n_after_draws = n_after if shifted is not None else 0
    n_steps = n_before + n_after if shifted is not None else n_before
    idx_before = rng.integers(len(pool.confidence), size=(n_streams, n_steps - n_after_draws))
    idx_after = rng.integers(len(after.confidence), size=(n_streams, n_after_draws))
    ref = rng.integers(len(pool.confidence), size=(n_streams, n_reference))

    def column(name):
        return np.concatenate([getattr(pool, name)[idx_before], getattr(after, name)[idx_after]], axis=1)

    labelled = rng.random((n_streams, n_steps)) < label_rate
    correct = rng.random((n_streams, n_steps)) < column("p_correct")
    observed = np.where(labelled & column("answered"), correct.astype(np.float64), np.nan)
    guarantee = guarantee_log_capital(observed, target=target, window=window)
    drift_logs = [
        simple_jumper_log(conformal_p_values(column(name), rng.random((n_streams, n_steps)),
                                             reference=getattr(pool, name)[ref]))
        for name in ("confidence", "label_mass")
    ]
    drift = np.logaddexp(*drift_logs) - math.log(2.0)
    return StreamResult(guarantee_step=first_crossing(guarantee, alpha), drift_step=first_crossing(drift, alpha),
                        labels_before=np.cumsum(labelled, axis=1), switch=n_before if shifted is not None else None)
