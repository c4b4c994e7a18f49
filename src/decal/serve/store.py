"""The decision log's store: one small interface, and SQLite (WAL mode) under `--state-dir`.

Every answer of `decal serve` is one `DecisionRow`, keyed by the id returned to the client;
feedback joins a label to an id (docs/design.md, "Decision log"). An epoch is one set of
serving settings (model, adapter, calibrator, threshold, reference window, alarm level): every
row names its epoch, so the monitor knows which promise each decision was made under.

`DecisionStore` is the whole interface the server, `decal monitor` and `decal calibrate
--fit-feedback` use. `SQLiteStore` implements it in one file, ``STATE_DIR/decisions.sqlite``,
with no server to start:

- WAL mode (readers such as `decal monitor` never block the server) and ``synchronous=FULL``
  (each commit is fsynced), so a row is durable when `append` or `add_feedback` returns; the
  server answers only after that, so after a SIGKILL (or a power cut) every acknowledged id is
  in the store.
- Writes come from one thread (the server's log writer); each call is one transaction.
- ``PRAGMA user_version`` holds the schema version; another version is refused in one line.

A store shared by many replicas replaces `SQLiteStore` by another `DecisionStore` (README).
"""

from __future__ import annotations

import json
import os
import sqlite3
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

from ..errors import DataError

__all__ = ["DecisionRow", "FeedbackRow", "FeedbackOutcome", "Epoch", "DecisionStore", "SQLiteStore", "open_store",
           "STORE_FILE"]

STORE_FILE = "decisions.sqlite"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS epochs (
  id INTEGER PRIMARY KEY, started REAL NOT NULL, settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
  seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, time REAL NOT NULL, epoch INTEGER NOT NULL REFERENCES epochs(id),
  endpoint TEXT NOT NULL, input_sha256 TEXT NOT NULL, input TEXT, labels TEXT NOT NULL, decision TEXT NOT NULL,
  option_probs TEXT NOT NULL, confidence REAL NOT NULL, calibrated_probs TEXT NOT NULL,
  calibrated_confidence REAL NOT NULL, label_mass REAL NOT NULL, defer INTEGER NOT NULL, valid INTEGER NOT NULL,
  model TEXT NOT NULL, adapter TEXT, calibrator TEXT, threshold TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
  seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE REFERENCES decisions(id), label TEXT NOT NULL, time REAL NOT NULL
);
"""
_COLUMNS = ("id", "time", "epoch", "endpoint", "input_sha256", "input", "labels", "decision", "option_probs", "confidence",
            "calibrated_probs", "calibrated_confidence", "label_mass", "defer", "valid", "model", "adapter", "calibrator",
            "threshold")
_JSON_COLUMNS = ("labels", "option_probs", "calibrated_probs")


@dataclass(frozen=True, kw_only=True)
class DecisionRow:
    """One answered input (docs/design.md, "Decision log").

    id: the id the response gave; time: seconds since the epoch (UTC); epoch: the `Epoch` id;
    endpoint: "/v1/decide" or "/v1/moderations"; input_sha256: hash of the input's fields as
    canonical JSON; input: that JSON itself, only with `--log-bodies` (else None);
    labels, decision, option_probs (raw, full vocabulary), confidence (raw), calibrated_probs,
    calibrated_confidence, label_mass (``sum(option_probs)``), defer, valid;
    model, adapter, calibrator (sha256 of its file), threshold (sha256 of its file, or
    ``"value:<v>"``): what answered.
    """

    id: str
    time: float
    epoch: int
    endpoint: str
    input_sha256: str
    input: str | None
    labels: list[str]
    decision: str
    option_probs: list[float]
    confidence: float
    calibrated_probs: list[float]
    calibrated_confidence: float
    label_mass: float
    defer: bool
    valid: bool
    model: str
    adapter: str | None
    calibrator: str | None
    threshold: str | None

    def is_correct(self, label: str) -> bool:
        """Whether the decision is right for the gold `label` (an invalid decision never is)."""
        return self.valid and label == self.decision


@dataclass(frozen=True)
class FeedbackRow:
    """A label joined to a decision id, in the order labels arrived."""

    id: str
    label: str
    time: float


Status = Literal["added", "duplicate", "unknown_id", "not_an_option", "conflict"]


@dataclass(frozen=True)
class FeedbackOutcome:
    """What `add_feedback` did with one item: ``added`` (new), ``duplicate`` (same label again:
    nothing changes), ``unknown_id`` (no such decision), ``not_an_option`` (the label is not one
    of the decision's labels), ``conflict`` (the id already has another label, `existing`)."""

    id: str
    label: str
    status: Status
    decision: DecisionRow | None = None
    existing: str | None = None


@dataclass(frozen=True)
class Epoch:
    """One set of serving settings (JSON-ready `settings`), from `started` on."""

    id: int
    started: float
    settings: dict


class DecisionStore(ABC):
    """What the decision log needs from a database; every write is durable when it returns."""

    @abstractmethod
    def add_epoch(self, settings: dict, *, started: float) -> Epoch:
        """Record a new epoch; returns it with its id."""

    @abstractmethod
    def epochs(self) -> list[Epoch]:
        """All epochs, oldest first."""

    @abstractmethod
    def append(self, rows: Sequence[DecisionRow]) -> None:
        """Add decisions in one transaction (their ids are new)."""

    @abstractmethod
    def add_feedback(self, items: Sequence[tuple[str, str]], *, time: float) -> list[FeedbackOutcome]:
        """Join (id, label) items to decisions in one transaction, in order (a later item sees an earlier one)."""

    @abstractmethod
    def decisions(self) -> Iterator[DecisionRow]:
        """Every decision, in the order they were logged."""

    @abstractmethod
    def feedback(self) -> Iterator[tuple[FeedbackRow, DecisionRow]]:
        """Every label with its decision, in the order the labels arrived."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """``{"decisions": n, "labelled": n}``."""

    @abstractmethod
    def close(self) -> None:
        """Release the database."""


def _row(values: sqlite3.Row) -> DecisionRow:
    data = dict(zip(_COLUMNS, values))
    for key in _JSON_COLUMNS:
        data[key] = json.loads(data[key])
    data["defer"], data["valid"] = bool(data["defer"]), bool(data["valid"])
    return DecisionRow(**data)


class SQLiteStore(DecisionStore):
    """`DecisionStore` in ``STATE_DIR/decisions.sqlite`` (module docstring).

    Raises:
        DataError: the file is not a decal store (not SQLite, or another schema version).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise DataError(f"schema version {version}; this decal reads version {_SCHEMA_VERSION}", path=self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if version == 0:
                self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as e:
            raise DataError(f"not a decal decision store ({e})", path=self.path) from e

    def _transaction(self, work):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    def add_epoch(self, settings: dict, *, started: float) -> Epoch:
        text = json.dumps(settings, sort_keys=True, allow_nan=False)
        cursor = self._transaction(lambda: self._db.execute("INSERT INTO epochs (started, settings) VALUES (?, ?)", (started, text)))
        return Epoch(cursor.lastrowid, started, json.loads(text))

    def epochs(self) -> list[Epoch]:
        rows = self._db.execute("SELECT id, started, settings FROM epochs ORDER BY id").fetchall()
        return [Epoch(i, started, json.loads(settings)) for i, started, settings in rows]

    def append(self, rows: Sequence[DecisionRow]) -> None:
        if not rows:
            return
        values = [tuple(json.dumps(getattr(r, c)) if c in _JSON_COLUMNS else getattr(r, c) for c in _COLUMNS) for r in rows]
        sql = f"INSERT INTO decisions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        self._transaction(lambda: self._db.executemany(sql, values))

    def _decision(self, decision_id: str) -> DecisionRow | None:
        found = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM decisions WHERE id = ?", (decision_id,)).fetchone()
        return _row(found) if found else None

    def add_feedback(self, items: Sequence[tuple[str, str]], *, time: float) -> list[FeedbackOutcome]:
        def work():
            outcomes = []
            for decision_id, label in items:
                decision = self._decision(decision_id)
                if decision is None:
                    outcomes.append(FeedbackOutcome(decision_id, label, "unknown_id"))
                    continue
                if label not in decision.labels:
                    outcomes.append(FeedbackOutcome(decision_id, label, "not_an_option", decision))
                    continue
                existing = self._db.execute("SELECT label FROM feedback WHERE id = ?", (decision_id,)).fetchone()
                if existing is not None:
                    status = "duplicate" if existing[0] == label else "conflict"
                    outcomes.append(FeedbackOutcome(decision_id, label, status, decision, existing[0]))
                    continue
                self._db.execute("INSERT INTO feedback (id, label, time) VALUES (?, ?, ?)", (decision_id, label, time))
                outcomes.append(FeedbackOutcome(decision_id, label, "added", decision))
            return outcomes

        return self._transaction(work)

    def decisions(self) -> Iterator[DecisionRow]:
        for values in self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM decisions ORDER BY seq"):
            yield _row(values)

    def feedback(self) -> Iterator[tuple[FeedbackRow, DecisionRow]]:
        columns = ", ".join(f"d.{c}" for c in _COLUMNS)
        sql = f"SELECT f.id, f.label, f.time, {columns} FROM feedback f JOIN decisions d ON d.id = f.id ORDER BY f.seq"
        for values in self._db.execute(sql):
            yield FeedbackRow(*values[:3]), _row(values[3:])

    def counts(self) -> dict[str, int]:
        decisions = self._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
        labelled = self._db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        return {"decisions": int(decisions), "labelled": int(labelled)}

    def pragma(self, name: str):
        """A PRAGMA's value (journal_mode, synchronous), for tests and `decal monitor`."""
        return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def open_store(state_dir: str | os.PathLike, *, create: bool = True) -> SQLiteStore:
    """The store under `state_dir` (created with its folder when `create`).

    Raises:
        FileNotFoundError: `state_dir` holds no store and `create` is False.
        NotADirectoryError / ValueError: `state_dir` cannot be a folder (a file, no permission).
        DataError: the file there is not a decal store.
    """
    state_dir = Path(state_dir)
    path = state_dir / STORE_FILE
    if not create:
        if not path.is_file():
            raise FileNotFoundError(f"{state_dir}: no decision log ({STORE_FILE}); is it the --state-dir of a decal serve?")
        return SQLiteStore(path)
    if state_dir.exists() and not state_dir.is_dir():
        raise NotADirectoryError(f"--state-dir {state_dir}: not a folder")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--state-dir {state_dir}: cannot create it ({e.strerror or e})") from e
    return SQLiteStore(path)
