"""Anytime-valid alarms of `decal serve`'s monitor: a guarantee alarm on labels, a drift alarm without.

Both alarms are test (super)martingales: nonnegative processes that start at 1 and do not grow in
expectation while their null hypothesis holds. Ville's inequality gives
``P(sup_t M_t >= 1 / alpha) <= alpha``, so an alarm that fires the first time ``M_t`` reaches
``1 / alpha``, checked after every observation for as long as the server runs, fires falsely with
probability at most ``alpha`` (docs/design.md, "Decision log"). A fixed-sample test checked after
every label has no such bound: its false-alarm rate grows towards 1 with the number of looks.

Guarantee alarm (needs labels). Null: the accuracy of answered (not deferred) decisions is at
least the threshold's target ``a``. With ``X_t`` in {0, 1} the correctness of the t-th labelled
answered decision, testing by betting (Waudby-Smith & Ramdas 2023, JRSS-B) gives the capital

    K_t = prod_{i <= t} (1 + lambda_i (a - X_i)),   0 <= lambda_i <= c / (1 - a),

a test supermartingale under the null whenever ``lambda_i`` depends only on ``X_1 .. X_{i-1}``:
``E[1 + lambda (a - X) | past] = 1 + lambda (a - E[X | past]) <= 1``. The bet is aGRAPA (their
eq. B.7), ``lambda = (a - m) / (v + (a - m)^2)`` clipped to ``[0, c / (1 - a)]`` (c = 1/2, as
confseq's ``trunc_scale``), on an exponentially weighted mean ``m`` and variance ``v`` of the
past labels (a running mean for the first ``window`` labels, then weight ``1 / window``), so
the bet follows a change without being diluted by a long good past. The estimates start at the
target with one pseudo-observation, so nothing is bet until the labels fall below it.

Drift alarm (no labels). Null: the scores of the served decisions and those of the reference
window (the calibration run) are exchangeable. Steps:

1. Smoothed conformal p-values, semi-online (Vovk, Gammerman & Shafer, ALRW 2nd ed., section
   8.1; `crepes.martingales.semi_online_p_values`): the t-th score's
   ``p_t = (#{earlier > s_t} + theta_t (1 + #{earlier == s_t})) / (n_earlier + 1)`` over the
   reference and every earlier decision, ``theta_t ~ U(0, 1)``. Under the null they are
   independent and uniform, whatever the scores' distribution (ties included).
2. The Simple Jumper martingale on them (ALRW Alg. 8.1; `crepes.martingales.SimpleJumper` with
   its defaults: betting functions ``1 + eps (p - 1/2)``, eps in {-1, -1/2, 0, 1/2, 1}, jumping
   rate 0.01): it grows when p-values pile up near 0 (scores drift up) or near 1 (down).
3. One martingale on the calibrated confidence, one on the label mass, averaged. Each p-value is
   uniform given the past of both sequences (the bag argument of Vovk et al. 2003), so each is a
   martingale in the joint filtration and their average is a test martingale.

Why a conformal test martingale rather than a windowed two-sample test (Kolmogorov-Smirnov
every N decisions): a repeated two-sample test needs a multiple-testing correction that depends
on how long the server runs, and a window size; the martingale needs neither, its level holds
however often it is read, and it compares against the whole reference window.

Scores are quantized on the logit scale to `N_BINS` levels (`quantize`), so the online counts are
a Fenwick tree of fixed size; quantization only adds ties, which the smoothing handles exactly.

Both alarms come twice: streaming classes for the server (`GuaranteeAlarm`, `DriftAlarm`), and
vectorised functions over many simulated streams (`guarantee_log_capital`, `conformal_p_values`,
`simple_jumper_log`); the streaming classes call the same step functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "N_BINS",
    "EPSILONS",
    "JUMP_RATE",
    "BET_WINDOW",
    "quantize",
    "guarantee_step",
    "guarantee_log_capital",
    "conformal_p_values",
    "jumper_step",
    "simple_jumper_log",
    "first_crossing",
    "GuaranteeAlarm",
    "ScoreCounts",
    "DriftAlarm",
]

N_BINS = 1 << 14
_LOGIT_RANGE = 20.0  # logits clipped to [-20, 20]: probabilities within 2e-9 of 0 or 1 tie
EPSILONS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # crepes' EpsilonBettingFunction default
JUMP_RATE = 0.01  # crepes' SimpleJumper default
BET_WINDOW = 25  # labels: memory of the guarantee alarm's bet estimates (delays measured in README)
_TRUNCATION = 0.5  # bets at most half of what the capital can lose (confseq's trunc_scale)


def _check_alpha(alpha) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"`alpha` must be in (0, 1); got {alpha!r}")
    return float(alpha)


def quantize(values) -> np.ndarray:
    """Scores in [0, 1] -> integer levels in [0, N_BINS) on the logit scale (order kept, ties added).

    Example:
        >>> quantize([0.0, 0.5, 1.0]).tolist()
        [0, 8192, 16383]
    """
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        logit = np.log(x) - np.log1p(-x)
    scaled = (np.clip(logit, -_LOGIT_RANGE, _LOGIT_RANGE) + _LOGIT_RANGE) / (2 * _LOGIT_RANGE)
    return np.minimum((scaled * N_BINS).astype(np.int64), N_BINS - 1)


def first_crossing(log_values: np.ndarray, alpha: float) -> np.ndarray:
    """Per stream (rows), the first step whose log value reaches ``log(1 / alpha)``; -1 if none."""
    hit = np.asarray(log_values) >= math.log(1.0 / _check_alpha(alpha))
    first = np.argmax(hit, axis=-1)
    return np.where(hit.any(axis=-1), first, -1)


# --- guarantee alarm ---------------------------------------------------------------------------


def guarantee_step(log_k, mean, var, n, x, *, target: float, window: int):
    """One label of the betting test of H0 ``accuracy >= target`` (module docstring), on arrays.

    Args:
        log_k, mean, var, n: the state (log capital, weighted mean and variance, labels so far).
        x: the new label's correctness in {0, 1} (NaN: no label at this step; the state is kept).
        target: a in (0, 1); window: the estimates' effective memory in labels.

    Returns:
        The new (log_k, mean, var, n).
    """
    seen = ~np.isnan(x)
    xv = np.where(seen, x, 0.0)
    gap = target - mean
    bet = np.clip(gap / (var + gap * gap), 0.0, _TRUNCATION / (1.0 - target))
    log_k = np.where(seen, log_k + np.log1p(bet * (target - xv)), log_k)
    weight = 1.0 / np.minimum(n + 2.0, window)  # n + 2: the pseudo-observation counts once
    new_var = (1.0 - weight) * var + weight * (xv - mean) ** 2
    new_mean = (1.0 - weight) * mean + weight * xv
    return log_k, np.where(seen, new_mean, mean), np.where(seen, new_var, var), n + seen


def _guarantee_start(target: float, shape) -> tuple:
    # One pseudo-observation at the target: no bet until the labels say the accuracy is below it.
    return (np.zeros(shape), np.full(shape, float(target)), np.full(shape, target * (1.0 - target)), np.zeros(shape))


def _check_target(target) -> float:
    if not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
        raise ValueError(f"`target` must be in (0, 1); got {target!r}")
    return float(target)


def guarantee_log_capital(correct, *, target: float, window: int = BET_WINDOW) -> np.ndarray:
    """Log capital ``log K_t`` after each step, for streams of labels (module docstring).

    Args:
        correct: Array of shape (n_streams, n_steps) or (n_steps,): 1 correct, 0 wrong, NaN no
            label at that step (the capital carries over).
        target: the promised accuracy a, in (0, 1).
        window: effective memory of the bet's estimates, in labels.

    Returns:
        Array of the input's shape; the alarm fires where it reaches ``log(1 / alpha)``.

    Example:
        Ten wrong answers against a promise of 0.9: the first bet is 0 (the estimate starts at
        the target), then the capital grows at every step.

        >>> log_k = guarantee_log_capital([0.0] * 10, target=0.9)
        >>> float(log_k[0]), bool(np.all(np.diff(log_k) > 0)), round(float(np.exp(log_k[-1])), 2)
        (0.0, True, 233.03)
    """
    x = np.asarray(correct, dtype=np.float64)
    target = _check_target(target)
    squeeze = x.ndim == 1
    x = x[None, :] if squeeze else x
    state = _guarantee_start(target, x.shape[0])
    out = np.empty_like(x)
    for t in range(x.shape[1]):
        state = guarantee_step(*state, x[:, t], target=target, window=window)
        out[:, t] = state[0]
    return out[0] if squeeze else out


class GuaranteeAlarm:
    """Streaming guarantee alarm: `update` with each labelled answered decision's correctness.

    Args:
        target: the threshold's promised accuracy of answered decisions, in (0, 1).
        alpha: the false-alarm probability over the whole stream (the alarm fires at 1 / alpha).
        window: memory of the bet's estimates, in labels.

    Attributes:
        n: labels seen; e_value: the current capital K_t; alert: True once it reached 1 / alpha
        (it stays on); fired_at: the number of labels when it first fired (None before).
    """

    def __init__(self, target: float, *, alpha: float = 0.05, window: int = BET_WINDOW):
        self.target, self.alpha, self.window = _check_target(target), _check_alpha(alpha), int(window)
        self._state = _guarantee_start(self.target, 1)
        self.fired_at: int | None = None

    @property
    def n(self) -> int:
        return int(self._state[3][0])

    @property
    def log_e_value(self) -> float:
        return float(self._state[0][0])

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_e_value, 700.0))

    @property
    def alert(self) -> bool:
        return self.fired_at is not None

    def update(self, correct: bool) -> bool:
        """Add one label; returns `alert`."""
        self._state = guarantee_step(*self._state, np.array([float(bool(correct))]), target=self.target, window=self.window)
        if self.fired_at is None and self.log_e_value >= math.log(1.0 / self.alpha):
            self.fired_at = self.n
        return self.alert

    def to_dict(self) -> dict:
        return {"alert": self.alert, "e_value": self.e_value, "level": self.alpha, "fires_at": 1.0 / self.alpha,
                "target_accuracy": self.target, "labels": self.n, "fired_at_label": self.fired_at}


# --- drift alarm -------------------------------------------------------------------------------


def _dense_ranks(q: np.ndarray) -> np.ndarray:
    """Per row, the rank of each value among the row's distinct values (0 = smallest)."""
    order = np.argsort(q, axis=1, kind="stable")
    sorted_q = np.take_along_axis(q, order, axis=1)
    new_value = np.concatenate([np.zeros((q.shape[0], 1), dtype=np.int64), (np.diff(sorted_q, axis=1) != 0)], axis=1)
    ranks = np.empty_like(q)
    np.put_along_axis(ranks, order, np.cumsum(new_value, axis=1), axis=1)
    return ranks


def _reference_counts(q_ref: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#reference > q, #reference == q) per element; q_ref (S, R), q (S, T)."""
    s, r = q_ref.shape
    offset = (np.arange(s, dtype=np.int64) * N_BINS)[:, None]
    flat = np.sort((q_ref + offset).ravel())
    keys = q + offset
    le = np.searchsorted(flat, keys, side="right") - offset // N_BINS * r
    lt = np.searchsorted(flat, keys, side="left") - offset // N_BINS * r
    return r - le, le - lt


def _stream_counts(q: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(#earlier in the row > q_t, #earlier == q_t) per element; q (S, T).

    Blocks of `block` steps: earlier blocks through a per-row histogram over dense ranks
    (cumulated once per block), the block itself by pairwise comparison.
    """
    s, t_max = q.shape
    ranks = _dense_ranks(q)
    n_ranks = int(ranks.max()) + 1 if ranks.size else 1
    hist = np.zeros((s, n_ranks), dtype=np.int64)
    offsets = (np.arange(s, dtype=np.int64) * n_ranks)[:, None]
    gt, eq = np.empty_like(q), np.empty_like(q)
    for start in range(0, t_max, block):
        r = ranks[:, start : start + block]  # (S, b)
        cum = np.concatenate([np.zeros((s, 1), dtype=np.int64), np.cumsum(hist, axis=1)], axis=1)
        le = np.take_along_axis(cum, r + 1, axis=1)
        lt = np.take_along_axis(cum, r, axis=1)
        earlier = np.tri(r.shape[1], k=-1, dtype=bool)[None]  # [i, j]: j before i in the block
        gt_in = ((r[:, None, :] > r[:, :, None]) & earlier).sum(axis=2)
        eq_in = ((r[:, None, :] == r[:, :, None]) & earlier).sum(axis=2)
        gt[:, start : start + block] = start - le + gt_in
        eq[:, start : start + block] = le - lt + eq_in
        hist += np.bincount((r + offsets).ravel(), minlength=s * n_ranks).reshape(s, n_ranks)
    return gt, eq


def conformal_p_values(scores, thetas, *, reference=None) -> np.ndarray:
    """Smoothed semi-online conformal p-values of each stream's scores after its reference (step 1).

    Args:
        scores: Array of shape (n_streams, n_steps) or (n_steps,), values in [0, 1] (quantized by
            `quantize` first, as the streaming `DriftAlarm` does).
        thetas: Array of the same shape, U(0, 1) tie-breakers.
        reference: Array of shape (n_streams, n_reference) or (n_reference,): the reference
            window's scores, earlier than every step (None: no reference).

    Returns:
        p-values, the shape of `scores`. With ``reference=None`` and the same thetas this equals
        ``crepes.martingales.semi_online_p_values`` on the quantized scores.
    """
    q = quantize(scores)
    th = np.asarray(thetas, dtype=np.float64)
    squeeze = q.ndim == 1
    q, th = (q[None, :], th[None, :]) if squeeze else (q, th)
    gt, eq = _stream_counts(q)
    n_earlier = np.arange(q.shape[1])[None, :]
    if reference is not None:
        q_ref = quantize(reference)
        q_ref = np.broadcast_to(q_ref, (q.shape[0], q_ref.shape[-1])) if q_ref.ndim == 1 else q_ref
        ref_gt, ref_eq = _reference_counts(q_ref, q)
        gt, eq, n_earlier = gt + ref_gt, eq + ref_eq, n_earlier + q_ref.shape[1]
    p = (gt + th * (1.0 + eq)) / (n_earlier + 1.0)
    return p[0] if squeeze else p


def jumper_step(log_m, weights, p, *, jump_rate: float = JUMP_RATE, epsilons: Sequence[float] = EPSILONS):
    """One p-value of the Simple Jumper (step 2), on arrays: returns the new (log_m, weights).

    ``weights`` (S, K) are the accounts' shares of the capital, summing to 1 per row; keeping the
    capital as ``exp(log_m) * weights`` avoids the overflow of crepes' plain products.
    """
    eps = np.asarray(epsilons, dtype=np.float64)
    grown = weights * (1.0 + eps[None, :] * (np.asarray(p, dtype=np.float64)[:, None] - 0.5))
    total = grown.sum(axis=1)
    return log_m + np.log(total), (1.0 - jump_rate) * grown / total[:, None] + jump_rate / len(eps)


def simple_jumper_log(p_values, *, jump_rate: float = JUMP_RATE, epsilons: Sequence[float] = EPSILONS) -> np.ndarray:
    """Log of the Simple Jumper martingale after each p-value (rows are streams).

    ``exp`` of it equals ``crepes.martingales.SimpleJumper(J=jump_rate).apply(p)`` (to float rounding).

    Example:
        p-values of exactly 1/2 win and lose nothing:

        >>> simple_jumper_log([0.5, 0.5]).tolist()
        [0.0, 0.0]
    """
    p = np.asarray(p_values, dtype=np.float64)
    squeeze = p.ndim == 1
    p = p[None, :] if squeeze else p
    log_m, weights = np.zeros(p.shape[0]), np.full((p.shape[0], len(epsilons)), 1.0 / len(epsilons))
    out = np.empty_like(p)
    for t in range(p.shape[1]):
        log_m, weights = jumper_step(log_m, weights, p[:, t], jump_rate=jump_rate, epsilons=epsilons)
        out[:, t] = log_m
    return out[0] if squeeze else out


class ScoreCounts:
    """Counts of quantized scores so far (a Fenwick tree over `N_BINS` levels): how many are above or equal."""

    def __init__(self, scores: Sequence[float] = ()):
        histogram = np.bincount(quantize(scores), minlength=N_BINS) if len(scores) else np.zeros(N_BINS, dtype=np.int64)
        # Build the tree from the histogram in O(N_BINS): each node adds itself to its parent.
        tree = np.concatenate([[0], histogram]).astype(np.int64)
        for i in range(1, N_BINS + 1):
            parent = i + (i & -i)
            if parent <= N_BINS:
                tree[parent] += tree[i]
        self._tree = tree.tolist()
        self.n = int(histogram.sum())

    def _prefix(self, i: int) -> int:
        total, tree = 0, self._tree
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def add(self, level: int) -> None:
        i, tree = level + 1, self._tree
        while i <= N_BINS:
            tree[i] += 1
            i += i & -i
        self.n += 1

    def above_and_equal(self, level: int) -> tuple[int, int]:
        le, lt = self._prefix(level + 1), self._prefix(level)
        return self.n - le, le - lt


@dataclass
class _Jumper:
    counts: ScoreCounts
    log_m: np.ndarray
    weights: np.ndarray


class DriftAlarm:
    """Streaming drift alarm: the average of one conformal test martingale per score (module docstring).

    Args:
        reference: score name -> the reference window's scores (e.g. ``{"confidence": [...],
            "label_mass": [...]}``); empty lists test the served stream against itself.
        alpha: the false-alarm probability over the whole stream (fires at 1 / alpha).

    Attributes:
        n: decisions seen; alert, fired_at (decisions when it first fired), e_value.
    """

    def __init__(self, reference: Mapping[str, Sequence[float]], *, alpha: float = 0.05):
        if not reference:
            raise ValueError("`reference` must name at least one score")
        self.alpha = _check_alpha(alpha)
        k = len(EPSILONS)
        self._jumpers = {name: _Jumper(ScoreCounts(list(values)), np.zeros(1), np.full((1, k), 1.0 / k))
                         for name, values in reference.items()}
        self.n_reference = {name: j.counts.n for name, j in self._jumpers.items()}
        self.n = 0
        self.fired_at: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._jumpers)

    def log_e_values(self) -> dict[str, float]:
        return {name: float(j.log_m[0]) for name, j in self._jumpers.items()}

    @property
    def log_e_value(self) -> float:
        logs = np.array(list(self.log_e_values().values()))
        return float(np.logaddexp.reduce(logs) - math.log(len(logs)))

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_e_value, 700.0))

    @property
    def alert(self) -> bool:
        return self.fired_at is not None

    def update(self, scores: Mapping[str, float], thetas: Mapping[str, float]) -> bool:
        """Add one decision's scores (one per reference name) with their tie-breakers in [0, 1); returns `alert`."""
        for name, j in self._jumpers.items():
            level = int(quantize([scores[name]])[0])
            above, equal = j.counts.above_and_equal(level)
            p = (above + thetas[name] * (1.0 + equal)) / (j.counts.n + 1.0)
            j.counts.add(level)
            j.log_m, j.weights = jumper_step(j.log_m, j.weights, np.array([p]))
        self.n += 1
        if self.fired_at is None and self.log_e_value >= math.log(1.0 / self.alpha):
            self.fired_at = self.n
        return self.alert

    def to_dict(self) -> dict:
        return {"alert": self.alert, "e_value": self.e_value, "level": self.alpha, "fires_at": 1.0 / self.alpha,
                "e_values": {k: math.exp(min(v, 700.0)) for k, v in self.log_e_values().items()},
                "decisions": self.n, "reference": self.n_reference, "fired_at_decision": self.fired_at}
