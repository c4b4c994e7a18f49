"""Prediction records: validation with file/line/field errors, append-and-resume, arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from decal.errors import DataError
from decal.records import PredictionRecord, RecordWriter, completed_ids, read_records, records_to_arrays


def _rec(i: int, **kw) -> PredictionRecord:
    base = dict(
        id=f"ex{i}", task="t", split="s", label="A", prediction="A", correct=True, valid=True,
        confidence=0.6, option_probs=[0.6, 0.3], labels=["A", "B"],
    )
    base.update(kw)
    return PredictionRecord(**base)


def test_round_trip_and_arrays(tmp_path):
    path = tmp_path / "predictions.jsonl"
    with RecordWriter(path) as w:
        w.write_batch([_rec(0), _rec(1, label="B", correct=False, option_probs=[0.6, 0.2])])
    recs = read_records(tmp_path)
    assert [r.id for r in recs] == ["ex0", "ex1"]
    arr = records_to_arrays(recs)
    np.testing.assert_allclose(arr.class_probs, [[2 / 3, 1 / 3], [0.75, 0.25]])
    assert arr.label_index.tolist() == [0, 1] and arr.correct.tolist() == [True, False]


def test_torn_last_line_is_cut_and_resumed(tmp_path):
    path = tmp_path / "predictions.jsonl"
    with RecordWriter(path) as w:
        w.write_batch([_rec(0), _rec(1)])
    with path.open("a") as f:
        f.write(_rec(2).to_json()[:20])  # a crash in the middle of a write
    assert completed_ids(path) == {"ex0", "ex1"}
    assert path.read_text().endswith("\n")
    with RecordWriter(path) as w:
        w.write_batch([_rec(2)])
    assert [r.id for r in read_records(path)] == ["ex0", "ex1", "ex2"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("label"), r"predictions.jsonl:2: field 'label': missing"),
        (lambda r: r.update(confidence=1.5), r":2: field 'confidence': must be a probability"),
        (lambda r: r.update(prediction="C"), r":2: field 'prediction': 'C' is not one of"),
        (lambda r: r.update(option_probs=[0.5]), r":2: field 'option_probs'"),
        (lambda r: r.update(correct="yes"), r":2: field 'correct'"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, mutate, message):
    path = tmp_path / "predictions.jsonl"
    row = json.loads(_rec(1).to_json())
    mutate(row)
    path.write_text(_rec(0).to_json() + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_duplicates_malformed_and_empty(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(_rec(0).to_json() + "\n" + _rec(0).to_json() + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'id': duplicate id 'ex0'"):
        read_records(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: invalid JSON"):
        read_records(path)
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: not UTF-8"):
        read_records(path)
    path.write_text("")
    with pytest.raises(DataError, match="no prediction records"):
        read_records(path)
