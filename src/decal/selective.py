"""Selective prediction: pick a confidence threshold with an accuracy guarantee, then apply it.

A threshold ``t`` accepts the predictions with ``confidence >= t`` and defers the rest (to a
larger model or a person, paper section 1). On a calibration run, `choose_threshold` returns
the lowest ``t`` whose accepted predictions reach ``target_accuracy`` with probability at least
``1 - delta``, in this sense: if the calibration run is a random sample of the deployment
population, then ``P(accuracy of accepted predictions at t < target_accuracy) <= delta``.

How (a union bound over a fixed grid):

1. Candidate thresholds form a grid fixed before seeing data (`threshold_grid`: 0, 0.01, ...,
   1 plus the points ``1 - 10^-k``, because overconfident models put most predictions there);
   ``m`` is its size (107 by default).
2. At each threshold ``t`` with ``n_t`` accepted predictions of which ``k_t`` are correct,
   compute the one-sided Clopper-Pearson lower bound of the accuracy at level ``1 - delta / m``.
3. Return the lowest threshold whose bound reaches the target. Each threshold whose true
   accuracy is below the target passes with probability at most ``delta / m``, so the chance
   that any of them passes -- the chosen one included -- is at most ``delta``, whatever the
   shape of the accuracy-confidence curve.

A finer grid finds a threshold closer to the ideal one but tests each at a stricter level; the
cost grows only like ``log m``. (A fixed-sequence walk from the top needs no correction but
stops for good at the first small, unlucky group of top predictions.)
If no threshold passes, none is returned (defer everything).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_conf_correct

__all__ = [
    "ThresholdChoice",
    "SelectiveResult",
    "binomial_lower_bound",
    "threshold_grid",
    "choose_threshold",
    "apply_threshold",
]


@dataclass(frozen=True)
class ThresholdChoice:
    """The outcome of `choose_threshold` on the calibration run.

    threshold: accept ``confidence >= threshold``; None when no threshold passes.
    coverage, accuracy, lower_bound, n_accepted: on the calibration run at that threshold
    (coverage 0, the others nan / 0, when threshold is None).
    target_accuracy, delta: the request; n: examples in the calibration run.
    """

    threshold: float | None
    coverage: float
    accuracy: float
    lower_bound: float
    n_accepted: int
    n: int
    target_accuracy: float
    delta: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class SelectiveResult:
    """Coverage and accuracy of a threshold applied to one run (accuracy nan if none accepted)."""

    threshold: float | None
    coverage: float
    accuracy: float
    n_accepted: int
    n: int

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self.__dict__.items()}


def binomial_lower_bound(k, n, *, delta: float = 0.05):
    """One-sided Clopper-Pearson lower bound on a success rate from ``k`` successes in ``n``.

    ``P(true rate < bound) <= delta``. Vectorised over ``k`` and ``n``; 0 where ``k == 0``.

    Example:
        >>> round(float(binomial_lower_bound(10, 10, delta=0.05)), 4)  # 0.05 ** (1/10)
        0.7411
    """
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(delta, k, n - k + 1.0)
    return np.where(k > 0, bound, 0.0)


def threshold_grid(n_linear: int = 100, max_exponent: int = 8) -> np.ndarray:
    """Candidate thresholds, ascending: ``linspace(0, 1, n_linear + 1)`` and ``1 - 10^-k``.

    Example:
        >>> threshold_grid(4, 2).tolist()
        [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
    """
    near_one = 1.0 - 10.0 ** -np.arange(1, max_exponent + 1, dtype=np.float64)
    # i / n (not linspace, whose 0.7 is 0.7000000000000001) so a confidence of exactly 0.7
    # is accepted by the threshold 0.7.
    linear = np.arange(n_linear + 1, dtype=np.float64) / n_linear
    return np.unique(np.concatenate([linear, near_one]))


def _check_target(target_accuracy, delta) -> None:
    if not (isinstance(target_accuracy, (int, float)) and 0.0 < target_accuracy < 1.0):
        raise ValueError(f"`target_accuracy` must be in (0, 1); got {target_accuracy!r}.")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"`delta` must be in (0, 1); got {delta!r}. 0.05 promises the accuracy with 95 % probability.")


def choose_threshold(
    confidence, correct, *, target_accuracy: float, delta: float = 0.05, grid: np.ndarray | None = None
) -> ThresholdChoice:
    """The lowest threshold whose accepted predictions reach `target_accuracy` (module docstring).

    Args:
        confidence: Array of shape (n,), values in [0, 1], from the calibration run.
        correct: Array of shape (n,), booleans.
        target_accuracy: Accuracy to promise on accepted predictions, in (0, 1).
        delta: Allowed probability that the promise fails (0.05); each of the ``m`` grid
            thresholds is tested at ``delta / m``.
        grid: Candidate thresholds fixed in advance (`threshold_grid()` by default).

    Returns:
        A `ThresholdChoice`; ``lower_bound`` is the bound at level ``1 - delta / m``.

    Example:
        Sixty correct predictions at 0.9 and twenty wrong ones at 0.3:

        >>> c = [0.9] * 60 + [0.3] * 20; y = [True] * 60 + [False] * 20
        >>> choice = choose_threshold(c, y, target_accuracy=0.8)
        >>> choice.threshold, choice.coverage, choice.accuracy
        (0.31, 0.75, 1.0)
    """
    conf, corr = check_conf_correct(confidence, correct)
    _check_target(target_accuracy, delta)
    grid = threshold_grid() if grid is None else np.unique(np.asarray(grid, dtype=np.float64))
    # n_t, k_t for every grid threshold, via the sorted confidences (grid ascending).
    order = np.argsort(conf, kind="stable")
    sorted_conf = conf[order]
    correct_suffix = np.concatenate([np.cumsum(corr[order][::-1])[::-1], [0]])
    first = np.searchsorted(sorted_conf, grid, side="left")
    n_acc = len(conf) - first
    k_acc = correct_suffix[first]
    bounds = binomial_lower_bound(k_acc, n_acc, delta=delta / len(grid))  # union bound over the grid
    passing = np.flatnonzero((n_acc > 0) & (bounds >= target_accuracy))
    chosen = int(passing[0]) if passing.size else None
    if chosen is None:
        return ThresholdChoice(None, 0.0, float("nan"), float("nan"), 0, len(conf), float(target_accuracy), float(delta))
    return ThresholdChoice(
        threshold=float(grid[chosen]),
        coverage=float(n_acc[chosen] / len(conf)),
        accuracy=float(k_acc[chosen] / n_acc[chosen]),
        lower_bound=float(bounds[chosen]),
        n_accepted=int(n_acc[chosen]),
        n=len(conf),
        target_accuracy=float(target_accuracy),
        delta=float(delta),
    )


def apply_threshold(confidence, correct, threshold: float | None) -> SelectiveResult:
    """Coverage and accuracy of accepting ``confidence >= threshold`` (None accepts nothing).

    Example:
        >>> r = apply_threshold([0.9, 0.8, 0.2, 0.1], [1, 0, 1, 0], 0.5)
        >>> r.coverage, r.accuracy, r.n_accepted
        (0.5, 0.5, 2)
    """
    conf, corr = check_conf_correct(confidence, correct)
    if threshold is None:
        accepted = np.zeros(len(conf), dtype=bool)
    else:
        if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"`threshold` must be in [0, 1] or None; got {threshold!r}.")
        accepted = conf >= threshold
    n_acc = int(accepted.sum())
    acc = float(corr[accepted].mean()) if n_acc else float("nan")
    return SelectiveResult(threshold, n_acc / len(conf), acc, n_acc, len(conf))
