"""Calibration and selective-prediction metrics on plain arrays (docs/design.md, "Metrics").

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
- Against a known truth (records with ``true_probs``, e.g. the `verdicts` task; no bins): with
  ``p*_i = true_probs[i, prediction_i]`` the true probability that prediction i is right, the
  true calibration error ``TCE = mean_i |confidence_i - p*_i|``, its squared form
  ``sqrt(mean_i (confidence_i - p*_i)^2)``, the mean overconfidence ``mean_i (confidence_i - p*_i)``
  (positive: overconfident) and the Bayes-optimal accuracy ``mean_i max_k true_probs[i, k]``.
  A predictor that reports the true probability of its choice has TCE 0. Unlike ECE these
  compare each example with its own right confidence, so they need no bins and are unbiased
  at small n.
- Label mass (docs/design.md, "Label mass"): ``label_mass_i = min(1, sum_k option_probs[i, k])``,
  the raw full-vocabulary probability the options hold together at the decision position (the
  records' stored `label_mass`; clipped, as float32 sums can pass 1 by a few ulps); the mean and
  the share of records below 0.5 (a low mass means the position read is not where the model
  decides). Always on the raw scale, whatever calibrator a run went through.
- Conformal option sets (records with ``option_set``): coverage ``mean_i 1[label_i in set_i]``,
  mean set size, the share of sets with exactly one label (answered alone), and coverage and
  mean size per true class (what a class-conditional, Mondrian, set promises).

Scales. A calibrated run's records keep the raw values beside the calibrated ones
(`decal.records`); `records_to_arrays` gives the calibrated ones to every metric that reads
``confidence`` or ``class_probs``. `METRIC_INPUTS` says which input each metric reads, and
`metrics_report` states the resolved scale of each (``"scale"`` per metric).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from ._checks import check_binning as _check_binning
from ._checks import check_class_probs as _check_class_probs
from ._checks import check_conf_correct as _check_conf_correct
from ._checks import check_correct as _check_correct
from ._checks import check_labels as _check_labels
from ._checks import check_n_bins as _check_n_bins
from ._checks import check_probabilities as _check_probabilities
from ._checks import check_probs_labels as _check_probs_labels
from ._checks import check_same_length as _check_same_length
from .binning import BUCKETED_FROM, BinStats, OrderedValues, bin_stats, bucket_columns

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
    "true_calibration_error",
    "true_calibration_error_rms",
    "mean_overconfidence",
    "bayes_accuracy",
    "mean_label_mass",
    "low_label_mass_share",
    "set_coverage",
    "mean_set_size",
    "bootstrap_ci",
    "binned_stats",
    "summarize",
    "metrics_report",
    "SUMMARY_KEYS",
    "TRUTH_KEYS",
    "SET_KEYS",
    "METRIC_INPUTS",
    "LOW_LABEL_MASS",
    "input_scales",
]

Binning = Literal["equal_mass", "equal_width"]
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
    "mean_label_mass",
    "low_label_mass_share",
)
# Added to `summarize` and `metrics_report` when the records carry `true_probs`.
TRUTH_KEYS = ("tce", "tce_rms", "mean_overconfidence", "bayes_accuracy")
# Added when the records carry conformal option sets, followed by `set_coverage[<label>]` and
# `mean_set_size[<label>]` for each class (over the examples whose gold label it is).
SET_KEYS = ("set_coverage", "mean_set_size", "singleton_share")
# The label mass below which a record counts in `low_label_mass_share`.
LOW_LABEL_MASS = 0.5
# Which input of the records each metric reads (module docstring, "Scales"); per-class set keys
# read "option_set" too.
METRIC_INPUTS = {
    **{k: "prediction" for k in ("accuracy", "invalid_rate")},
    **{k: "confidence" for k in ("ece", "ece_equal_width", "max_calibration_error", "auroc", "aurc",
                                 "overconfidence_ratio", "mean_confidence", "tce", "tce_rms", "mean_overconfidence")},
    **{k: "class_probs" for k in ("sce", "mce", "brier", "nll")},
    **{k: "option_probs" for k in ("mean_label_mass", "low_label_mass_share")},
    **{k: "option_set" for k in SET_KEYS},
    "bayes_accuracy": "true_probs",
}


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
    return bin_stats(conf, corr, _check_n_bins(n_bins), _check_binning(binning))


def _weighted_abs_gap(stats: BinStats, n: int) -> float:
    ok = stats.count > 0
    return float(np.sum(stats.count[ok] / n * np.abs(stats.acc[ok] - stats.conf[ok])))


# ---------------------------------------------------------------------------------------------
# Private kernels (valid input) and the public metrics.


def _ece(conf, corr, n_bins, binning, ordered=None) -> float:
    return _weighted_abs_gap(bin_stats(conf, corr, n_bins, binning, ordered), len(conf))


def _max_gap(stats: BinStats) -> float:
    ok = stats.count > 0
    return float(np.max(np.abs(stats.acc[ok] - stats.conf[ok])))


def _max_ce(conf, corr, n_bins, binning, ordered=None) -> float:
    return _max_gap(bin_stats(conf, corr, n_bins, binning, ordered))


def _sce_mce(probs, labs, n_bins, gold=None) -> tuple[float, float]:
    """SCE and MCE together: both bin each class column, and share its one ordering (a sort
    below `BUCKETED_FROM` examples, else the buckets of all columns from one pass; see
    `decal.binning`). `gold`: `_gold_probs`, if computed already."""
    n, n_classes = probs.shape
    if n >= BUCKETED_FROM:
        columns = bucket_columns(probs, labs, n_bins, true_values=gold)
    else:
        columns = [OrderedValues(probs[:, k], labs == k) for k in range(n_classes)]
    sce_total = mce_total = 0.0
    for k, sv in enumerate(columns):
        sce_total += _weighted_abs_gap(bin_stats(None, None, n_bins, "equal_width", sv), n)
        s = bin_stats(None, None, n_bins, "equal_mass", sv)
        ok = s.count > 0
        mce_total += float(np.sum(s.count[ok] / n * (s.acc[ok] - s.conf[ok]) ** 2))
    return sce_total / n_classes, math.sqrt(mce_total / n_classes)


def _gold_probs(probs, labs) -> np.ndarray:
    """``class_probs[i, label_i]`` (n,)."""
    n, n_classes = probs.shape
    if probs.flags.c_contiguous:  # a flat gather is about a third faster than 2-D fancy indexing
        flat_index = np.arange(0, n * n_classes, n_classes)
        flat_index += labs
        return np.take(probs.reshape(-1), flat_index)
    return probs[np.arange(n), labs]


def _brier(probs, labs, gold=None) -> float:
    # sum_k (p_k - y_k)^2 = sum_k p_k^2 - 2 p_label + 1
    gold = _gold_probs(probs, labs) if gold is None else gold
    return float(np.einsum("ij,ij->", probs, probs)) / len(probs) - 2.0 * float(np.mean(gold)) + 1.0


def _nll(probs, labs, gold=None) -> float:
    gold = _gold_probs(probs, labs) if gold is None else gold
    clipped = np.maximum(gold, _EPS)
    return float(-np.mean(np.log(clipped, out=clipped)))


def _auroc(conf, corr, ordered: OrderedValues | None = None, *, warn: bool = True) -> float:
    n_pos = int(np.count_nonzero(corr))
    n_neg = len(corr) - n_pos
    if n_pos == 0 or n_neg == 0:
        if warn:
            which = "correct" if n_neg == 0 else "wrong"
            warnings.warn(f"AUROC is undefined: all {len(corr)} predictions are {which}; returning nan.", stacklevel=3)
        return float("nan")
    sv = ordered if ordered is not None else OrderedValues(conf, corr)
    # Mann-Whitney U. In the key sort a positive at position i has i - j wrong examples before it
    # (j: its index among the positives), and these include every tied wrong example, since the
    # key sort puts them first in a tie run; a tie counts 1/2, so take half of the tied pairs back.
    pos_idx = np.flatnonzero(sv.t)
    u = float(np.sum(pos_idx, dtype=np.float64)) - n_pos * (n_pos - 1) / 2.0
    if sv.run_ends is not None:
        size = np.diff(sv.run_ends, prepend=0).astype(np.float64)
        pos = np.diff(np.searchsorted(pos_idx, sv.run_ends), prepend=0).astype(np.float64)
        u -= 0.5 * float(np.sum(pos * (size - pos)))
    return u / (n_pos * n_neg)


def _risk_coverage(conf, corr, ordered: OrderedValues | None = None):
    sv = ordered if ordered is not None else OrderedValues(conf, corr)
    n = len(sv.all)
    first = np.flatnonzero(np.concatenate([[True], sv.all[1:] != sv.all[:-1]]))[::-1]  # tie runs, high to low
    accepted = n - first
    # Correct predictions accepted from a run on: all positives minus those sorted before it.
    pos_before = np.concatenate([[0], np.cumsum(sv.t, dtype=np.int64)])[first]
    right = sv.n_pos - pos_before
    return accepted / n, (accepted - right) / accepted, sv.all[first]


def _aurc(conf, corr, ordered: OrderedValues | None = None) -> float:
    # The area under the risk-coverage step curve without building it: accepting the top k
    # examples, with e_k errors among them, is a point (k/n, e_k/k) wherever k ends a tie run,
    # and each run adds its width (size/n) times that risk.
    sv = ordered if ordered is not None else OrderedValues(conf, corr)
    n = len(sv.all)
    errors_top = np.cumsum(~sv.t[::-1], dtype=np.int64)  # errors among the top k, k = 1..n
    if sv.run_ends is None:  # sum_k errors_top[k] / k, in one pass that casts the counts as it goes
        return float(np.einsum("i,i->", errors_top, 1.0 / np.arange(1, n + 1, dtype=np.float64))) / n
    k = (n - sv.run_ends[::-1][1:])  # runs from high to low: the top k ends at each run's lower end
    k = np.append(k, n)
    width = np.diff(k, prepend=0)
    return float(np.sum(errors_top[k - 1] / k * width)) / n


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
    return _sce_mce(probs, labs, _check_n_bins(n_bins))[0]


static_calibration_error = sce


def mce(class_probs, labels, *, n_bins: int = 10) -> float:
    """Marginal calibration error (squared, equal-mass, no debiasing; module docstring).

    Arguments as `sce`.

    Example:
        >>> round(mce([[0.8, 0.2]], [0]), 6)
        0.2
    """
    probs, labs = _check_probs_labels(class_probs, labels)
    return _sce_mce(probs, labs, _check_n_bins(n_bins))[1]


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
# Label mass and option sets (module docstring).


def mean_label_mass(option_probs) -> float:
    """Mean over examples of the options' summed full-vocabulary probability.

    Args:
        option_probs: Array of shape (n, K), the raw full-vocabulary `option_probs` (not renormalised).

    Example:
        >>> mean_label_mass([[0.5, 0.25], [0.125, 0.125]])  # (0.75 + 0.25) / 2
        0.5
    """
    return float(np.mean(_row_mass(option_probs)))


def low_label_mass_share(option_probs, *, threshold: float = LOW_LABEL_MASS) -> float:
    """Share of examples whose options hold less than `threshold` of the probability together.

    Example:
        >>> low_label_mass_share([[0.6, 0.3], [0.01, 0.02], [0.2, 0.2]])
        0.6666666666666666
    """
    mass = _row_mass(option_probs)
    return float(np.count_nonzero(mass < threshold) / len(mass))


def _row_mass(option_probs) -> np.ndarray:
    """Each row's label mass: its sum clipped at 1, as records store it (module docstring)."""
    probs = _check_probabilities(option_probs, "option_probs", ndim=2)
    return np.minimum(np.einsum("ij->i", probs), 1.0)


def _check_sets(option_set, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    sets = np.asarray(option_set)
    if sets.ndim != 2 or sets.shape[0] == 0 or sets.dtype != bool:
        raise ValueError(f"`option_set` must be a boolean array of shape (n, K); got dtype {sets.dtype}, shape {sets.shape}.")
    if labels is None:
        return sets, None
    labs = _check_labels(labels, sets.shape[1])
    _check_same_length(option_set=sets, labels=labs)
    return sets, labs


def set_coverage(option_set, labels) -> float:
    """Share of examples whose option set holds the gold label.

    Args:
        option_set: Boolean array of shape (n, K), membership of each option in each set.
        labels: Array of shape (n,), gold option indices.

    Example:
        >>> set_coverage([[True, False], [True, True], [False, True]], [0, 1, 0])
        0.6666666666666666
    """
    sets, labs = _check_sets(option_set, labels)
    return float(np.count_nonzero(sets[np.arange(len(labs)), labs]) / len(labs))


def mean_set_size(option_set) -> float:
    """Mean number of options per set.

    Example:
        >>> mean_set_size([[True, False], [True, True], [False, False]])
        1.0
    """
    sets, _ = _check_sets(option_set)
    return float(np.count_nonzero(sets) / len(sets))


# ---------------------------------------------------------------------------------------------
# Metrics against a known truth (module docstring).


def _check_truth(confidence, true_probs, prediction) -> tuple[np.ndarray, np.ndarray]:
    """(confidence (n,), true probability of each prediction (n,)), validated."""
    conf = _check_probabilities(confidence, "confidence")
    truth = _check_class_probs(true_probs, "true_probs")
    pred = _check_labels(prediction, truth.shape[1], "prediction")
    _check_same_length(confidence=conf, true_probs=truth, prediction=pred)
    return conf, _gold_probs(truth, pred)


def _truth_gap(conf, p_star) -> np.ndarray:
    return conf - p_star


def true_calibration_error(confidence, true_probs, prediction) -> float:
    """Mean ``|confidence - true_probs[prediction]|`` (module docstring; 0 is perfect).

    Args:
        confidence: Array of shape (n,), values in [0, 1].
        true_probs: Array of shape (n, K), each row the true distribution over the K options.
        prediction: Array of shape (n,), the predicted option index in [0, K).

    Example:
        True P(chosen option) 0.7 and 0.6, confidences 0.9 and 0.6: (0.2 + 0) / 2.

        >>> round(true_calibration_error([0.9, 0.6], [[0.7, 0.3], [0.4, 0.6]], [0, 1]), 6)
        0.1
    """
    conf, p_star = _check_truth(confidence, true_probs, prediction)
    return float(np.mean(np.abs(_truth_gap(conf, p_star))))


def true_calibration_error_rms(confidence, true_probs, prediction) -> float:
    """The squared form of `true_calibration_error`: ``sqrt(mean (confidence - p*)^2)`` (arguments as there).

    Example:
        >>> round(true_calibration_error_rms([0.9, 0.6], [[0.7, 0.3], [0.4, 0.6]], [0, 1]), 6)
        0.141421
    """
    conf, p_star = _check_truth(confidence, true_probs, prediction)
    return math.sqrt(float(np.mean(_truth_gap(conf, p_star) ** 2)))


def mean_overconfidence(confidence, true_probs, prediction) -> float:
    """Mean ``confidence - true_probs[prediction]``: positive when overconfident (arguments as `true_calibration_error`).

    Example:
        0.9 - 0.7 = 0.2 over, 0.5 - 0.6 = -0.1 under: mean 0.05.

        >>> round(mean_overconfidence([0.9, 0.5], [[0.7, 0.3], [0.4, 0.6]], [0, 1]), 6)
        0.05
    """
    conf, p_star = _check_truth(confidence, true_probs, prediction)
    return float(np.mean(_truth_gap(conf, p_star)))


def bayes_accuracy(true_probs) -> float:
    """The Bayes-optimal accuracy, ``mean_i max_k true_probs[i, k]``: the expected accuracy of always
    choosing the most probable option, the best any predictor can expect.

    Args:
        true_probs: Array of shape (n, K), each row the true distribution over the K options.

    Example:
        >>> round(bayes_accuracy([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]]), 6)
        0.7
    """
    truth = _check_class_probs(true_probs, "true_probs")
    return float(np.mean(np.max(truth, axis=1)))


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
    true_prob: np.ndarray | None = None  # (n,) true probability of each prediction, p*
    bayes_prob: np.ndarray | None = None  # (n,) max_k true_probs[:, k]
    label_mass: np.ndarray | None = None  # (n,) sum of the raw option_probs
    option_set: np.ndarray | None = None  # (n, K) bool, conformal set membership
    labels: tuple[str, ...] | None = None  # the option labels (names of the per-class keys)
    calibrated: bool = False  # confidence and class_probs are a calibrator's

    def take(self, idx: np.ndarray) -> "_Arrays":
        def pick(v):
            return v[idx] if isinstance(v, np.ndarray) else v

        return _Arrays(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


def _arrays_of(records) -> _Arrays:
    """Validated arrays from prediction records or a `decal.records.RecordArrays`."""
    from .records import RecordArrays, records_to_arrays

    arr = records if isinstance(records, RecordArrays) else records_to_arrays(list(records))
    conf, corr = _check_conf_correct(arr.confidence, arr.correct)
    probs, labs = _check_probs_labels(arr.class_probs, arr.label_index)
    valid = _check_correct(arr.valid, "valid")
    _check_same_length(confidence=conf, class_probs=probs, valid=valid)
    mass = _row_mass(arr.option_probs) if arr.label_mass is None else np.asarray(arr.label_mass, dtype=np.float64)
    sets = None if arr.option_set is None else _check_sets(arr.option_set, labs)[0]
    common = {"label_mass": mass, "option_set": sets, "labels": tuple(arr.labels), "calibrated": bool(arr.calibrated)}
    if arr.true_probs is None:
        return _Arrays(conf, corr, valid, probs, labs, **common)
    _, p_star = _check_truth(conf, arr.true_probs, arr.prediction_index)
    return _Arrays(conf, corr, valid, probs, labs, p_star, np.max(arr.true_probs, axis=1), **common)


def _set_summary(sets: np.ndarray, labs: np.ndarray, labels: tuple[str, ...] | None) -> dict[str, float]:
    """`SET_KEYS`, then coverage and mean size per gold class (nan for a class with no example)."""
    n = len(labs)
    covered = sets[np.arange(n), labs]
    sizes = np.count_nonzero(sets, axis=1)
    out = {"set_coverage": np.count_nonzero(covered) / n, "mean_set_size": float(np.mean(sizes)),
           "singleton_share": np.count_nonzero(sizes == 1) / n}
    names = labels or tuple(str(k) for k in range(sets.shape[1]))
    counts = np.bincount(labs, minlength=len(names))
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.bincount(labs, weights=covered, minlength=len(names)) / counts
        size = np.bincount(labs, weights=sizes, minlength=len(names)) / counts
    for k, name in enumerate(names):
        out[f"set_coverage[{name}]"] = float(coverage[k])
        out[f"mean_set_size[{name}]"] = float(size[k])
    return out


def _summary(a: _Arrays, n_bins: int, binning: str, *, warn: bool = True) -> dict[str, float]:
    """Every summary metric; the confidence sort is computed once and shared."""
    conf, corr = a.confidence, a.correct
    n = len(conf)
    sv = OrderedValues(conf, corr)
    main = bin_stats(conf, corr, n_bins, binning, sv)
    out = {
        "n": n,
        "accuracy": np.count_nonzero(corr) / n,
        "ece": _weighted_abs_gap(main, n),
        "ece_equal_width": _ece(conf, corr, n_bins, "equal_width", sv),
        "max_calibration_error": _max_gap(main),
        "auroc": _auroc(conf, corr, sv, warn=warn),
        "aurc": _aurc(conf, corr, sv),
    }
    gold = _gold_probs(a.class_probs, a.label_index)
    out["sce"], out["mce"] = _sce_mce(a.class_probs, a.label_index, n_bins, gold)
    out.update(
        brier=_brier(a.class_probs, a.label_index, gold),
        nll=_nll(a.class_probs, a.label_index, gold),
        overconfidence_ratio=np.count_nonzero(conf > 0.99) / n,
        invalid_rate=1.0 - np.count_nonzero(a.valid) / n,
        mean_confidence=float(np.mean(conf)),
        mean_label_mass=float(np.mean(a.label_mass)),
        low_label_mass_share=np.count_nonzero(a.label_mass < LOW_LABEL_MASS) / n,
    )
    ordered = {k: out[k] for k in SUMMARY_KEYS}
    if a.option_set is not None:
        ordered.update(_set_summary(a.option_set, a.label_index, a.labels))
    if a.true_prob is None:
        return ordered
    gap = _truth_gap(conf, a.true_prob)
    ordered.update(
        tce=float(np.mean(np.abs(gap))),
        tce_rms=math.sqrt(float(np.mean(gap**2))),
        mean_overconfidence=float(np.mean(gap)),
        bayes_accuracy=float(np.mean(a.bayes_prob)),
    )
    return ordered


def summarize(records, *, n_bins: int = 10, binning: Binning = "equal_mass") -> dict[str, float]:
    """All metrics of one run as a flat dict with the keys `SUMMARY_KEYS` (fractions), followed by
    `SET_KEYS` and the per-class set keys when the records carry option sets, then `TRUTH_KEYS`
    when they carry `true_probs`.

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
        ``{"n", "n_bins", "binning", "bootstrap", "level", "seed", "scales", "metrics": {key:
        {"value", "ci_low", "ci_high", "scale"}}}`` with every `summarize` key except ``n`` under
        metrics; ``scales`` maps each input (`METRIC_INPUTS`) to the scale this run gives it.
    """
    n_bins, binning = _check_n_bins(n_bins), _check_binning(binning)
    if n_resamples != 0:
        _check_bootstrap(n_resamples, level)
    a = _arrays_of(records)
    point = _summary(a, n_bins, binning)
    keys = [k for k in point if k != "n"]
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
        "scales": (scales := input_scales(calibrated=a.calibrated)),
        "metrics": {
            k: {"value": _json_float(point[k]), "ci_low": _json_float(intervals[k][0]), "ci_high": _json_float(intervals[k][1]),
                "scale": scales[_metric_input(k)]}
            for k in keys
        },
    }


def _metric_input(key: str) -> str:
    return METRIC_INPUTS.get(key.split("[")[0], "option_set")


def input_scales(*, calibrated: bool) -> dict[str, str]:
    """The scale each metric input has in a run (module docstring, "Scales").

    Example:
        >>> input_scales(calibrated=True)["confidence"], input_scales(calibrated=False)["confidence"]
        ('calibrated_confidence', 'full-vocabulary confidence')
    """
    return {
        "prediction": "decision",
        "confidence": "calibrated_confidence" if calibrated else "full-vocabulary confidence",
        "class_probs": "calibrated_probs" if calibrated else "option_probs / label mass",
        "option_probs": "full-vocabulary option_probs",
        "option_set": "option_set",
        "true_probs": "true_probs",
    }


def _json_float(x) -> float | None:
    """Plain float for JSON; nan (undefined AUROC, empty interval) becomes None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x
