"""decal.binning's bucketed path (large arrays, SCE/MCE class columns) against the literal
definitions, on random data with ties, -0.0, 0.0, 1.0 and values on the equal-width edges.

The reference is the definition computed the slow, obvious way in float64: equal mass = stable
argsort + ``numpy.array_split``; equal width = each value compared with the edges ``i / M``.
Counts, target sums (of 0/1) and bin ranges must be equal exactly. Value sums (and the means made
of them) are compared with ``rtol = n eps``: each side adds at most n non-negative values in some
order, whose relative rounding error is at most (n - 1) eps/2, so the two differ by less than
n eps of the sum. SCE and MCE^2 follow in the last test.
"""

from __future__ import annotations

import numpy as np
import pytest

from decal import metrics
from decal.binning import BUCKETED_FROM, BucketedValues, OrderedValues, bin_stats, bucket_columns

EPS = np.finfo(np.float64).eps


def _reference(values, target, n_bins):
    """{binning: (count, value sum, target sum, lower, upper)} by the definition."""
    groups = np.array_split(np.argsort(values, kind="stable"), n_bins)
    mass = [np.array(x, dtype=float) for x in zip(*[
        (len(g), values[g].sum(), target[g].sum(), values[g].min() if len(g) else np.nan, values[g].max() if len(g) else np.nan)
        for g in groups
    ])]
    edges = np.arange(n_bins + 1) / n_bins
    which = np.clip(np.sum(values[:, None] >= edges[None, 1:-1], axis=1), 0, n_bins - 1)  # [i/M, (i+1)/M), last closed
    width = [np.bincount(which, weights=w, minlength=n_bins) for w in (None, values, target.astype(float))]
    return {"equal_mass": mass, "equal_width": [*width, edges[:-1], edges[1:]]}


def _assert_same_bins(sv, values, target, n_bins):
    ref = _reference(values, target, n_bins)
    for binning in ("equal_mass", "equal_width"):
        count, value_sum, target_sum, lower, upper = sv.bin_sums(n_bins, binning)
        r_count, r_value, r_target, r_lower, r_upper = ref[binning]
        np.testing.assert_array_equal(count, r_count, err_msg=binning)
        np.testing.assert_array_equal(target_sum, r_target, err_msg=binning)  # sums of 0/1: exact
        np.testing.assert_allclose(value_sum, r_value, rtol=len(values) * EPS, atol=0, err_msg=binning)
        np.testing.assert_array_equal(lower, r_lower, err_msg=binning)
        np.testing.assert_array_equal(upper, r_upper, err_msg=binning)


def _samples(rng, n):
    """Value arrays that stress the bucketed path: continuous, heavily tied, skewed to 0 like class
    probabilities, all equal, and exactly on the edges, each with -0.0, 0.0 and 1.0 mixed in."""
    logits = rng.normal(size=(n, 4)) * 3
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    arrays = {
        "uniform": rng.random(n),
        "ties of k/7": rng.integers(0, 8, n) / 7,
        "class probabilities": softmax[:, 0],
        "all 0.5": np.full(n, 0.5),
        "edges i/10": rng.integers(0, 11, n) / 10,
        "tiny": rng.random(n) * 1e-300,
        "subnormal": rng.random(n) * 1e-310,
    }
    for name, values in arrays.items():
        if name != "all 0.5":
            where = rng.choice(n, size=30, replace=False)
            values[where[:10]], values[where[10:20]], values[where[20:]] = -0.0, 0.0, 1.0
        yield name, values


@pytest.mark.parametrize("n_bins", [1, 2, 3, 10, 15, 100])
def test_bucketed_values_equal_the_definition(n_bins):
    rng = np.random.default_rng(n_bins)
    for name, values in _samples(rng, 30_000):
        target = rng.random(len(values)) < 0.4
        sv = BucketedValues(values, target, n_bins)
        if name in ("uniform", "class probabilities") and n_bins <= 15:
            assert sv.split_examples < len(values) / 5, name  # the buckets did not just sort everything
        _assert_same_bins(sv, values, target, n_bins)


def test_bucket_columns_equal_the_definition_per_column():
    # All class columns from one pass, with the target of column k where label == k.
    rng = np.random.default_rng(1)
    n, k = 25_000, 4
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:50, 0], probs[:50, 1:] = 1.0, 0.0  # ties at the ends
    probs[50:60] = [0.4, 0.3, 0.2, 0.1]  # on the equal-width edges of 10 bins
    labels = rng.integers(0, k, n)
    gold = probs[np.arange(n), labels]
    for columns in (bucket_columns(probs, labels, 10), bucket_columns(probs, labels, 10, true_values=gold)):
        for j, sv in enumerate(columns):
            _assert_same_bins(sv, probs[:, j], labels == j, 10)


def test_crowded_columns_are_sorted_and_give_the_same_bins():
    # A confident model's columns crowd next to 0 and 1 (near 1.0 a bucket is 1/512 wide), so
    # most examples would sit in split buckets: such a column is sorted instead.
    rng = np.random.default_rng(2)
    n = 40_000
    spread = rng.dirichlet(np.ones(3), size=n)
    confident = np.where(rng.random(n) < 0.5, 1 - rng.random(n) * 1e-3, rng.random(n) * 1e-3)
    probs = np.column_stack([confident, 1 - confident])
    for values, kinds in ((spread, [BucketedValues] * 3), (probs, [OrderedValues] * 2)):
        labels = rng.integers(0, values.shape[1], n)
        columns = bucket_columns(values, labels, 10)
        assert [type(c) for c in columns] == kinds
        for j, sv in enumerate(columns):
            _assert_same_bins(sv, values[:, j], labels == j, 10)
    assert BUCKETED_FROM <= n  # metrics.sce and mce take this path for such arrays


def _reference_sce_mce(probs, labels, n_bins):
    """SCE and MCE as the metrics module docstring defines them, from `_reference` bins."""
    n, k = probs.shape
    sce = mce = 0.0
    for j in range(k):
        ref = _reference(probs[:, j], labels == j, n_bins)
        count, value, target = ref["equal_width"][:3]
        sce += np.sum(np.abs(target - value)) / n  # sum_b n_b/n |acc - conf| = sum_b |T_b - S_b| / n
        count, value, target = ref["equal_mass"][:3]
        ok = count > 0
        mce += np.sum((target[ok] - value[ok]) ** 2 / count[ok]) / n
    return sce / k, np.sqrt(mce / k)


def test_sce_and_mce_on_the_fast_path_equal_the_definition():
    rng = np.random.default_rng(3)
    n, k = 40_000, 5
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:100] = np.eye(k)[rng.integers(0, k, 100)]  # one-hot rows: ties at 0.0 and 1.0
    labels = rng.integers(0, k, n)
    sce, mce = _reference_sce_mce(probs, labels, 10)
    # A bin's value sum S_b differs by less than n_b eps S_b <= n_b^2 eps between the two sides
    # (module docstring), so SCE = sum_b |T_b - S_b| / (n K) by less than sum_b n_b^2 eps / (n K)
    # <= n eps, and MCE^2 = sum_b (T_b - S_b)^2 / (n_b n K), whose terms change by at most
    # 2 |T_b - S_b| / n_b <= 2 times that, by less than 2 n eps.
    summary = metrics.summarize(_record_arrays(probs, labels))
    for got_sce, got_mce in ((metrics.sce(probs, labels), metrics.mce(probs, labels)), (summary["sce"], summary["mce"])):
        assert got_sce == pytest.approx(sce, rel=0, abs=n * EPS)
        assert got_mce**2 == pytest.approx(mce**2, rel=0, abs=2 * n * EPS)


def _record_arrays(probs, labels):
    from decal.records import RecordArrays

    pred = probs.argmax(1)
    return RecordArrays(confidence=probs.max(1), correct=pred == labels, valid=np.ones(len(labels), bool),
                        option_probs=probs, class_probs=probs, label_index=labels, prediction_index=pred,
                        labels=tuple(map(str, range(probs.shape[1]))))


def test_bin_stats_of_bucketed_and_sorted_orderings_agree():
    rng = np.random.default_rng(4)
    values = rng.integers(0, 50, 30_000) / 49
    target = rng.random(len(values)) < 0.5
    for binning in ("equal_mass", "equal_width"):
        a = bin_stats(values, target, 10, binning, BucketedValues(values, target, 10))
        b = bin_stats(values, target, 10, binning, OrderedValues(values, target))
        for field in ("count", "lower", "upper"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        np.testing.assert_allclose(a.conf, b.conf, rtol=len(values) * EPS, atol=0)
        np.testing.assert_array_equal(a.acc, b.acc)  # counts of 0/1 over equal counts
    with pytest.raises(ValueError, match="bucketed for 10 bins, asked for 5"):
        BucketedValues(values, target, 10).bin_sums(5, "equal_mass")
