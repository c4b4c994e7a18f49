"""Calibration and selective-prediction metrics on plain arrays (DESIGN.md, "Metrics").

Every function takes array-likes and returns a Python ``float`` fraction (reports multiply by
100). Notation: ``n`` examples, ``K`` classes, ``M = n_bins`` bins, ``acc(B)`` the mean of the
target in bin ``B`` and ``conf(B)`` the mean confidence in ``B``.

- Binning. ``"equal_mass"`` (the paper's "bins of equal size", a.k.a. adaptive binning):
  stable-sort by value and split into ``M`` contiguous groups with ``numpy.array_split``; when
  ``n < M`` the extra groups are empty and contribute 0. ``"equal_width"``: bins
  ``[i/M, (i+1)/M)``, the last one closed at 1.0.
- ECE (top-label): ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|`` over ``confidence`` / ``correct``.
- Maximum calibration error: ``max_b |acc(B_b) - conf(B_b)|`` over non-empty bins.
- SCE (static calibration error, Nixon et al. 2019): for each class k, equal-width bins over
  ``class_probs[:, k]`` with target ``1[label = k]``; ``SCE = (1/K) sum_k sum_b (n_bk/n)
  |acc_bk - conf_bk|``.
- MCE (marginal calibration error, Kumar et al. 2019): as SCE with equal-mass bins and the
  squared form, ``sqrt((1/K) sum_k sum_b (n_bk/n) (acc_bk - conf_bk)^2)``, no debiasing.
- AUROC: the probability that a correct prediction has higher confidence than a wrong one (ties
  count 1/2), i.e. ``sklearn.metrics.roc_auc_score(correct, confidence)``, computed here from
  average ranks (Mann-Whitney U) because it is called thousands of times by the bootstrap.
- Brier: ``mean_i sum_k (class_probs[i, k] - 1[label_i = k])^2`` (0 to 2).
- NLL: ``mean_i -log class_probs[i, label_i]``, with probabilities clipped below at the float64
  machine epsilon (as ``sklearn.metrics.log_loss``) so a zero probability gives 36.04, not inf.
- Overconfidence ratio: fraction of predictions with ``confidence > threshold`` (0.99).
- Risk-coverage: accept the predictions with ``confidence >= t``, for each distinct confidence
  ``t`` from high to low; coverage is the accepted fraction and risk the error rate among them.
  AURC is the area under that step curve: each example contributes ``risk / n`` at the coverage
  where it is first accepted, which equals Geifman & El-Yaniv's mean of ``risk@k`` when there
  are no ties, and makes tied confidences count as one threshold.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

__all__ = [
    "Binning",
    "BinStats",
    "accuracy",
    "ece",
    "expected_calibration_error",
    "sce",
    "static_calibration_error",
    "mce",
    "marginal_calibration_error",
    "max_calibration_error",
    "auroc",
    "brier",
    "nll",
    "overconfidence_ratio",
    "risk_coverage",
    "aurc",
    "bootstrap_ci",
    "binned_stats",
    "summarize",
    "metrics_report",
    "SUMMARY_KEYS",
]

Binning = Literal["equal_mass", "equal_width"]
_BINNINGS = ("equal_mass", "equal_width")
_EPS = float(np.finfo(np.float64).eps)

# The keys of `summarize`, in the order reports print them; other modules code against them.
SUMMARY_KEYS = (
    "n",
    "accuracy",
    "ece",
    "ece_equal_width",
    "sce",
    "mce",
    "max_calibration_error",
    "auroc",
    "brier",
    "nll",
    "overconfidence_ratio",
    "invalid_rate",
    "aurc",
    "mean_confidence",
)


# ---------------------------------------------------------------------------------------------
# Validation, once, at the public boundary; private kernels below assume valid input.


def _where(bad: np.ndarray) -> str:
    """'index 3' or 'row 3, column 1' for the first True entry of a mask."""
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"index {pos[0]}" if len(pos) == 1 else f"row {pos[0]}, column {pos[1]}"


def _first(arr: np.ndarray, bad: np.ndarray):
    return arr[tuple(np.argwhere(bad)[0])].item()


def _as_float_array(x, name: str, *, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{name}` must be numeric; got {type(x).__name__}. Pass an array of numbers.") from e
    if arr.ndim != ndim:
        shape = "(n,)" if ndim == 1 else "(n, K)"
        raise ValueError(f"`{name}` must have shape {shape}; got shape {arr.shape}.")
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` must not be empty; got 0 examples.")
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"`{name}` must be finite; got {_first(arr, ~finite)!r} at {_where(~finite)}.")
    return arr


def _check_probabilities(x, name: str, *, ndim: int = 1) -> np.ndarray:
    """A finite float array with values in [0, 1]."""
    arr = _as_float_array(x, name, ndim=ndim)
    outside = (arr < 0.0) | (arr > 1.0)
    if outside.any():
        raise ValueError(f"`{name}` must hold probabilities in [0, 1]; got {_first(arr, outside)!r} at {_where(outside)}.")
    return arr


def _check_class_probs(x, name: str = "class_probs") -> np.ndarray:
    """An (n, K) array of distributions: K >= 2, rows in [0, 1] summing to 1."""
    arr = _check_probabilities(x, name, ndim=2)
    if arr.shape[1] < 2:
        raise ValueError(f"`{name}` must have at least 2 classes (columns); got shape {arr.shape}.")
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > 1e-5
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(
            f"`{name}` rows must sum to 1; row {i} sums to {sums[i].item()!r}. Renormalise option_probs "
            "(decal.records.records_to_arrays gives class_probs)."
        )
    return arr


def _check_correct(x, name: str = "correct") -> np.ndarray:
    """A boolean array; accepts bools or numbers that are exactly 0 or 1."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must have shape (n,); got shape {arr.shape}.")
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` must not be empty; got 0 examples.")
    if arr.dtype == bool:
        return arr
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{name}` must be booleans (or 0/1); got dtype {arr.dtype}.") from e
    bad = ~((num == 0.0) | (num == 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"`{name}` must be booleans (or 0/1); got {arr[i].item()!r} at index {i}.")
    return num == 1.0


def _check_labels(x, n_classes: int, name: str = "labels") -> np.ndarray:
    """Integer class indices in [0, n_classes)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must have shape (n,); got shape {arr.shape}.")
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` must not be empty; got 0 examples.")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"`{name}` must be integer class indices; got dtype {arr.dtype}.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            i = int(np.argmax(~np.isfinite(arr) | (arr != np.round(arr))))
            raise ValueError(f"`{name}` must be integer class indices; got {arr[i].item()!r} at index {i}.")
    out = arr.astype(np.int64)
    bad = (out < 0) | (out >= n_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"`{name}` must be class indices in [0, {n_classes}); got {arr[i].item()!r} at index {i} "
            f"(class_probs has {n_classes} columns)."
        )
    return out


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"`{k}` has {v}" for k, v in lengths.items())
        raise ValueError(f"arguments must have the same number of examples; {desc}.")


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer; got {n_bins!r}.")
    return int(n_bins)


def _check_binning(binning) -> str:
    if binning not in _BINNINGS:
        raise ValueError(f"`binning` must be one of {list(_BINNINGS)}; got {binning!r}.")
    return binning


def _check_conf_correct(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = _check_probabilities(confidence, "confidence")
    corr = _check_correct(correct)
    _check_same_length(confidence=conf, correct=corr)
    return conf, corr


def _check_probs_labels(class_probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = _check_class_probs(class_probs)
    labs = _check_labels(labels, probs.shape[1])
    _check_same_length(class_probs=probs, labels=labs)
    return probs, labs


# ---------------------------------------------------------------------------------------------
# The binning core shared by every binned metric and the reliability diagram.


@dataclass(frozen=True)
class BinStats:
    """Per-bin statistics of one binning (arrays of shape (M,); nan where a bin is empty).

    count: examples per bin; conf: mean value (confidence); acc: mean target (accuracy);
    lower/upper: the bin's range -- the fixed edges for equal width, the smallest and largest
    value in the bin for equal mass.
    """

    count: np.ndarray
    conf: np.ndarray
    acc: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """``acc - conf`` per bin (negative = overconfident)."""
        return self.acc - self.conf


def _stable_argsort(values: np.ndarray) -> np.ndarray:
    """``np.argsort(values, kind="stable")`` for 1-D input, about 4x faster.

    The SIMD quicksort is not stable, so only the elements inside runs of equal values are
    re-ordered by index afterwards; without ties the quicksort order is already the stable one.
    """
    order = np.argsort(values, kind="quicksort")
    s = values[order]
    same = s[1:] == s[:-1]
    if not same.any():
        return order
    tied = np.zeros(len(s), dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    run_id = np.cumsum(np.concatenate([[True], ~same]))[tied]
    sub = order[tied]
    # Runs are already in value order; inside a run, order by original index (unique keys).
    order[tied] = sub[np.argsort(run_id.astype(np.int64) * len(values) + sub, kind="quicksort")]
    return order


def _equal_mass_sums(values: np.ndarray, target: np.ndarray, n_bins: int, order: np.ndarray | None):
    """Counts and sums per equal-mass bin, for 1-D (n,) values; see `_binned_stats`."""
    n = values.shape[0]
    if order is None:
        order = _stable_argsort(values)
    sorted_v = values[order]
    # numpy.array_split sizes: the first n % M groups get one extra element.
    sizes = np.full(n_bins, n // n_bins, dtype=np.int64)
    sizes[: n % n_bins] += 1
    ends = np.cumsum(sizes)
    starts = ends - sizes
    cum_v = np.concatenate([[0.0], np.cumsum(sorted_v)])
    cum_t = np.concatenate([[0.0], np.cumsum(target[order])])
    nonempty = sizes > 0
    lower = np.full(n_bins, np.nan)
    upper = np.full(n_bins, np.nan)
    lower[nonempty] = sorted_v[starts[nonempty]]
    upper[nonempty] = sorted_v[ends[nonempty] - 1]
    return sizes.astype(np.float64), cum_v[ends] - cum_v[starts], cum_t[ends] - cum_t[starts], lower, upper


def _equal_width_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value for bins [i/M, (i+1)/M), the last closed at 1.0."""
    idx = (values * n_bins).astype(np.int64)
    np.clip(idx, 0, n_bins - 1, out=idx)
    # values * M can round across an edge; compare with the edges i/M themselves.
    idx -= values < idx / n_bins
    idx += (values >= (idx + 1) / n_bins) & (idx < n_bins - 1)
    return idx


def _equal_width_sums(values: np.ndarray, target: np.ndarray, n_bins: int):
    """Counts and sums per equal-width bin, for 1-D (n,) values; see `_binned_stats`."""
    idx = _equal_width_index(values, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_v = np.bincount(idx, weights=values, minlength=n_bins)
    sum_t = np.bincount(idx, weights=target, minlength=n_bins)
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    return count, sum_v, sum_t, edges[:-1], edges[1:]


def _binned_stats(values, target, n_bins: int, binning: str, order=None) -> BinStats:
    """Bin `values` with `target` (same shape, 0/1): (n,) gives arrays (M,); (n, K) bins each
    column separately and gives arrays (M, K)."""
    target = target.astype(np.float64, copy=False)
    if values.ndim == 2:
        # Contiguous columns: sorting and gathering along a strided axis is several times slower.
        cols = [
            _binned_stats(v, t, n_bins, binning)
            for v, t in zip(np.ascontiguousarray(values.T), np.ascontiguousarray(target.T))
        ]
        return BinStats(*(np.stack([getattr(c, f) for c in cols], axis=1) for f in BinStats.__dataclass_fields__))
    if binning == "equal_mass":
        count, sum_v, sum_t, lower, upper = _equal_mass_sums(values, target, n_bins, order)
    else:
        count, sum_v, sum_t, lower, upper = _equal_width_sums(values, target, n_bins)
    nonempty = count > 0
    safe = np.where(nonempty, count, 1.0)
    conf = np.where(nonempty, sum_v / safe, np.nan)
    acc = np.where(nonempty, sum_t / safe, np.nan)
    return BinStats(count=count, conf=conf, acc=acc, lower=np.asarray(lower), upper=np.asarray(upper))


def binned_stats(confidence, correct, *, n_bins: int = 10, binning: Binning = "equal_mass") -> BinStats:
    """Per-bin count, mean confidence and accuracy, as drawn by the reliability diagram.

    Args:
        confidence: Array of shape (n,), values in [0, 1].
        correct: Array of shape (n,), booleans.
        n_bins: Number of bins M.
        binning: ``"equal_mass"`` or ``"equal_width"`` (module docstring).

    Returns:
        BinStats with arrays of shape (M,).

    Example:
        >>> s = binned_stats([0.1, 0.2, 0.8, 0.9], [0, 1, 1, 1], n_bins=2)
        >>> s.count.tolist(), s.acc.tolist()
        ([2.0, 2.0], [0.5, 1.0])
    """
    conf, corr = _check_conf_correct(confidence, correct)
    return _binned_stats(conf, corr, _check_n_bins(n_bins), _check_binning(binning))


def _weighted_abs_gap(stats: BinStats, n: int) -> float:
    ok = stats.count > 0
    return float(np.sum(stats.count[ok] / n * np.abs(stats.acc[ok] - stats.conf[ok])))


# ---------------------------------------------------------------------------------------------
# Private kernels (valid input) and the public metrics.


def _ece(conf, corr, n_bins, binning, order=None) -> float:
    return _weighted_abs_gap(_binned_stats(conf, corr, n_bins, binning, order), len(conf))


def _max_ce(conf, corr, n_bins, binning, order=None) -> float:
    s = _binned_stats(conf, corr, n_bins, binning, order)
    ok = s.count > 0
    return float(np.max(np.abs(s.acc[ok] - s.conf[ok])))


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((labels.shape[0], n_classes))
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


def _sce(probs, labs, n_bins) -> float:
    s = _binned_stats(probs, _one_hot(labs, probs.shape[1]), n_bins, "equal_width")
    gap = np.where(s.count > 0, np.abs(s.acc - s.conf), 0.0)
    return float(np.sum(s.count / probs.shape[0] * gap) / probs.shape[1])


def _mce(probs, labs, n_bins) -> float:
    s = _binned_stats(probs, _one_hot(labs, probs.shape[1]), n_bins, "equal_mass")
    gap2 = np.where(s.count > 0, (s.acc - s.conf) ** 2, 0.0)
    return float(math.sqrt(np.sum(s.count / probs.shape[0] * gap2) / probs.shape[1]))


def _brier(probs, labs) -> float:
    diff = probs.copy()
    diff[np.arange(len(labs)), labs] -= 1.0
    return float(np.mean(np.sum(diff * diff, axis=1)))


def _nll(probs, labs) -> float:
    p = np.maximum(probs[np.arange(len(labs)), labs], _EPS)
    return float(-np.mean(np.log(p)))


def _groups_desc(conf, order):
    """Sorted-descending confidence with the end index of each tie group (exclusive)."""
    if order is None:
        order = _stable_argsort(conf)
    desc = order[::-1]
    c = conf[desc]
    change = np.flatnonzero(c[1:] != c[:-1]) + 1
    ends = np.append(change, len(c))
    return desc, ends


def _auroc(conf, corr, order=None, *, warn: bool = True) -> float:
    n_pos = int(corr.sum())
    n_neg = len(corr) - n_pos
    if n_pos == 0 or n_neg == 0:
        if warn:
            which = "correct" if n_neg == 0 else "wrong"
            warnings.warn(f"AUROC is undefined: all {len(corr)} predictions are {which}; returning nan.", stacklevel=3)
        return float("nan")
    desc, ends = _groups_desc(conf, order)
    starts = np.concatenate([[0], ends[:-1]])
    # Average rank (1-based, ascending) of each tie group; descending position p has ascending rank n - p.
    n = len(conf)
    avg_rank = n - (starts + ends - 1) / 2.0
    pos_per_group = np.add.reduceat(corr[desc].astype(np.float64), starts)
    rank_sum = float(np.sum(avg_rank * pos_per_group))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _risk_coverage(conf, corr, order=None):
    desc, ends = _groups_desc(conf, order)
    wrong_cum = np.cumsum(~corr[desc])[ends - 1]
    coverage = ends / len(conf)
    risk = wrong_cum / ends
    return coverage, risk, conf[desc][ends - 1]


def _aurc(conf, corr, order=None) -> float:
    coverage, risk, _ = _risk_coverage(conf, corr, order)
    widths = np.diff(np.concatenate([[0.0], coverage]))
    return float(np.sum(risk * widths))


def accuracy(correct) -> float:
    """Fraction of correct predictions.

    Args:
        correct: Array of shape (n,), booleans (or 0/1).

    Example:
        >>> accuracy([True, False, True, True])
        0.75
    """
    return float(np.mean(_check_correct(correct)))


def ece(confidence, correct, *, n_bins: int = 10, binning: Binning = "equal_mass") -> float:
    """Top-label expected calibration error (module docstring; the paper's ECE by default).

    Args:
        confidence: Array of shape (n,), values in [0, 1].
        correct: Array of shape (n,), booleans.
        n_bins: Number of bins M (10).
        binning: ``"equal_mass"`` (paper) or ``"equal_width"``.

    Raises:
        ValueError: naming the argument that is empty, not finite, out of range or mismatched.

    Example:
        Two bins of two: |0.5 - 0.15| and |1.0 - 0.85|, each weighted 1/2.

        >>> round(ece([0.1, 0.2, 0.8, 0.9], [0, 1, 1, 1], n_bins=2), 6)
        0.25
    """
    conf, corr = _check_conf_correct(confidence, correct)
    return _ece(conf, corr, _check_n_bins(n_bins), _check_binning(binning))


expected_calibration_error = ece


def max_calibration_error(confidence, correct, *, n_bins: int = 10, binning: Binning = "equal_mass") -> float:
    """Largest per-bin ``|acc - conf|`` over non-empty bins (arguments as `ece`).

    Example:
        >>> round(max_calibration_error([0.1, 0.2, 0.8, 0.9], [0, 1, 1, 1], n_bins=2), 6)
        0.35
    """
    conf, corr = _check_conf_correct(confidence, correct)
    return _max_ce(conf, corr, _check_n_bins(n_bins), _check_binning(binning))


def sce(class_probs, labels, *, n_bins: int = 10) -> float:
    """Static calibration error over all classes, equal-width bins (module docstring).

    Args:
        class_probs: Array of shape (n, K), rows are distributions over the K options.
        labels: Array of shape (n,), integer gold class indices in [0, K).
        n_bins: Number of equal-width bins per class.

    Example:
        One example, label 0, probs (0.8, 0.2): class 0 gap 0.2, class 1 gap 0.2; mean 0.2.

        >>> round(sce([[0.8, 0.2]], [0]), 6)
        0.2
    """
    probs, labs = _check_probs_labels(class_probs, labels)
    return _sce(probs, labs, _check_n_bins(n_bins))


static_calibration_error = sce


def mce(class_probs, labels, *, n_bins: int = 10) -> float:
    """Marginal calibration error (squared, equal-mass, no debiasing; module docstring).

    Arguments as `sce`.

    Example:
        >>> round(mce([[0.8, 0.2]], [0]), 6)
        0.2
    """
    probs, labs = _check_probs_labels(class_probs, labels)
    return _mce(probs, labs, _check_n_bins(n_bins))


marginal_calibration_error = mce


def auroc(confidence, correct) -> float:
    """Area under the ROC curve of confidence as a detector of correct predictions.

    Equals ``sklearn.metrics.roc_auc_score(correct, confidence)``; ``nan`` with a warning when
    all predictions are correct or all wrong.

    Example:
        >>> auroc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
        0.75
    """
    conf, corr = _check_conf_correct(confidence, correct)
    return _auroc(conf, corr)


def brier(class_probs, labels) -> float:
    """Multi-class Brier score, ``mean_i sum_k (p_ik - y_ik)^2`` (0 best, 2 worst).

    Example:
        >>> round(brier([[0.8, 0.2], [0.5, 0.5]], [0, 1]), 6)
        0.29
    """
    probs, labs = _check_probs_labels(class_probs, labels)
    return _brier(probs, labs)


def nll(class_probs, labels) -> float:
    """Mean negative log-likelihood of the gold class (natural log).

    Example:
        >>> round(nll([[0.5, 0.5], [0.5, 0.5]], [0, 1]), 6)
        0.693147
    """
    probs, labs = _check_probs_labels(class_probs, labels)
    return _nll(probs, labs)


def overconfidence_ratio(confidence, *, threshold: float = 0.99) -> float:
    """Fraction of predictions with ``confidence > threshold``.

    Example:
        >>> overconfidence_ratio([0.995, 0.99, 0.5, 1.0])
        0.5
    """
    conf = _check_probabilities(confidence, "confidence")
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"`threshold` must be a number in [0, 1]; got {threshold!r}.")
    return float(np.mean(conf > threshold))


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The risk-coverage curve, one point per distinct confidence, from high to low.

    Returns:
        ``(coverage, risk, threshold)``, each of shape (d,) for d distinct confidences:
        accepting ``confidence >= threshold[j]`` covers ``coverage[j]`` of the examples with
        error rate ``risk[j]``.

    Example:
        >>> cov, risk, thr = risk_coverage([0.9, 0.8, 0.8, 0.3], [1, 1, 0, 0])
        >>> cov.tolist(), risk.tolist(), thr.tolist()
        ([0.25, 0.75, 1.0], [0.0, 0.3333333333333333, 0.5], [0.9, 0.8, 0.3])
    """
    conf, corr = _check_conf_correct(confidence, correct)
    return _risk_coverage(conf, corr)


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve (module docstring; lower is better).

    Example:
        Risks 0, 1/2, 1/3 at coverages 1/3, 2/3, 1: (0 + 1/2 + 1/3) / 3.

        >>> round(aurc([0.9, 0.8, 0.7], [1, 0, 1]), 6)
        0.277778
    """
    conf, corr = _check_conf_correct(confidence, correct)
    return _aurc(conf, corr)


# ---------------------------------------------------------------------------------------------
# Bootstrap confidence intervals.


def _check_bootstrap(n_resamples, level) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"`n_resamples` must be a positive integer; got {n_resamples!r}.")
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise ValueError(f"`level` must be in (0, 1); got {level!r}.")


def _resample_indices(n: int, n_resamples: int, seed: int):
    """Yield blocks of bootstrap index rows (r, n), at most ~4M indices per block."""
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 22) // max(n, 1))
    done = 0
    while done < n_resamples:
        r = min(rows, n_resamples - done)
        yield rng.integers(0, n, size=(r, n))
        done += r


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    metric: Callable[..., float], *arrays, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(*arrays)``, resampling examples (axis 0).

    Args:
        metric: A function of the arrays returning a float, e.g. `ece`.
        *arrays: Arrays sharing their first dimension n (examples).
        n_resamples: Number of bootstrap resamples (1000).
        seed: Seed of the resampling generator; same seed, same interval.
        level: Two-sided coverage of the interval (0.95).

    Returns:
        ``(low, high)``; resamples where the metric is nan (AUROC of a one-class resample) are
        left out, and ``(nan, nan)`` if all are.

    Example:
        >>> bootstrap_ci(accuracy, [True] * 10, n_resamples=50)
        (1.0, 1.0)
    """
    _check_bootstrap(n_resamples, level)
    if not arrays:
        raise ValueError("`arrays` must hold at least one array to resample.")
    arrs = [np.asarray(a) for a in arrays]
    _check_same_length(**{f"arrays[{i}]": a for i, a in enumerate(arrs)})
    if len(arrs[0]) == 0:
        raise ValueError("`arrays` must not be empty; got 0 examples.")
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        for block in _resample_indices(len(arrs[0]), n_resamples, seed):
            for idx in block:
                values.append(metric(*(a[idx] for a in arrs)))
    return _percentile_interval(np.asarray(values, dtype=np.float64), level)


# ---------------------------------------------------------------------------------------------
# Whole-run summaries.


@dataclass(frozen=True)
class _Arrays:
    confidence: np.ndarray
    correct: np.ndarray
    valid: np.ndarray
    class_probs: np.ndarray
    label_index: np.ndarray

    def take(self, idx: np.ndarray) -> "_Arrays":
        return _Arrays(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def _arrays_of(records) -> _Arrays:
    """Validated arrays from prediction records or a `decal.records.RecordArrays`."""
    from .records import RecordArrays, records_to_arrays

    arr = records if isinstance(records, RecordArrays) else records_to_arrays(list(records))
    conf, corr = _check_conf_correct(arr.confidence, arr.correct)
    probs, labs = _check_probs_labels(arr.class_probs, arr.label_index)
    valid = _check_correct(arr.valid, "valid")
    _check_same_length(confidence=conf, class_probs=probs, valid=valid)
    return _Arrays(conf, corr, valid, probs, labs)


def _summary(a: _Arrays, n_bins: int, binning: str, *, warn: bool = True) -> dict[str, float]:
    """Every summary metric; the confidence sort is computed once and shared."""
    conf, corr = a.confidence, a.correct
    order = _stable_argsort(conf)
    return {
        "n": len(conf),
        "accuracy": float(np.mean(corr)),
        "ece": _ece(conf, corr, n_bins, binning, order if binning == "equal_mass" else None),
        "ece_equal_width": _ece(conf, corr, n_bins, "equal_width"),
        "sce": _sce(a.class_probs, a.label_index, n_bins),
        "mce": _mce(a.class_probs, a.label_index, n_bins),
        "max_calibration_error": _max_ce(conf, corr, n_bins, binning, order if binning == "equal_mass" else None),
        "auroc": _auroc(conf, corr, order, warn=warn),
        "brier": _brier(a.class_probs, a.label_index),
        "nll": _nll(a.class_probs, a.label_index),
        "overconfidence_ratio": float(np.mean(conf > 0.99)),
        "invalid_rate": float(1.0 - np.mean(a.valid)),
        "aurc": _aurc(conf, corr, order),
        "mean_confidence": float(np.mean(conf)),
    }


def summarize(records, *, n_bins: int = 10, binning: Binning = "equal_mass") -> dict[str, float]:
    """All metrics of one run as a flat dict with the keys `SUMMARY_KEYS` (fractions).

    ``ece`` uses `binning`; ``ece_equal_width`` always uses equal-width bins. Invalid
    predictions stay in every metric (they are wrong, with their forced-decision confidence).

    Args:
        records: A sequence of `PredictionRecord` sharing one label set, or a `RecordArrays`.
        n_bins: Bins for every binned metric.
        binning: Binning of ``ece`` and ``max_calibration_error``.
    """
    n_bins, binning = _check_n_bins(n_bins), _check_binning(binning)
    return _summary(_arrays_of(records), n_bins, binning)


def metrics_report(
    records,
    *,
    n_bins: int = 10,
    binning: Binning = "equal_mass",
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """`summarize` plus bootstrap intervals, in the shape of a run's ``metrics.json``.

    Every resample draws the same example indices for all metrics, so intervals of different
    metrics come from the same resamples. With ``n_resamples=0`` the intervals are ``None``.

    Returns:
        ``{"n", "n_bins", "binning", "bootstrap", "level", "seed", "metrics": {key: {"value",
        "ci_low", "ci_high"}}}`` with every `SUMMARY_KEYS` entry except ``n`` under metrics.
    """
    n_bins, binning = _check_n_bins(n_bins), _check_binning(binning)
    if n_resamples != 0:
        _check_bootstrap(n_resamples, level)
    a = _arrays_of(records)
    point = _summary(a, n_bins, binning)
    keys = [k for k in SUMMARY_KEYS if k != "n"]
    intervals: dict[str, tuple] = {k: (None, None) for k in keys}
    if n_resamples:
        draws = {k: [] for k in keys}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for block in _resample_indices(point["n"], n_resamples, seed):
                for idx in block:
                    s = _summary(a.take(idx), n_bins, binning, warn=False)
                    for k in keys:
                        draws[k].append(s[k])
        intervals = {k: _percentile_interval(np.asarray(v, dtype=np.float64), level) for k, v in draws.items()}
    return {
        "n": point["n"],
        "n_bins": n_bins,
        "binning": binning,
        "bootstrap": int(n_resamples),
        "level": float(level),
        "seed": int(seed),
        "metrics": {
            k: {"value": _json_float(point[k]), "ci_low": _json_float(intervals[k][0]), "ci_high": _json_float(intervals[k][1])}
            for k in keys
        },
    }


def _json_float(x) -> float | None:
    """Plain float for JSON; nan (undefined AUROC, empty interval) becomes None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x
