"""decal.metrics: hand-computed values, independent references, bin edges, properties, validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from decal import metrics as m
from decal.binning import BucketedValues, OrderedValues, bin_stats
from decal.records import PredictionRecord, RecordArrays


def _synthetic(n: int, k: int = 3, seed: int = 0):
    """Overconfident class distributions with labels drawn from a tempered version."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    tempered = np.exp(logits / 3) / np.exp(logits / 3).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in tempered])
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    return probs, labels, conf, correct


# --- hand-computed values -------------------------------------------------------------------


def test_ece_equal_mass_hand_computed():
    # Sorted: (0.1 F) (0.2 T) | (0.3 F) (0.4 T) | (0.9 T): array_split(5, 3) -> sizes 2, 2, 1.
    conf = [0.9, 0.1, 0.4, 0.2, 0.3]
    corr = [True, False, True, True, False]
    expected = 2 / 5 * abs(0.5 - 0.15) + 2 / 5 * abs(0.5 - 0.35) + 1 / 5 * abs(1.0 - 0.9)
    assert m.ece(conf, corr, n_bins=3) == pytest.approx(expected, abs=1e-12)
    assert m.max_calibration_error(conf, corr, n_bins=3) == pytest.approx(0.35, abs=1e-12)


def test_ece_equal_width_edges_zero_and_one():
    # Edges belong to the bin above; 1.0 is in the last (closed) bin; 0.0 in the first.
    conf = [0.0, 0.5, 0.49, 1.0, 0.99]
    corr = [False, True, False, True, False]
    # bins (M=2): [0, .5): {0.0 F, 0.49 F} conf .245 acc 0; [.5, 1]: {.5 T, 1.0 T, .99 F} conf .83 acc 2/3
    expected = 2 / 5 * 0.245 + 3 / 5 * abs(2 / 3 - 2.49 / 3)
    assert m.ece(conf, corr, n_bins=2, binning="equal_width") == pytest.approx(expected, abs=1e-12)
    stats = m.binned_stats(conf, corr, n_bins=2, binning="equal_width")
    assert stats.count.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("value", [0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
def test_equal_width_value_on_edge_goes_up(value):
    stats = m.binned_stats([value], [True], n_bins=10, binning="equal_width")
    assert int(np.argmax(stats.count)) == round(value * 10)


def test_ties_follow_stable_sort():
    # All confidences tie: the stable sort keeps file order, so the first two examples form bin 1.
    conf = [0.7, 0.7, 0.7, 0.7]
    corr = [True, True, False, False]
    # bins {T, T} acc 1 and {F, F} acc 0, both conf .7 -> ECE = .5 * .3 + .5 * .7 = .5
    assert m.ece(conf, corr, n_bins=2) == pytest.approx(0.5)
    # The other file order gives the same bins mirrored: same ECE by symmetry here...
    assert m.ece(conf, corr[::-1], n_bins=2) == pytest.approx(0.5)
    # ...but one bin sees the difference between the two orders.
    assert m.ece(conf, corr, n_bins=1) == pytest.approx(0.2)


def test_all_equal_confidences_and_single_bin_equal_top_label_gap():
    conf = np.full(8, 0.6)
    corr = np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    for binning in ("equal_mass", "equal_width"):
        assert m.ece(conf, corr, n_bins=1, binning=binning) == pytest.approx(abs(5 / 8 - 0.6))
    # equal width: one non-empty bin, same gap
    assert m.ece(conf, corr, n_bins=10, binning="equal_width") == pytest.approx(abs(5 / 8 - 0.6))


def test_fewer_examples_than_bins():
    conf, corr = [0.2, 0.9], [False, True]
    # array_split(2, 10): two singleton bins then eight empty ones contributing 0
    assert m.ece(conf, corr, n_bins=10) == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)
    stats = m.binned_stats(conf, corr, n_bins=10)
    assert stats.count.tolist() == [1, 1] + [0] * 8
    assert np.isnan(stats.acc[2:]).all()


def test_confidence_exactly_zero_and_one():
    assert m.ece([0.0, 1.0], [False, True]) == 0.0
    assert m.ece([0.0, 1.0], [True, False]) == 1.0
    assert m.ece([1.0, 1.0], [True, False], binning="equal_width") == pytest.approx(0.5)
    assert m.overconfidence_ratio([1.0, 0.99, 0.0]) == pytest.approx(1 / 3)


def test_sce_hand_computed():
    probs = [[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]
    labels = [0, 1, 1]
    # class 0, bins of width .5: [0,.5): {.3 (not 0)} gap .3; [.5,1]: {.8 (is 0), .6 (not)} conf .7 acc .5 gap .2
    c0 = 1 / 3 * 0.3 + 2 / 3 * 0.2
    # class 1: [0,.5): {.2 (no), .4 (yes)} conf .3 acc .5 gap .2; [.5,1]: {.7 yes} gap .3
    c1 = 2 / 3 * 0.2 + 1 / 3 * 0.3
    assert m.sce(probs, labels, n_bins=2) == pytest.approx((c0 + c1) / 2)


def test_mce_hand_computed():
    probs = [[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]
    labels = [0, 1, 1]
    # class 0 sorted .3(no) .6(no) .8(yes), array_split(3, 2): {.3,.6} conf .45 acc 0; {.8} acc 1 gap .2
    c0 = 2 / 3 * 0.45**2 + 1 / 3 * 0.2**2
    # class 1 sorted .2(no) .4(yes) .7(yes): {.2,.4} conf .3 acc .5; {.7} acc 1
    c1 = 2 / 3 * 0.2**2 + 1 / 3 * 0.3**2
    assert m.mce(probs, labels, n_bins=2) == pytest.approx(math.sqrt((c0 + c1) / 2))


def test_brier_nll_accuracy_hand_computed():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    labels = [0, 1]
    assert m.brier(probs, labels) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.49 + 0.36)) / 2)
    assert m.nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert m.nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(np.finfo(float).eps))  # clipped, finite
    assert m.accuracy([1, 0, 0, 1]) == 0.5


def test_risk_coverage_and_aurc_hand_computed_with_ties():
    conf = [0.9, 0.5, 0.5, 0.2]
    corr = [True, False, True, False]
    cov, risk, thr = m.risk_coverage(conf, corr)
    assert cov.tolist() == [0.25, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 1 / 3, 0.5])
    assert thr.tolist() == [0.9, 0.5, 0.2]
    assert m.aurc(conf, corr) == pytest.approx(0.25 * 0 + 0.5 * (1 / 3) + 0.25 * 0.5)


def test_auroc_nan_with_warning_when_one_class():
    with pytest.warns(UserWarning, match="all 3 predictions are correct"):
        assert math.isnan(m.auroc([0.1, 0.5, 0.9], [True, True, True]))
    with pytest.warns(UserWarning, match="wrong"):
        assert math.isnan(m.auroc([0.1, 0.5], [False, False]))


# --- independent references -----------------------------------------------------------------


def test_auroc_and_brier_match_sklearn():
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    probs, labels, conf, correct = _synthetic(500, k=4)
    conf_ties = np.round(conf, 2)  # many ties: average ranks must match sklearn
    for c in (conf, conf_ties):
        assert m.auroc(c, correct) == pytest.approx(roc_auc_score(correct, c), abs=1e-12)
    assert m.brier(probs, labels) == pytest.approx(brier_score_loss(labels, probs, labels=[0, 1, 2, 3]), abs=1e-12)
    assert m.nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2, 3]), abs=1e-9)
    p2 = np.c_[1 - conf, conf]
    y2 = (np.arange(500) % 2).astype(int)
    assert m.brier(p2, y2) == pytest.approx(brier_score_loss(y2, p2, labels=[0, 1], scale_by_half=False), abs=1e-12)


def test_equal_width_bins_match_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(1)
    conf = rng.uniform(0.01, 0.99, 2000)
    conf = conf[np.abs(conf * 10 - np.round(conf * 10)) > 1e-6]  # away from the edges
    corr = rng.random(len(conf)) < conf**2
    prob_true, prob_pred = calibration_curve(corr, conf, n_bins=10, strategy="uniform")
    stats = m.binned_stats(conf, corr, n_bins=10, binning="equal_width")
    ok = stats.count > 0
    np.testing.assert_allclose(stats.acc[ok], prob_true, atol=1e-12)
    np.testing.assert_allclose(stats.conf[ok], prob_pred, atol=1e-12)


def test_top_label_ece_matches_netcal():
    netcal = pytest.importorskip("netcal.metrics")
    probs, labels, conf, correct = _synthetic(3000, k=3, seed=2)
    ours = m.ece(conf, correct, n_bins=10, binning="equal_width")
    theirs = netcal.ECE(bins=10).measure(probs, labels)
    assert ours == pytest.approx(theirs, abs=1e-9)


# --- properties -----------------------------------------------------------------------------


def test_invariant_to_example_order():
    probs, labels, conf, correct = _synthetic(300, k=3, seed=3)
    perm = np.random.default_rng(0).permutation(300)
    for binning in ("equal_mass", "equal_width"):
        assert m.ece(conf[perm], correct[perm], binning=binning) == pytest.approx(m.ece(conf, correct, binning=binning), abs=1e-12)
    assert m.sce(probs[perm], labels[perm]) == pytest.approx(m.sce(probs, labels), abs=1e-12)
    assert m.mce(probs[perm], labels[perm]) == pytest.approx(m.mce(probs, labels), abs=1e-12)
    assert m.auroc(conf[perm], correct[perm]) == pytest.approx(m.auroc(conf, correct), abs=1e-12)
    assert m.aurc(conf[perm], correct[perm]) == pytest.approx(m.aurc(conf, correct), abs=1e-12)


def test_duplicated_rows_equal_weight_two():
    probs, labels, conf, correct = _synthetic(200, k=3, seed=4)
    twice = np.repeat(np.arange(200), 2)
    assert m.ece(conf[twice], correct[twice], binning="equal_width") == pytest.approx(m.ece(conf, correct, binning="equal_width"))
    assert m.sce(probs[twice], labels[twice]) == pytest.approx(m.sce(probs, labels))
    assert m.brier(probs[twice], labels[twice]) == pytest.approx(m.brier(probs, labels))
    assert m.auroc(conf[twice], correct[twice]) == pytest.approx(m.auroc(conf, correct))


def _reference_equal_mass(values, target, n_bins):
    """The definition, literally: stable argsort, numpy.array_split, per-group means."""
    order = np.argsort(values, kind="stable")
    groups = np.array_split(order, n_bins)
    return [(len(g), values[g].mean() if len(g) else np.nan, target[g].mean() if len(g) else np.nan) for g in groups]


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15])
def test_equal_mass_bins_match_the_literal_definition_under_ties(n_bins):
    rng = np.random.default_rng(5)
    for values in (rng.random(1000), rng.integers(0, 7, 1000) / 7, np.full(37, 0.5), np.array([0.3]), rng.integers(0, 3, 8) / 2):
        target = rng.random(len(values)) < 0.6
        stats = m.binned_stats(values, target, n_bins=n_bins)
        ref = _reference_equal_mass(values, target, n_bins)
        np.testing.assert_array_equal(stats.count, [r[0] for r in ref])
        np.testing.assert_allclose(stats.conf, [r[1] for r in ref], atol=1e-12)
        np.testing.assert_allclose(stats.acc, [r[2] for r in ref], atol=1e-12)


def test_equal_mass_bins_match_the_literal_definition_on_a_large_tied_array():
    # Many tie runs straddle the bin boundaries of a large array.
    rng = np.random.default_rng(6)
    values = rng.integers(0, 7, 30_000) / 7
    target = rng.random(len(values)) < 0.6
    stats = m.binned_stats(values, target, n_bins=10)
    ref = _reference_equal_mass(values, target, 10)
    np.testing.assert_array_equal(stats.count, [r[0] for r in ref])
    np.testing.assert_allclose(stats.acc, [r[2] for r in ref], atol=1e-12)
    np.testing.assert_allclose(stats.conf, [r[1] for r in ref], atol=1e-12)


@pytest.mark.parametrize("n_bins", [1, 2, 3, 10, 15])
def test_bucketed_values_give_the_same_bins_as_the_full_sort(n_bins):
    rng = np.random.default_rng(8)
    for values in (
        rng.random(500),
        rng.integers(0, 7, 500) / 7,
        np.full(37, 0.5),
        np.array([0.3]),
        np.array([-0.0, 0.0, 1.0, 0.0, 1.0, 0.5, 0.1]),
        rng.integers(0, 3, 8) / 2,
    ):
        target = rng.random(len(values)) < 0.4
        for binning in ("equal_mass", "equal_width"):
            full = bin_stats(values, target, n_bins, binning, OrderedValues(values, target))
            part = bin_stats(values, target, n_bins, binning, BucketedValues(values, target, n_bins))
            for field in ("count", "conf", "acc", "lower", "upper"):
                np.testing.assert_allclose(getattr(part, field), getattr(full, field), atol=1e-12, err_msg=f"{binning} {field}")


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: m.ece([0.5, float("nan")], [True, False]), "`confidence` must be finite"),
        (lambda: m.ece([0.5, 1.2], [True, False]), r"`confidence` must hold probabilities in \[0, 1\]; got 1.2"),
        (lambda: m.ece([-0.1], [True]), "`confidence` must hold probabilities"),
        (lambda: m.ece([0.5, 0.6], [True]), "`confidence` has 2, `correct` has 1"),
        (lambda: m.ece([], []), "`confidence` must not be empty"),
        (lambda: m.ece([0.5], [2]), "`correct` must be booleans"),
        (lambda: m.ece([0.5], [True], n_bins=0), "`n_bins` must be a positive integer"),
        (lambda: m.ece([0.5], [True], binning="quantile"), "`binning` must be one of"),
        (lambda: m.sce([[0.5, 0.5]], [2]), r"`labels` must be class indices in \[0, 2\); got 2"),
        (lambda: m.brier([[0.5, 0.5]], [-1]), "`labels` must be class indices"),
        (lambda: m.nll([[0.5, 0.5]], [0.5]), "`labels` must be integer class indices"),
        (lambda: m.brier([[0.5, 0.6]], [0]), "`class_probs` rows must sum to 1"),
        (lambda: m.mce([[0.5, 0.5], [0.5, 0.5]], [0]), "`class_probs` has 2, `labels` has 1"),
        (lambda: m.sce([0.5, 0.5], [0, 1]), r"`class_probs` must have shape \(n, K\)"),
        (lambda: m.auroc([[0.5]], [True]), r"`confidence` must have shape \(n,\)"),
        (lambda: m.overconfidence_ratio([0.5], threshold=2), "`threshold` must be a number in"),
        (lambda: m.bootstrap_ci(m.accuracy, [True], n_resamples=0), "`n_resamples` must be a positive integer"),
        (lambda: m.bootstrap_ci(m.accuracy, [True], level=1.5), r"`level` must be in \(0, 1\)"),
    ],
)
def test_invalid_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- bootstrap, summaries -------------------------------------------------------------------


def test_bootstrap_ci_is_seeded_and_brackets_the_value():
    _, _, conf, correct = _synthetic(400, seed=6)
    low, high = m.bootstrap_ci(m.ece, conf, correct, n_resamples=200, seed=1)
    assert (low, high) == m.bootstrap_ci(m.ece, conf, correct, n_resamples=200, seed=1)
    assert (low, high) != m.bootstrap_ci(m.ece, conf, correct, n_resamples=200, seed=2)
    assert low < m.ece(conf, correct) < high
    # A wider level gives a wider interval.
    low90, high90 = m.bootstrap_ci(m.ece, conf, correct, n_resamples=200, seed=1, level=0.5)
    assert low <= low90 <= high90 <= high


def _records(n: int, seed: int = 0) -> list[PredictionRecord]:
    probs, labels, conf, correct = _synthetic(n, k=2, seed=seed)
    names = ["Safe", "Unsafe"]
    out = []
    for i in range(n):
        pred = int(np.argmax(probs[i]))
        # Full-vocabulary option probabilities: half the mass elsewhere in the vocabulary.
        option = (probs[i] * 0.5).tolist()
        out.append(PredictionRecord(
            id=str(i), task="toy", split="test", label=names[labels[i]], prediction=names[pred],
            correct=bool(pred == labels[i]), valid=i % 10 != 0, confidence=float(option[pred]),
            option_probs=option, labels=names,
        ))
    return out


def test_summarize_keys_and_values():
    records = _records(120)
    s = m.summarize(records)
    assert tuple(s) == m.SUMMARY_KEYS
    assert all(isinstance(v, float) for k, v in s.items() if k != "n") and s["n"] == 120
    conf = np.array([r.confidence for r in records])
    corr = np.array([r.correct for r in records])
    assert s["ece"] == pytest.approx(m.ece(conf, corr))
    assert s["ece_equal_width"] == pytest.approx(m.ece(conf, corr, binning="equal_width"))
    assert s["aurc"] == pytest.approx(m.aurc(conf, corr))
    assert s["invalid_rate"] == pytest.approx(12 / 120)
    assert s["mean_confidence"] == pytest.approx(conf.mean())
    # class distributions are the renormalised option_probs
    probs = np.array([r.option_probs for r in records]) * 2
    labels = np.array([r.labels.index(r.label) for r in records])
    assert s["brier"] == pytest.approx(m.brier(probs, labels))


def test_metrics_report_shape_and_nulls():
    records = _records(60)
    rep = m.metrics_report(records, n_resamples=50, seed=3)
    assert {k: rep[k] for k in ("n", "n_bins", "binning", "bootstrap", "level", "seed")} == {
        "n": 60, "n_bins": 10, "binning": "equal_mass", "bootstrap": 50, "level": 0.95, "seed": 3}
    assert list(rep["metrics"]) == [k for k in m.SUMMARY_KEYS if k != "n"]
    for value in rep["metrics"].values():
        assert value["ci_low"] <= value["value"] + 1e-9 or value["value"] is None
    assert rep == m.metrics_report(records, n_resamples=50, seed=3)
    plain = m.metrics_report(records, n_resamples=0)
    assert all(v["ci_low"] is None and v["ci_high"] is None for v in plain["metrics"].values())
    # Undefined AUROC (all correct) is null in JSON, not nan.
    right = [r for r in records if r.correct]
    with pytest.warns(UserWarning):
        assert m.metrics_report(right, n_resamples=0)["metrics"]["auroc"]["value"] is None


def test_summarize_accepts_record_arrays():
    from decal.records import records_to_arrays

    records = _records(40, seed=2)
    arrays = records_to_arrays(records)
    assert isinstance(arrays, RecordArrays)
    assert m.summarize(arrays) == m.summarize(records)


def test_metrics_report_bootstrap_is_reproducible_and_brackets_the_values():
    records = _records(1200, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = m.metrics_report(records, n_resamples=200, seed=3)
        again = m.metrics_report(records, n_resamples=200, seed=3)
    assert first == again
    for key, entry in first["metrics"].items():
        if entry["ci_low"] is not None:
            assert entry["ci_low"] - 1e-9 <= entry["value"] <= entry["ci_high"] + 1e-9, key
