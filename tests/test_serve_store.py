"""The decision log's SQLite store: schema, feedback outcomes, durability under SIGKILL, bad state dirs.

The durability test runs a real writer process that appends rows and prints each id once
`append` returned (the server answers at that point), SIGKILLs it mid-stream, and checks that
every printed id is in the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from decal.errors import DataError
from decal.serve.decision_log import DecisionLog, StateDirBusy
from decal.serve.store import STORE_FILE, DecisionRow, SQLiteStore, open_store


def _row(i: int, epoch: int = 1, **changes) -> DecisionRow:
    base = dict(
        id=f"dec-{i}", time=1000.0 + i, epoch=epoch, endpoint="/v1/decide", input_sha256="ab" * 32, input=None,
        labels=["Safe", "Unsafe"], decision="Unsafe", option_probs=[0.1, 0.6], confidence=0.6, calibrated_probs=[0.3, 0.7],
        calibrated_confidence=0.7, label_mass=0.7, defer=False, valid=True, model="m", adapter=None, calibrator="c" * 64,
        threshold="value:0.5",
    )
    return DecisionRow(**{**base, **changes})


def test_rows_round_trip_in_order_with_wal_and_full_sync(tmp_path):
    store = open_store(tmp_path / "state")
    assert store.pragma("journal_mode") == "wal" and store.pragma("synchronous") == 2  # 2 = FULL
    epoch = store.add_epoch({"model": "m", "threshold": None}, started=999.0)
    rows = [_row(i, epoch.id, defer=i % 2 == 0) for i in range(5)]
    store.append(rows[:2])
    store.append(rows[2:])
    assert list(store.decisions()) == rows
    assert store.epochs() == [epoch] and store.counts() == {"decisions": 5, "labelled": 0}
    store.close()
    again = open_store(tmp_path / "state", create=False)
    assert list(again.decisions()) == rows
    again.close()


def test_feedback_outcomes_per_item_in_order(tmp_path):
    store = open_store(tmp_path)
    store.add_epoch({}, started=0.0)
    store.append([_row(1), _row(2, decision="Safe", valid=False)])
    outcomes = store.add_feedback([("dec-1", "Unsafe"), ("dec-1", "Unsafe"), ("dec-1", "Safe"), ("dec-9", "Safe"),
                                   ("dec-2", "Maybe"), ("dec-2", "Safe")], time=5.0)
    assert [o.status for o in outcomes] == ["added", "duplicate", "conflict", "unknown_id", "not_an_option", "added"]
    assert outcomes[2].existing == "Unsafe" and outcomes[0].decision == _row(1)
    joined = list(store.feedback())
    assert [(fb.id, fb.label) for fb, _ in joined] == [("dec-1", "Unsafe"), ("dec-2", "Safe")]
    assert [row.is_correct(fb.label) for fb, row in joined] == [True, False]  # an invalid decision is never right
    assert store.counts() == {"decisions": 2, "labelled": 2}


def test_duplicate_decision_id_is_refused_and_nothing_of_the_batch_is_kept(tmp_path):
    import sqlite3

    store = open_store(tmp_path)
    store.add_epoch({}, started=0.0)
    store.append([_row(1)])
    with pytest.raises(sqlite3.IntegrityError):
        store.append([_row(2), _row(1)])
    assert [r.id for r in store.decisions()] == ["dec-1"]  # one transaction per call


def test_bad_state_dirs_are_one_line_errors(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        open_store(not_a_dir)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / STORE_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="not a decal decision store"):
        open_store(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="no decision log"):
        open_store(tmp_path / "empty", create=False)
    newer = open_store(tmp_path / "newer")
    newer._db.execute("PRAGMA user_version=7")
    newer.close()
    with pytest.raises(DataError, match="schema version 7"):
        open_store(tmp_path / "newer")


def test_a_second_log_on_the_same_state_dir_is_refused(tmp_path):
    log = DecisionLog.open(tmp_path)
    with pytest.raises(StateDirBusy, match="another decal serve"):
        DecisionLog.open(tmp_path)
    log.close()
    DecisionLog.open(tmp_path).close()  # released


_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_serve_store import _row
    from decal.serve.store import open_store
    store = open_store({state!r})
    epoch = store.add_epoch({{}}, started=0.0)
    i = 0
    while True:
        rows = [_row(i + k, epoch.id) for k in range(3)]
        store.append(rows)  # durable when it returns: only then is the id acknowledged
        store.add_feedback([(rows[0].id, "Safe")], time=time.time())
        print(" ".join(r.id for r in rows), flush=True)
        i += 3
""")


@pytest.mark.slow
def test_every_acknowledged_row_survives_sigkill(tmp_path):
    state = tmp_path / "state"
    script = _WRITER.format(tests=os.path.dirname(__file__), state=str(state))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged.extend(line.split())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(acknowledged) >= 300, "the writer stopped early"
    store = SQLiteStore(state / STORE_FILE)
    stored = {r.id for r in store.decisions()}
    assert set(acknowledged) <= stored  # the kill may leave a committed row unacknowledged, never the reverse
    labelled = {fb.id for fb, _ in store.feedback()}
    assert {acknowledged[k] for k in range(0, len(acknowledged), 3)} <= labelled
