"""decal.calibrators: ECE improves on overconfident data, sklearn agreement, monotone maps,
JSON round trips, loading nonsense, and calibrated prediction records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from decal import metrics
from decal.calibrators import (
    CALIBRATORS,
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    apply_calibrator,
    fit_calibrator,
    load_calibrator,
    make_calibrator,
)
from decal.errors import DataError, NotFittedError
from decal.records import PredictionRecord, records_to_arrays


def _overconfident(n: int, seed: int, k: int = 2):
    """Logits whose softmax at temperature 3 is the true label distribution (overconfident by 3x)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2.0
    true = np.exp(logits / 3) / np.exp(logits / 3).sum(1, keepdims=True)
    labels = (rng.random(n)[:, None] > np.cumsum(true, axis=1)).sum(1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def _records(probs, labels, *, names=("Safe", "Unsafe"), vocab_share=1.0):
    out = []
    for i, (p, y) in enumerate(zip(probs, labels)):
        option = (p * vocab_share).tolist()
        pred = int(np.argmax(p))
        out.append(PredictionRecord(
            id=str(i), task="toy", split="test", label=names[y], prediction=names[pred], correct=bool(pred == y),
            valid=True, confidence=float(option[pred]), option_probs=option, labels=list(names),
        ))
    return out


@pytest.mark.parametrize("name", ["platt", "isotonic", "temperature"])
def test_each_calibrator_lowers_ece_on_held_out_overconfident_data(name):
    fit = _records(*_overconfident(3000, seed=0))
    test = _records(*_overconfident(2000, seed=1))
    before = metrics.summarize(test)
    cal = fit_calibrator(name, fit)
    after = metrics.summarize(apply_calibrator(cal, test))
    assert before["ece"] > 0.08  # the data really is overconfident
    assert after["ece"] < before["ece"] / 2
    assert after["brier"] < before["brier"]
    assert after["accuracy"] == before["accuracy"]  # predictions never change


def test_temperature_scaling_recovers_the_temperature():
    probs, labels = _overconfident(20000, seed=2, k=4)
    ts = TemperatureScaling().fit(np.log(probs), labels)
    assert ts.temperature_ == pytest.approx(3.0, rel=0.08)


def test_platt_uses_smoothed_targets_on_separable_data():
    conf = np.r_[np.full(20, 0.2), np.full(20, 0.9)]
    correct = np.r_[np.zeros(20, bool), np.ones(20, bool)]
    p = PlattScaling().fit(conf, correct)
    # Hard 0/1 targets would send a to infinity; smoothed targets 1/22 and 21/22 keep it finite
    # and the fitted probabilities land on them.
    assert np.isfinite([p.a_, p.b_]).all()
    np.testing.assert_allclose(p.transform([0.2, 0.9]), [1 / 22, 21 / 22], atol=1e-3)


def test_isotonic_matches_sklearn_and_survives_json():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    conf = rng.random(500)
    correct = rng.random(500) < conf**2
    iso = IsotonicCalibration().fit(conf, correct)
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(conf, correct.astype(float))
    grid = np.r_[0.0, np.linspace(0, 1, 101), 1.0, conf]
    np.testing.assert_allclose(iso.transform(grid), ref.predict(grid), atol=1e-12)
    again = IsotonicCalibration.from_dict(json.loads(json.dumps(iso.to_dict())))
    np.testing.assert_array_equal(again.transform(grid), iso.transform(grid))


@pytest.mark.parametrize("name", ["platt", "isotonic"])
def test_confidence_maps_are_monotone_and_in_range(name):
    probs, labels = _overconfident(1000, seed=4)
    cal = fit_calibrator(name, _records(probs, labels))
    grid = np.linspace(0, 1, 1001)
    out = cal.transform(grid)
    assert np.all(np.diff(out) >= -1e-12)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_save_load_round_trip_gives_identical_predictions(name, tmp_path):
    probs, labels = _overconfident(500, seed=5)
    records = _records(probs, labels)
    cal = fit_calibrator(name, records)
    path = tmp_path / "cal.json"
    cal.save(path)
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["method"] == name  # plain JSON, no pickle
    loaded = load_calibrator(path)
    assert type(loaded) is type(cal)
    assert [r.confidence for r in apply_calibrator(loaded, records)] == [r.confidence for r in apply_calibrator(cal, records)]


@pytest.mark.parametrize("cls", [TemperatureScaling, PlattScaling, IsotonicCalibration])
def test_use_before_fit_raises_not_fitted(cls):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        cls().transform(np.array([[0.5, 0.5]]) if cls is TemperatureScaling else [0.5])
    with pytest.raises(NotFittedError):
        cls().to_dict()


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"method": "isotonic", "fitted": {"X_thresholds_": [0.1, 0.5], "y_thresholds_": "high"}}, "fitted.y_thresholds_"),
        ({"method": "isotonic", "fitted": {"X_thresholds_": [0.5, 0.1], "y_thresholds_": [0.1, 0.2]}}, "fitted.X_thresholds_"),
        ({"method": "isotonic", "fitted": {"X_thresholds_": [0.1, 0.5], "y_thresholds_": [0.1]}}, "fitted.y_thresholds_"),
        ({"method": "platt", "fitted": {"a_": "one", "b_": 0.0}}, "fitted.a_"),
        ({"method": "platt", "fitted": {"a_": 1.0}}, "fitted.b_"),
        ({"method": "temperature", "params": {"max_temperature": 100.0}, "fitted": {"temperature_": -2.0}}, "fitted.temperature_"),
        ({"method": "temperature", "params": {"colour": 1}, "fitted": {"temperature_": 2.0}}, "params"),
        ({"method": "histogram", "fitted": {}}, "method"),
        ({"method": "platt"}, "fitted"),
    ],
)
def test_loading_nonsense_names_file_and_field(tmp_path, content, field):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError) as info:
        load_calibrator(path)
    assert str(path) in str(info.value) and f"field '{field}'" in str(info.value)


def test_load_of_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"method": "platt",\n "fitted": {"a_": 1.0,, }}')
    with pytest.raises(DataError, match=r"broken.json:2"):
        load_calibrator(path)


def test_unknown_calibrator_suggests_a_name():
    with pytest.raises(ValueError, match="Unknown calibrator 'plat'. Did you mean: platt?"):
        make_calibrator("plat")


def test_invalid_fit_input_names_the_argument():
    with pytest.raises(ValueError, match="`confidence` must hold probabilities"):
        PlattScaling().fit([0.5, 1.5], [True, False])
    with pytest.raises(ValueError, match="`labels` must be class indices"):
        TemperatureScaling().fit(np.log([[0.5, 0.5]]), [3])
    with pytest.raises(ValueError, match="`option_logprobs` must have shape"):
        TemperatureScaling().fit([0.1, 0.2], [0, 1])


def test_platt_records_keep_prediction_and_rescale_options():
    names = ("A", "B", "C")
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.5, 0.0]])
    records = _records(probs, [0, 1, 2], names=names, vocab_share=0.1)
    records[2] = PredictionRecord(**{**records[2].__dict__, "option_probs": [0.05, 0.0, 0.0], "confidence": 0.05})
    cal = PlattScaling()
    cal.a_, cal.b_ = 0.5, 0.3
    out = apply_calibrator(cal, records)
    arrays = records_to_arrays(out)  # the calibrated scale, which metrics read
    expected_conf = cal.transform([r.confidence for r in records])
    assert arrays.calibrated
    np.testing.assert_allclose(arrays.confidence, expected_conf)
    np.testing.assert_allclose(arrays.class_probs.sum(1), 1.0)
    # predicted option holds the confidence; the others keep their ratio (0.3 : 0.1 -> 3 : 1)
    np.testing.assert_allclose(arrays.class_probs[0, 0], expected_conf[0])
    assert arrays.class_probs[0, 1] / arrays.class_probs[0, 2] == pytest.approx(3.0)
    # no mass on the other options: they share 1 - confidence evenly
    assert arrays.class_probs[2, 1] == pytest.approx(arrays.class_probs[2, 2])
    for before, after in zip(records, out, strict=True):
        assert (after.prediction, after.correct, after.valid) == (before.prediction, before.correct, before.valid)
        assert after.extra["calibrator"] == "platt"
        # the calibrated record still passes the schema's validation
        PredictionRecord.from_dict(json.loads(after.to_json()))


def test_calibration_keeps_the_raw_full_vocabulary_fields():
    """Issue #23 item 3: calibrated values go beside `option_probs` and `confidence`, never over them."""
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    records = _records(probs, [0, 1, 1], vocab_share=0.05)  # label mass 0.05: far from summing to 1
    for cal in (PlattScaling(), IsotonicCalibration(), TemperatureScaling()):
        fit_calibrator(cal, records)
        out = apply_calibrator(cal, records)
        # twice: a calibrator reads the raw fields, so recalibrating a calibrated run replaces it
        again = apply_calibrator(cal, out)
        for before, after, twice in zip(records, out, again):
            assert after.option_probs == before.option_probs and after.confidence == before.confidence
            assert twice.calibrated_probs == after.calibrated_probs
            assert sum(after.calibrated_probs) == pytest.approx(1.0)
            assert after.calibrated_confidence == pytest.approx(after.calibrated_probs[after.labels.index(after.prediction)])
            back = PredictionRecord.from_dict(json.loads(after.to_json()))
            assert back.option_probs == before.option_probs and back.label_mass == pytest.approx(0.05)
        raw = records_to_arrays(out, scale="raw")
        np.testing.assert_allclose(raw.label_mass, 0.05)
        assert not raw.calibrated and records_to_arrays(out).calibrated


def test_records_calibrated_in_place_by_an_earlier_release_read_back_with_raw_fields():
    legacy = {
        "id": "1", "task": "t", "split": "s", "label": "A", "prediction": "A", "correct": True, "valid": True,
        "confidence": 0.8, "option_probs": [0.8, 0.2], "labels": ["A", "B"],
        "extra": {"calibrator": "platt", "uncalibrated_confidence": 0.04, "uncalibrated_option_probs": [0.04, 0.01]},
    }
    r = PredictionRecord.from_dict(legacy)
    assert (r.option_probs, r.confidence) == ([0.04, 0.01], 0.04)
    assert (r.calibrated_probs, r.calibrated_confidence) == ([0.8, 0.2], 0.8)
    assert r.extra == {"calibrator": "platt"}


def test_temperature_records_use_tempered_distribution_at_the_prediction():
    probs = np.array([[0.7, 0.3], [0.4, 0.6]])
    records = _records(probs, [0, 0], vocab_share=0.05)
    ts = TemperatureScaling()
    ts.temperature_ = 2.0
    out = apply_calibrator(ts, records)
    tempered = np.sqrt(probs) / np.sqrt(probs).sum(1, keepdims=True)  # p^(1/2), renormalised
    np.testing.assert_allclose([r.calibrated_probs for r in out], tempered)
    np.testing.assert_allclose([r.calibrated_confidence for r in out], [tempered[0, 0], tempered[1, 1]])
