"""Prediction records: the one schema that scoring writes and metrics, calibrators, plots and reports read.

One JSON object per example (DESIGN.md, "Prediction record"), appended to `predictions.jsonl`
in a run folder and flushed per batch, so an interrupted run resumes where it stopped.

Raw and calibrated values live side by side (docs/design.md, "Label mass"): ``confidence`` and
``option_probs`` are always the model's full-vocabulary probabilities, and a calibrated run adds
``calibrated_probs`` (over the options, summing to 1) and ``calibrated_confidence``. Records that
earlier releases calibrated in place (raw values kept in ``extra.uncalibrated_*``) are read back
into this shape. An applied conformal run adds ``option_set`` (labels, in option order).
`records_to_arrays` stacks the scale metrics use: calibrated where the run is calibrated.
"""

from __future__ import annotations

import json

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

from .errors import DataError

__all__ = [
    "PredictionRecord",
    "RecordArrays",
    "RecordWriter",
    "read_records",
    "iter_records",
    "records_to_arrays",
    "completed_ids",
    "Scale",
]

_REQUIRED = ("id", "task", "split", "label", "prediction", "correct", "valid", "confidence", "option_probs", "labels")
# Optional fields left out of the JSON when None, so records without them are unchanged.
_OMIT_IF_NONE = ("true_probs", "calibrated_probs", "calibrated_confidence", "option_set")
# Calibrated probabilities are written with float rounding; a row may miss 1 by this much.
_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class PredictionRecord:
    """One example's decision: see DESIGN.md for each field's meaning.

    `confidence` is the full-vocabulary probability of the emitted decision token (reasoning) or
    of the constrained argmax option (non-reasoning); `option_probs[k]` is the full-vocabulary
    probability of option k's decision token at the decision position (not renormalised).
    `true_probs` (optional) is the true probability of each option, aligned with `labels`, for a
    task that knows it (`decal.tasks.verdicts`); it is left out of the JSON when None, so records
    of other tasks are unchanged. `calibrated_probs` / `calibrated_confidence` (optional, both or
    neither) are a post-hoc calibrator's distribution over the options and its value at the
    prediction; `option_set` (optional) is a conformal prediction set (module docstring).
    """

    id: str
    task: str
    split: str
    label: str
    prediction: str
    correct: bool
    valid: bool
    confidence: float
    option_probs: list[float]
    labels: list[str]
    true_probs: list[float] | None = None
    calibrated_probs: list[float] | None = None
    calibrated_confidence: float | None = None
    option_set: list[str] | None = None
    emitted_token: str | None = None
    completion: str | None = None
    model: str | None = None
    adapter: str | None = None
    seed: int | None = None
    prompt_version: str | None = None
    top_token: str | None = None
    top_is_option: bool | None = None
    seconds: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        row = asdict(self)
        for key in _OMIT_IF_NONE:
            if row[key] is None:
                del row[key]
        return json.dumps(row, ensure_ascii=False, allow_nan=True)

    @classmethod
    def from_dict(cls, row: dict, *, path=None, line: int | None = None) -> "PredictionRecord":
        """Validate one decoded JSON object; errors name the file, line and field."""
        if not isinstance(row, dict):
            raise DataError("expected a JSON object", path=path, line=line)
        for key in _REQUIRED:
            if key not in row:
                raise DataError("missing required field", path=path, line=line, field=key)
        row = _migrate_in_place_calibration(row)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in row.items() if k in known}
        labels, probs = row["labels"], row["option_probs"]
        if not isinstance(labels, list) or len(labels) < 2:
            raise DataError("must be a list of at least two labels", path=path, line=line, field="labels")
        if not isinstance(probs, list) or len(probs) != len(labels):
            raise DataError(f"must be a list of {len(labels)} numbers", path=path, line=line, field="option_probs")
        for name, value in (("confidence", row["confidence"]), *(("option_probs", p) for p in probs)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value <= 1.0):
                raise DataError(f"must be a probability in [0, 1]; got {value!r}", path=path, line=line, field=name)
        truth = row.get("true_probs")
        if truth is not None:
            if not isinstance(truth, list) or len(truth) != len(labels) or not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0 for p in truth
            ):
                raise DataError(
                    f"must be a list of {len(labels)} probabilities in [0, 1] (one per label); got {truth!r}",
                    path=path, line=line, field="true_probs",
                )
        for name in ("label", "prediction"):
            if row[name] not in labels:
                raise DataError(f"{row[name]!r} is not one of {labels}", path=path, line=line, field=name)
        for name in ("correct", "valid"):
            if not isinstance(row[name], bool):
                raise DataError(f"must be true or false; got {row[name]!r}", path=path, line=line, field=name)
        _check_calibrated(row, labels, path=path, line=line)
        _check_option_set(row.get("option_set"), labels, path=path, line=line)
        kwargs["id"] = str(row["id"])
        return cls(**kwargs)

    @property
    def label_mass(self) -> float:
        """Sum of the raw full-vocabulary `option_probs` (docs/design.md, "Label mass")."""
        return float(sum(self.option_probs))

    def with_calibration(self, calibrated_probs: Sequence[float], calibrated_confidence: float, *, calibrator: str) -> "PredictionRecord":
        """A copy with a post-hoc calibrator's values beside the raw ones (which stay as they are)."""
        return replace(
            self,
            calibrated_probs=[float(p) for p in calibrated_probs],
            calibrated_confidence=float(calibrated_confidence),
            extra={**self.extra, "calibrator": calibrator},
        )

    def with_option_set(self, option_set: Sequence[str]) -> "PredictionRecord":
        """A copy carrying a conformal option set (labels, kept in option order)."""
        chosen = set(option_set)
        return replace(self, option_set=[lab for lab in self.labels if lab in chosen])


def _migrate_in_place_calibration(row: dict) -> dict:
    """A record calibrated in place by an earlier release, in today's shape (module docstring).

    Those records overwrote `confidence` and `option_probs` and kept the raw values in
    ``extra.uncalibrated_confidence`` / ``extra.uncalibrated_option_probs``.
    """
    extra = row.get("extra")
    if "calibrated_probs" in row or not isinstance(extra, dict) or "uncalibrated_option_probs" not in extra:
        return row
    rest = {k: v for k, v in extra.items() if k not in ("uncalibrated_option_probs", "uncalibrated_confidence")}
    return {
        **row,
        "calibrated_probs": row["option_probs"],
        "calibrated_confidence": row["confidence"],
        "option_probs": extra["uncalibrated_option_probs"],
        "confidence": extra.get("uncalibrated_confidence", row["confidence"]),
        "extra": rest,
    }


def _is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _check_calibrated(row: dict, labels: list, *, path, line) -> None:
    probs, conf = row.get("calibrated_probs"), row.get("calibrated_confidence")
    if probs is None and conf is None:
        return
    if probs is None or conf is None:
        missing = "calibrated_probs" if probs is None else "calibrated_confidence"
        raise DataError("missing; a calibrated record carries calibrated_probs and calibrated_confidence",
                        path=path, line=line, field=missing)
    if not isinstance(probs, list) or len(probs) != len(labels) or not all(_is_probability(p) for p in probs):
        raise DataError(f"must be a list of {len(labels)} probabilities in [0, 1]; got {probs!r}",
                        path=path, line=line, field="calibrated_probs")
    if abs(sum(probs) - 1.0) > _SUM_TOLERANCE:
        raise DataError(f"must sum to 1 (a distribution over the options); sums to {sum(probs)!r}",
                        path=path, line=line, field="calibrated_probs")
    if not _is_probability(conf):
        raise DataError(f"must be a probability in [0, 1]; got {conf!r}", path=path, line=line, field="calibrated_confidence")


def _check_option_set(option_set, labels: list, *, path, line) -> None:
    if option_set is None:
        return
    if not isinstance(option_set, list) or any(lab not in labels for lab in option_set) or len(set(option_set)) != len(option_set):
        raise DataError(f"must be a list of distinct labels from {labels}; got {option_set!r}",
                        path=path, line=line, field="option_set")


def iter_records(path: str | os.PathLike) -> Iterator[PredictionRecord]:
    """Stream records from a JSONL file, validating each line."""
    for _, record in _numbered_records(path):
        yield record


def _numbered_records(path: str | os.PathLike) -> Iterator[tuple[int, PredictionRecord]]:
    """(file line number, record) pairs; blank lines are skipped but still counted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 ({e.reason} at byte {e.start})", path=path, line=lineno) from e
            if not text.strip():
                continue
            try:
                # Stripped, so a line cut short reports the cut ("Unterminated string"), not its newline.
                row = json.loads(text.strip())
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=lineno) from e
            yield lineno, PredictionRecord.from_dict(row, path=path, line=lineno)


def read_records(path: str | os.PathLike) -> list[PredictionRecord]:
    """Read all records of a `predictions.jsonl` (or of a run folder holding one).

    Raises `DataError` on a malformed line, on duplicate ids, on records whose label sets differ
    (a run is one task: every consumer stacks them with `records_to_arrays`), and on an empty file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    records, seen = [], set()
    for lineno, rec in _numbered_records(path):
        if rec.id in seen:
            raise DataError(f"duplicate id {rec.id!r}", path=path, line=lineno, field="id")
        if records and rec.labels != records[0].labels:
            raise DataError(
                f"{rec.labels} differ from the labels {records[0].labels} of the first record; one run holds one task",
                path=path, line=lineno, field="labels",
            )
        seen.add(rec.id)
        records.append(rec)
    if not records:
        raise DataError("no prediction records", path=path)
    return records


Scale = Literal["calibrated", "raw"]


@dataclass(frozen=True)
class RecordArrays:
    """Records as plain arrays for the metric functions.

    confidence: (n,) float, the confidence metrics read: `calibrated_confidence` when the run is
        calibrated and `scale="calibrated"`, else the raw full-vocabulary `confidence`.
    class_probs: (n, K) rows summing to 1: `calibrated_probs`, or `option_probs` renormalised.
    option_probs: (n, K) the raw full-vocabulary option probabilities, whatever the scale.
    label_mass: (n,) their row sums (docs/design.md, "Label mass").
    calibrated: whether `confidence` and `class_probs` are a calibrator's.
    correct, valid: (n,) bool; label_index, prediction_index: (n,) int;
    true_probs: (n, K) float when every record carries `true_probs`, else None;
    option_set: (n, K) bool membership when every record carries an `option_set`, else None.
    """

    confidence: np.ndarray
    correct: np.ndarray
    valid: np.ndarray
    option_probs: np.ndarray
    class_probs: np.ndarray
    label_index: np.ndarray
    prediction_index: np.ndarray
    labels: tuple[str, ...]
    true_probs: np.ndarray | None = None
    label_mass: np.ndarray | None = None
    calibrated: bool = False
    option_set: np.ndarray | None = None


def _all_or_none(records: Sequence[PredictionRecord], name: str, what: str) -> bool:
    """Whether every record has field `name` set; a DataError when only some have it."""
    has = getattr(records[0], name) is not None
    for r in records:
        if (getattr(r, name) is not None) != has:
            raise DataError(
                f"record {r.id!r} {'lacks' if has else 'has'} `{name}` unlike record {records[0].id!r}; "
                f"a run's records all carry {what} or none does",
                field=name,
            )
    return has


def records_to_arrays(records: Sequence[PredictionRecord], *, scale: Scale = "calibrated") -> RecordArrays:
    """Stack records that share one label set into arrays.

    Args:
        records: prediction records of one run.
        scale: "calibrated" reads `calibrated_confidence` / `calibrated_probs` where the run has
            them (what metrics, thresholds and conformal sets use); "raw" always reads the
            full-vocabulary `confidence` and renormalised `option_probs` (what calibrators fit on).

    Raises `DataError` if label sets differ, or if some records carry `true_probs`, calibrated
    values or option sets and others not.
    """
    if not records:
        raise DataError("no prediction records")
    if scale not in ("calibrated", "raw"):
        raise ValueError(f"`scale` must be 'calibrated' or 'raw'; got {scale!r}")
    labels = tuple(records[0].labels)
    for r in records:
        if tuple(r.labels) != labels:
            raise DataError(f"record {r.id!r} has labels {r.labels}, expected {list(labels)}", field="labels")
    has_truth = _all_or_none(records, "true_probs", "the true probabilities")
    calibrated = _all_or_none(records, "calibrated_probs", "calibrated values") and scale == "calibrated"
    has_sets = _all_or_none(records, "option_set", "an option set")
    index = {lab: i for i, lab in enumerate(labels)}
    option_probs = np.asarray([r.option_probs for r in records], dtype=np.float64)
    totals = option_probs.sum(axis=1, keepdims=True)
    if calibrated:
        class_probs = np.asarray([r.calibrated_probs for r in records], dtype=np.float64)
        confidence = np.asarray([r.calibrated_confidence for r in records], dtype=np.float64)
    else:
        # A row with no mass on any option (possible in float underflow) becomes uniform over options.
        safe = np.where(totals > 0, totals, 1.0)
        class_probs = np.where(totals > 0, option_probs / safe, 1.0 / len(labels))
        confidence = np.asarray([r.confidence for r in records], dtype=np.float64)
    option_set = None
    if has_sets:
        option_set = np.zeros((len(records), len(labels)), dtype=bool)
        for i, r in enumerate(records):
            option_set[i, [index[lab] for lab in r.option_set]] = True
    return RecordArrays(
        confidence=confidence,
        correct=np.asarray([r.correct for r in records], dtype=bool),
        valid=np.asarray([r.valid for r in records], dtype=bool),
        option_probs=option_probs,
        class_probs=class_probs,
        label_index=np.asarray([index[r.label] for r in records], dtype=np.int64),
        prediction_index=np.asarray([index[r.prediction] for r in records], dtype=np.int64),
        labels=labels,
        true_probs=np.asarray([r.true_probs for r in records], dtype=np.float64) if has_truth else None,
        label_mass=totals[:, 0],
        calibrated=calibrated,
        option_set=option_set,
    )


def completed_ids(path: str | os.PathLike) -> set[str]:
    """Ids already written to an append-only predictions file, repairing a torn last line.

    A crash (SIGKILL) can leave the last line half-written; that line is cut off so the
    example is scored again, and no id is lost or doubled.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    ids = set()
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            try:
                ids.add(str(json.loads(raw)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"cannot resume: unreadable record ({e})", path=path, line=lineno) from e
    return ids


class RecordWriter:
    """Append records to a JSONL file, flushing and syncing after each batch.

    Use as a context manager; `write_batch` is the unit that survives a crash.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def __enter__(self) -> "RecordWriter":
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def write_batch(self, records: Iterable[PredictionRecord | dict]) -> None:
        lines = []
        for r in records:
            if isinstance(r, PredictionRecord):
                lines.append(r.to_json())
            else:
                lines.append(json.dumps(r, ensure_ascii=False, allow_nan=True))
        if not lines:
            return
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


