"""Selective prediction with guarantees: thresholds that defer, chosen so stated targets hold.

A decision rule answers record i's prediction ``k`` when ``confidence_i >= thresholds[k]`` and
defers it (to a larger model or a person, paper section 1) otherwise. ``confidence`` is the scale
`decal.records.records_to_arrays` gives: calibrated where the run is calibrated, else the raw
full-vocabulary confidence. With one threshold per label the deferred cases form an abstention
band; for two labels, a band around the middle of P(label).

Targets (`Target`, `parse_target`): ``accuracy>=A`` (accuracy of the answered cases),
``precision(L)>=P`` (of the cases answered L, the share that truly are L) and ``recall(L)>=R``
(of the cases that truly are L, the share answered L; a deferred case counts as missed, so the
promise is on what the rule catches by itself). `control_risks` picks thresholds such that
every target holds jointly with probability at least ``1 - delta`` over the draw of the
calibration run, provided the run is an i.i.d. sample of the deployment population.

How (Learn-then-Test, Angelopoulos et al. 2022, on MAPIE's pieces):

1. Candidate thresholds form a grid fixed before seeing data (`threshold_grid`: 0, 0.01, ...,
   1 plus the points ``1 - 10^-k``, because overconfident models put most predictions there).
2. For each target and candidate, ``s`` successes out of ``n`` cases (answered cases for
   accuracy and precision; cases of the label for recall). Given ``n``, ``s`` is binomial with
   the true rate, so MAPIE's binary Hoeffding-Bentkus p-value
   (`mapie.risk_control.methods.compute_hoeffding_bentkus_p_value`, which for binary losses is
   the exact binomial tail) tests "the target fails at this candidate". A candidate with no case
   gets p-value 1 (no evidence).
3. Per-class targets (precision and recall) depend only on their own label's threshold, so each
   label with targets is one family over the grid: its p-value per candidate is the largest of
   its targets', and a family-wise error control at ``delta / (number of such labels)``
   (`mapie.risk_control.control_fwer`, Bonferroni-Holm by default) gives the valid candidates;
   the union bound over labels makes the targets hold jointly at ``delta``. ``fwer="auto"``
   (the default) tests a label whose targets are all recall targets by fixed-sequence testing
   from the lowest threshold up (recall can only fall as the threshold rises, and the lowest
   threshold has the most cases, so the order is known before seeing data and costs no
   correction), and every other family by Bonferroni-Holm, which, unlike a fixed sequence from
   the top, is not stopped by the few cases above the highest thresholds. A label without a
   target is always answered (threshold 0). With an accuracy target, which depends on every
   label's threshold, all labels share one threshold and all targets form one family at
   ``delta`` (MAPIE's ``MultiClassificationLTTController`` rule).
4. Among the valid candidates, the lowest (it defers the fewest cases). A label with no valid
   candidate gets no threshold: its predictions are always deferred, which keeps a precision
   target (vacuously) but not a recall target; such a target is reported as not certified.

Each target holds at its chosen threshold because every candidate whose true rate misses its
target is rejected with probability at most the family's level, whatever the shape of the rate
against the threshold. `choose_threshold` is the accuracy-only case with Bonferroni (the union
bound over the grid of earlier releases) and the Clopper-Pearson bound it implies.
If no threshold passes, none is returned (defer everything).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from ._checks import check_conf_correct, check_labels, check_same_length
from .errors import DataError

__all__ = [
    "ThresholdChoice",
    "SelectiveResult",
    "Target",
    "RiskControl",
    "QUANTITIES",
    "FWER_METHODS",
    "parse_target",
    "binomial_lower_bound",
    "threshold_grid",
    "control_risks",
    "choose_threshold",
    "apply_threshold",
    "apply_risk_control",
]

QUANTITIES = ("accuracy", "precision", "recall")
# decal's names of MAPIE's family-wise error procedures (`mapie.risk_control.control_fwer`);
# "auto" picks per family (module docstring, step 3).
FWER_METHODS = {"auto": None, "holm": "bonferroni_holm", "bonferroni": "bonferroni", "fixed_sequence": "fixed_sequence"}
Quantity = Literal["accuracy", "precision", "recall"]


@dataclass(frozen=True)
class Target:
    """One promise: `quantity` of `label` (None for accuracy) is at least `level`.

    Example:
        >>> str(Target("precision", "Safe", 0.99)), str(Target("accuracy", None, 0.9))
        ('precision(Safe)>=0.99', 'accuracy>=0.9')
    """

    quantity: Quantity
    label: str | None
    level: float

    def __str__(self) -> str:
        name = self.quantity if self.label is None else f"{self.quantity}({self.label})"
        return f"{name}>={self.level:g}"

    def in_words(self, delta: float) -> str:
        """The promise as a deployer would sign it."""
        pct, sure = f"{100 * self.level:g} %", f"{100 * (1 - delta):g} %"
        what = {
            "accuracy": f"at least {pct} of the answered cases are right",
            "precision": f"of the cases answered {self.label}, at least {pct} truly are {self.label}",
            "recall": f"at least {pct} of the cases that truly are {self.label} are answered {self.label} (a deferred one counts as missed)",
        }[self.quantity]
        return f"{what}, with probability at least {sure} over the calibration set (jointly with the other targets)"


_TARGET = re.compile(r"^\s*([A-Za-z_]+)\s*(?:\(\s*(.*?)\s*\))?\s*>=\s*(\S+)\s*$")


def parse_target(text: str, labels: Sequence[str]) -> Target:
    """A `Target` from ``'precision(Safe)>=0.99'``, ``'recall(Unsafe)>=0.95'`` or ``'accuracy>=0.9'``.

    Raises:
        ValueError: a malformed target, an unknown quantity or label, or a level outside (0, 1).

    Example:
        >>> parse_target("recall(Unsafe) >= 0.95", ["Safe", "Unsafe"])
        Target(quantity='recall', label='Unsafe', level=0.95)
    """
    m = _TARGET.match(str(text))
    if not m:
        raise ValueError(f"`--target` must look like 'precision(LABEL)>=0.99', 'recall(LABEL)>=0.95' or 'accuracy>=0.9'; got {text!r}")
    quantity, label, level_text = m.group(1).lower(), m.group(2), m.group(3)
    if quantity not in QUANTITIES:
        close = difflib.get_close_matches(quantity, QUANTITIES, n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ValueError(f"Unknown target quantity {quantity!r} in {text!r}.{hint} Available: {', '.join(QUANTITIES)}.")
    if quantity == "accuracy" and label is not None:
        raise ValueError(f"`accuracy` takes no label (it is the accuracy of all answered cases); got {text!r}")
    if quantity != "accuracy":
        if not label:
            raise ValueError(f"`{quantity}` needs a label, as in {quantity}({labels[0]})>=0.9; got {text!r}")
        if label not in labels:
            raise ValueError(f"label {label!r} of target {text!r} is not one of the run's labels {list(labels)}")
    try:
        level = float(level_text)
    except ValueError:
        level = float("nan")
    if not 0.0 < level < 1.0:
        raise ValueError(f"the level of target {text!r} must be a number in (0, 1); got {level_text!r}")
    return Target(quantity, label, level)  # type: ignore[arg-type]


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


def _check_delta(delta) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"`delta` must be in (0, 1); got {delta!r}. 0.05 promises the targets with 95 % probability.")


def _check_target(target_accuracy, delta) -> None:
    if not (isinstance(target_accuracy, (int, float)) and 0.0 < target_accuracy < 1.0):
        raise ValueError(f"`target_accuracy` must be in (0, 1); got {target_accuracy!r}.")
    _check_delta(delta)


# --- Learn-then-Test ------------------------------------------------------------------------------


def _at_or_above(values: np.ndarray, grid: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """For each grid point t, the count (or weight sum) of `values` >= t; shape (m,)."""
    order = np.argsort(values, kind="stable")
    first = np.searchsorted(values[order], grid, side="left")
    w = np.ones(len(values)) if weights is None else weights[order].astype(np.float64)
    suffix = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])
    return suffix[first]


def _index(labels: tuple[str, ...], label: str | None) -> int | None:
    return None if label is None else labels.index(label)


def _counts(target: Target, conf, pred, correct, label, label_index: int | None, grid) -> tuple[np.ndarray, np.ndarray]:
    """(successes, cases) of `target` at each grid threshold, shapes (m,).

    `label_index` is the target's label (None for accuracy, which counts every answered case).
    A per-class target depends only on its own label's threshold, so the same counts serve
    per-class and shared thresholds.
    """
    if target.quantity == "accuracy":
        return _at_or_above(conf, grid, correct), _at_or_above(conf, grid)
    k = label_index
    mine = pred == k
    answered_right = _at_or_above(conf[mine], grid, correct[mine])  # answered k and right: truly k
    if target.quantity == "precision":
        return answered_right, _at_or_above(conf[mine], grid)
    return answered_right, np.full(len(grid), float(np.count_nonzero(label == k)))


def _p_values(successes: np.ndarray, cases: np.ndarray, level: float) -> np.ndarray:
    """MAPIE's binary Hoeffding-Bentkus p-values of "the rate is below `level`", shape (m,).

    The risk passed is ``1 - successes / cases``, as MAPIE's risks compute it, so the p-values
    equal its controllers' bit for bit; a candidate with no case gets 1 (MAPIE gives nan there,
    which stops its Bonferroni-Holm procedure before any rejection).
    """
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    has = cases > 0
    risk = np.where(has, 1.0 - successes / np.where(has, cases, 1.0), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = compute_hoeffding_bentkus_p_value(risk, np.where(has, cases, 1.0), 1.0 - level, binary=True)[:, 0]
    return np.where(has, p, 1.0)


def _family_fwer(family: Sequence[Target], fwer: str) -> str:
    """The MAPIE procedure for one family; "fixed_sequence" always walks the grid upwards."""
    if fwer == "auto":
        return "fixed_sequence" if all(t.quantity == "recall" for t in family) else "bonferroni_holm"
    return FWER_METHODS[fwer]


def _valid_candidates(p_values: np.ndarray, delta: float, method: str) -> np.ndarray:
    """Indices of the grid candidates the procedure rejects (whose targets are certified)."""
    from mapie.risk_control import control_fwer

    # The order of a fixed sequence is the grid's (ascending), passed as is: MAPIE's controllers
    # would instead read the direction from the data.
    return np.asarray(control_fwer(p_values, delta, fwer_method=method), dtype=np.int64)


@dataclass(frozen=True)
class RiskControl:
    """Thresholds chosen by `control_risks`, with what they promise (module docstring).

    labels: the run's labels. thresholds: label -> the lowest confidence at which a prediction
        of that label is answered (None: always deferred).
    targets, delta, fwer: the request; mode: "per-class" or "shared" (an accuracy target).
    family_delta: the level each family of candidates was tested at.
    n, deferral_rate: the calibration set's size and the share of it the thresholds defer.
    certified: per target, whether its guarantee holds (False: a recall target with no threshold).
    calibration: per target, its value and number of cases on the calibration set.
    grid_size: the number of candidate thresholds per family.
    """

    labels: tuple[str, ...]
    thresholds: dict
    targets: tuple[Target, ...]
    delta: float
    fwer: str
    mode: str
    family_delta: float
    n: int
    deferral_rate: float
    certified: tuple[bool, ...]
    calibration: tuple[dict, ...]
    grid_size: int

    def defers(self, prediction_index, confidence) -> np.ndarray:
        """Whether each decision is deferred: its label has no threshold, or its confidence is below it."""
        pred = np.asarray(prediction_index, dtype=np.int64)
        conf = np.asarray(confidence, dtype=np.float64)
        thr = np.array([np.inf if self.thresholds[lab] is None else self.thresholds[lab] for lab in self.labels])
        return ~(conf >= thr[pred])

    def guarantees_for(self, label: str) -> list[str]:
        """The certified targets that speak about an answered decision of `label`."""
        return [str(t) for t, ok in zip(self.targets, self.certified)
                if ok and (t.quantity == "accuracy" or (t.quantity == "precision" and t.label == label))]

    def _vacuous(self, target: Target) -> bool:
        """A precision or accuracy target that holds because its cases are never answered."""
        if target.quantity == "precision":
            return self.thresholds[target.label] is None
        return target.quantity == "accuracy" and all(t is None for t in self.thresholds.values())

    def band(self) -> dict:
        """The abstention band, per predicted label: a decision of that label whose confidence is
        below ``deferred_below`` is deferred (every one, when ``always_deferred``).

        Per label, not on one P(label) axis: a calibrator may keep a prediction whose calibrated
        probability is below another label's (Platt and isotonic map the confidence only).
        """
        return {lab: {"deferred_below": t, "always_deferred": t is None} for lab, t in self.thresholds.items()}

    def to_dict(self) -> dict:
        return {
            "kind": "decal.risk_control", "version": 1,
            "rule": "answer a prediction of label L when its confidence >= thresholds[L]; defer otherwise",
            "labels": list(self.labels), "thresholds": dict(self.thresholds), "band": self.band(),
            "delta": self.delta, "method": f"Learn-then-Test: binomial p-values (MAPIE), {self.fwer} family-wise control over {self.grid_size} thresholds",
            "fwer": self.fwer, "mode": self.mode, "family_delta": self.family_delta, "grid_size": self.grid_size,
            "n_calibration": self.n, "deferral_rate": self.deferral_rate,
            "guarantees": [
                {"target": str(t), "quantity": t.quantity, "label": t.label, "level": t.level, "delta": self.delta,
                 "certified": ok, "vacuous": self._vacuous(t),
                 "in_words": t.in_words(self.delta) + (" (vacuous: no such case is answered)" if self._vacuous(t) else ""),
                 "calibration": cal}
                for t, ok, cal in zip(self.targets, self.certified, self.calibration)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict, *, path=None) -> "RiskControl":
        """Rebuild from `to_dict` (a `decal threshold --out` file); errors name the field."""
        if not isinstance(data, dict) or data.get("kind") != "decal.risk_control":
            raise DataError("expected the JSON that `decal threshold --out` writes", path=path, field="kind")
        labels = data.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise DataError("must be a list of at least two labels", path=path, field="labels")
        thresholds = data.get("thresholds")
        if not isinstance(thresholds, dict) or set(thresholds) != set(labels):
            raise DataError(f"must map each of {labels} to a threshold or null", path=path, field="thresholds")
        for lab, t in thresholds.items():
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
                raise DataError(f"must be a number in [0, 1] or null; got {t!r}", path=path, field=f"thresholds.{lab}")
        guarantees = data.get("guarantees")
        if not isinstance(guarantees, list):
            raise DataError("must be a list", path=path, field="guarantees")
        try:
            targets = tuple(parse_target(g["target"], labels) for g in guarantees)
            certified = tuple(bool(g["certified"]) for g in guarantees)
            calibration = tuple(dict(g.get("calibration") or {}) for g in guarantees)
            numbers = {k: data[k] for k in ("delta", "family_delta", "n_calibration", "deferral_rate")}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed guarantee or missing number ({e})", path=path, field="guarantees") from e
        return cls(tuple(labels), {lab: thresholds[lab] for lab in labels}, targets, float(numbers["delta"]),
                   str(data.get("fwer", "auto")), str(data.get("mode", "per-class")), float(numbers["family_delta"]),
                   int(numbers["n_calibration"]), float(numbers["deferral_rate"]), certified, calibration,
                   int(data.get("grid_size", 0) or 0))


def _rate(successes: float, cases: float) -> float | None:
    return None if cases == 0 else float(successes / cases)


def _evaluate_targets(targets, thresholds, labels, conf, pred, correct, label) -> tuple[dict, ...]:
    """Each target's value and case count under `thresholds` (label -> value or None)."""
    thr = np.array([np.inf if thresholds[lab] is None else thresholds[lab] for lab in labels])
    answered = conf >= thr[pred]
    out = []
    for t in targets:
        if t.quantity == "accuracy":
            s, n = np.count_nonzero(answered & correct), np.count_nonzero(answered)
        else:
            k = labels.index(t.label)
            hit = answered & (pred == k) & correct
            s = np.count_nonzero(hit)
            n = np.count_nonzero(answered & (pred == k)) if t.quantity == "precision" else np.count_nonzero(label == k)
        out.append({"value": _rate(s, n), "n": int(n)})
    return tuple(out)


def _check_risk_inputs(confidence, prediction, correct, label, labels) -> tuple:
    conf, corr = check_conf_correct(confidence, correct)
    pred = check_labels(prediction, len(labels), "prediction")
    gold = check_labels(label, len(labels), "label")
    check_same_length(confidence=conf, prediction=pred, label=gold)
    return conf, pred, corr, gold


def control_risks(
    confidence, prediction, correct, label, *, labels: Sequence[str], targets: Sequence[Target], delta: float = 0.05,
    fwer: str = "auto", grid: np.ndarray | None = None,
) -> RiskControl:
    """Thresholds under which every target holds jointly with probability >= 1 - delta (module docstring).

    Args:
        confidence: Array of shape (n,), values in [0, 1], from the calibration run.
        prediction: Array of shape (n,), the predicted option index of each record.
        correct: Array of shape (n,), booleans (an invalid prediction is wrong).
        label: Array of shape (n,), the gold option index.
        labels: the option labels, in index order.
        targets: `Target`s (at least one).
        delta: the probability that some target fails, in (0, 1).
        fwer: "auto" (module docstring, step 3), "holm" (Bonferroni-Holm, MAPIE's default),
            "bonferroni", or "fixed_sequence" (from the lowest threshold up) within each family.
        grid: candidate thresholds fixed in advance (`threshold_grid()` by default).

    Example:
        Predictions right with probability equal to their confidence (uniform on [0.5, 1]): the
        precision of Safe answers above t is (1 + t) / 2, which reaches 0.9 at t = 0.8; the
        guarantee's margin on about 2,000 Safe predictions puts the threshold a little higher,
        and Unsafe, which has no target, is always answered:

        >>> rng = np.random.default_rng(0)
        >>> conf = rng.uniform(0.5, 1.0, 4000); pred = rng.integers(0, 2, 4000)
        >>> label = np.where(rng.random(4000) < conf, pred, 1 - pred)
        >>> rc = control_risks(conf, pred, label == pred, label, labels=["Safe", "Unsafe"],
        ...                    targets=[Target("precision", "Safe", 0.9)])
        >>> rc.thresholds["Unsafe"], round(rc.thresholds["Safe"], 2)
        (0.0, 0.9)
    """
    labels = tuple(labels)
    conf, pred, corr, gold = _check_risk_inputs(confidence, prediction, correct, label, labels)
    targets = tuple(targets)
    if not targets:
        raise ValueError("`targets` must hold at least one target, e.g. parse_target('accuracy>=0.9', labels)")
    _check_delta(delta)
    if fwer not in FWER_METHODS:
        raise ValueError(f"`fwer` must be one of {list(FWER_METHODS)}; got {fwer!r}")
    grid = threshold_grid() if grid is None else np.unique(np.asarray(grid, dtype=np.float64))
    shared = any(t.quantity == "accuracy" for t in targets)
    families = {None: targets} if shared else {lab: tuple(t for t in targets if t.label == lab) for lab in labels}
    families = {k: v for k, v in families.items() if v}
    family_delta = delta / len(families)
    chosen: dict = {lab: 0.0 for lab in labels}
    for lab, family in families.items():
        # A per-class target counts its own label's cases, whether its threshold is its own or shared.
        p = np.max([_p_values(*_counts(t, conf, pred, corr, gold, _index(labels, t.label), grid), t.level) for t in family], axis=0)
        valid = _valid_candidates(p, family_delta, _family_fwer(family, fwer))
        best = float(grid[valid.min()]) if valid.size else None
        for name in (labels if lab is None else (lab,)):
            chosen[name] = best
    calibration = _evaluate_targets(targets, chosen, labels, conf, pred, corr, gold)
    certified = tuple(not (t.quantity == "recall" and chosen[t.label] is None) for t in targets)
    rc = RiskControl(labels, chosen, targets, float(delta), fwer, "shared" if shared else "per-class", family_delta,
                     len(conf), 0.0, certified, calibration, len(grid))
    return RiskControl(**{**rc.__dict__, "deferral_rate": float(np.mean(rc.defers(pred, conf)))})


def apply_risk_control(rc: RiskControl, confidence, prediction, correct, label) -> dict:
    """What `rc` does on another run: its deferral rate and each target's value there."""
    conf, pred, corr, gold = _check_risk_inputs(confidence, prediction, correct, label, rc.labels)
    values = _evaluate_targets(rc.targets, rc.thresholds, rc.labels, conf, pred, corr, gold)
    return {"n": len(conf), "deferral_rate": float(np.mean(rc.defers(pred, conf))),
            "targets": [{"target": str(t), **v} for t, v in zip(rc.targets, values)]}


def choose_threshold(
    confidence, correct, *, target_accuracy: float, delta: float = 0.05, grid: np.ndarray | None = None
) -> ThresholdChoice:
    """The lowest threshold whose accepted predictions reach `target_accuracy` (module docstring).

    The accuracy-only case of `control_risks`, with Bonferroni over the grid: each of the ``m``
    thresholds is tested at ``delta / m``.

    Args:
        confidence: Array of shape (n,), values in [0, 1], from the calibration run.
        correct: Array of shape (n,), booleans.
        target_accuracy: Accuracy to promise on accepted predictions, in (0, 1).
        delta: Allowed probability that the promise fails (0.05).
        grid: Candidate thresholds fixed in advance (`threshold_grid()` by default).

    Returns:
        A `ThresholdChoice`; ``lower_bound`` is the Clopper-Pearson bound at level ``1 - delta / m``.

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
    zeros = np.zeros(len(conf), dtype=np.int64)  # one label: only the shared threshold matters
    rc = control_risks(conf, zeros, corr, np.where(corr, 0, 1), labels=("answer", "other"),
                       targets=[Target("accuracy", None, float(target_accuracy))], delta=delta, fwer="bonferroni", grid=grid)
    threshold = rc.thresholds["answer"]
    if threshold is None:
        return ThresholdChoice(None, 0.0, float("nan"), float("nan"), 0, len(conf), float(target_accuracy), float(delta))
    accepted = conf >= threshold
    n_acc, k_acc = int(np.count_nonzero(accepted)), int(np.count_nonzero(accepted & corr))
    return ThresholdChoice(
        threshold=threshold,
        coverage=n_acc / len(conf),
        accuracy=k_acc / n_acc,
        lower_bound=float(binomial_lower_bound(k_acc, n_acc, delta=delta / len(grid))),
        n_accepted=n_acc,
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
