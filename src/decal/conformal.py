"""Split-conformal option sets on decision-token probabilities (docs/design.md, "Guarantees").

A set holds the options whose nonconformity score is at most a quantile of the scores of the
gold options on a calibration run. If the calibration run and a new example are exchangeable
(an i.i.d. sample of one population), the set holds the new example's gold option with
probability at least ``1 - alpha``; with ``mondrian`` (class-conditional, one quantile per gold
label) it does so for the examples of every label separately.

- Probabilities: the distribution over the options that `decal.records.records_to_arrays` gives,
  ``calibrated_probs`` on a calibrated run, else ``option_probs`` renormalised by the label mass.
  A fitted set applies only to runs on the same scale.
- Scores (MAPIE's names): ``lac``, ``1 - p[k]`` (Sadinle et al. 2019), the smallest sets on
  average; ``aps``, the probability of the options ranked at or above ``k`` (Romano et al. 2020,
  without the randomisation, so a served set is reproducible; its coverage is then at least, not
  exactly, ``1 - alpha``), sets that grow where the model is unsure.
- Quantile: the ``ceil((n + 1)(1 - alpha))``-th smallest calibration score, as MAPIE computes it
  (``get_conformity_score_quantiles``); ``inf`` (the option is always in the set) when that
  rank exceeds ``n``, i.e. fewer than ``1 / alpha - 1`` calibration examples (per label with
  ``mondrian``).
- Set: ``{k : score[k] - quantile <= 1e-8}`` (MAPIE's tolerance for float rounding).

An answer is given alone only when its set holds one option; an empty set (possible with LAC when
every option is unlikely) is deferred too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ._checks import check_class_probs, check_labels, check_same_length
from ._io import read_json, write_json_atomic
from .errors import DataError, NotFittedError

__all__ = ["SCORES", "ConformalSets", "conformal_scores", "apply_conformal", "load_conformal", "save_conformal"]

Score = Literal["lac", "aps"]
SCORES = ("lac", "aps")
# MAPIE's tolerance (mapie._machine_precision.EPSILON): a score equal to the quantile up to
# float rounding stays in the set.
_TOLERANCE = 1e-8


def conformal_scores(class_probs, *, score: Score = "lac") -> np.ndarray:
    """The nonconformity score of every option, shape (n, K) (module docstring).

    Example:
        >>> conformal_scores([[0.7, 0.2, 0.1]], score="aps").round(2).tolist()
        [[0.7, 0.9, 1.0]]
    """
    probs = check_class_probs(class_probs)
    if score == "lac":
        return 1.0 - probs
    if score != "aps":
        raise ValueError(f"`score` must be one of {list(SCORES)}; got {score!r}")
    # The ranking MAPIE's APS uses (descending by probability; ties: the later option first).
    order = np.fliplr(np.argsort(probs, axis=1))
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    out = np.empty_like(probs)
    np.put_along_axis(out, order, cumulative, axis=1)
    return out


def _quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal order statistic of `scores` (MAPIE's), or inf when n is too small."""
    from mapie.conformity_scores import LACConformityScore

    n = len(scores)
    if n == 0 or np.ceil((n + 1) * (1 - alpha)) > n:
        return math.inf
    return float(LACConformityScore().get_conformity_score_quantiles(scores, np.array([alpha]), cv="prefit")[0])


class ConformalSets:
    """Split-conformal option sets (module docstring), in scikit-learn's shape.

    Args:
        alpha: miscoverage, in (0, 1): sets hold the gold option with probability >= 1 - alpha.
        score: "lac" or "aps".
        mondrian: one quantile per gold label (class-conditional coverage).

    Attributes:
        quantiles_: (K,) the quantile each option is compared with (all equal without mondrian;
            inf where the calibration run was too small).
        n_: calibration examples; n_per_class_: (K,) of them per gold label.

    Example:
        Ten calibration examples, nine gold scores of 0.1 and one of 0.4 (LAC): the quantile is the
        ceil(11 * 0.8) = 9th smallest score, 0.1.

        >>> p = np.array([[0.9, 0.1]] * 9 + [[0.4, 0.6]]); y = np.array([0] * 9 + [1])
        >>> sets = ConformalSets(alpha=0.2).fit(p, y)
        >>> round(float(sets.quantiles_[0]), 2), sets.predict([[0.95, 0.05], [0.5, 0.5]]).tolist()
        (0.1, [[True, False], [False, False]])
    """

    def __init__(self, alpha: float = 0.1, *, score: Score = "lac", mondrian: bool = False):
        self.alpha = alpha
        self.score = score
        self.mondrian = mondrian

    def _check_params(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha < 1.0:
            raise ValueError(f"`alpha` must be in (0, 1); got {self.alpha!r}. 0.1 asks for sets that hold the answer 90 % of the time.")
        if self.score not in SCORES:
            raise ValueError(f"`score` must be one of {list(SCORES)}; got {self.score!r}")

    def fit(self, class_probs, labels) -> "ConformalSets":
        """Fit the quantile(s) on calibration distributions (n, K) and gold option indices (n,)."""
        self._check_params()
        probs = check_class_probs(class_probs)
        y = check_labels(labels, probs.shape[1])
        check_same_length(class_probs=probs, labels=y)
        gold = conformal_scores(probs, score=self.score)[np.arange(len(y)), y]
        k = probs.shape[1]
        self.n_ = len(y)
        self.n_per_class_ = np.bincount(y, minlength=k)
        if self.mondrian:
            self.quantiles_ = np.array([_quantile(gold[y == c], self.alpha) for c in range(k)])
        else:
            self.quantiles_ = np.full(k, _quantile(gold, self.alpha))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "quantiles_"):
            raise NotFittedError("This ConformalSets is not fitted yet; call `fit` first.")

    def predict(self, class_probs) -> np.ndarray:
        """Set membership (n, K), booleans."""
        self._check_fitted()
        probs = check_class_probs(class_probs)
        if probs.shape[1] != len(self.quantiles_):
            raise ValueError(f"`class_probs` must have {len(self.quantiles_)} columns (the fitted options); got {probs.shape[1]}")
        return conformal_scores(probs, score=self.score) - self.quantiles_[None, :] <= _TOLERANCE

    def to_dict(self, *, labels: Sequence[str], scale: str) -> dict:
        """The conformal file (docs/design.md, "Guarantees"); an infinite quantile is written as null."""
        self._check_fitted()
        q = [None if math.isinf(v) else float(v) for v in self.quantiles_]
        return {
            "kind": "decal.conformal", "version": 1, "alpha": float(self.alpha), "score": self.score,
            "mondrian": bool(self.mondrian), "labels": list(labels), "scale": scale,
            "n_calibration": int(self.n_), "n_per_class": dict(zip(labels, map(int, self.n_per_class_))),
            "quantile": None if self.mondrian else q[0], "quantiles": dict(zip(labels, q)),
            "guarantee": (f"the set holds the gold label with probability at least {1 - self.alpha:g}"
                          + (" for the examples of each label" if self.mondrian else "")),
        }

    @classmethod
    def from_dict(cls, data: dict, *, path=None) -> tuple["ConformalSets", tuple[str, ...], str]:
        """(sets, labels, scale) from `to_dict`; malformed input raises `DataError` naming the field."""
        if not isinstance(data, dict) or data.get("kind") != "decal.conformal":
            raise DataError("expected the JSON that `decal conformal --out` writes", path=path, field="kind")
        labels = data.get("labels")
        if not isinstance(labels, list) or len(labels) < 2:
            raise DataError("must be a list of at least two labels", path=path, field="labels")
        quantiles = data.get("quantiles")
        if not isinstance(quantiles, dict) or set(quantiles) != set(labels):
            raise DataError(f"must map each of {labels} to a number or null", path=path, field="quantiles")
        for lab, q in quantiles.items():
            if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q)):
                raise DataError(f"must be a number or null (always in the set); got {q!r}", path=path, field=f"quantiles.{lab}")
        sets = cls(data.get("alpha"), score=data.get("score"), mondrian=bool(data.get("mondrian")))
        try:
            sets._check_params()
        except ValueError as e:
            raise DataError(str(e), path=path, field="alpha/score") from e
        sets.quantiles_ = np.array([math.inf if quantiles[lab] is None else float(quantiles[lab]) for lab in labels])
        sets.n_ = int(data.get("n_calibration", 0))
        per_class = data.get("n_per_class") or {}
        sets.n_per_class_ = np.array([int(per_class.get(lab, 0)) for lab in labels])
        return sets, tuple(labels), str(data.get("scale", ""))


def load_conformal(path: str | os.PathLike) -> tuple[ConformalSets, tuple[str, ...], str]:
    """Read a conformal file written by `decal conformal --out` (see `ConformalSets.from_dict`)."""
    path = Path(path)
    return ConformalSets.from_dict(read_json(path), path=path)


def save_conformal(path: str | os.PathLike, sets: ConformalSets, *, labels: Sequence[str], scale: str, **info) -> None:
    """Write `sets.to_dict` (plus `info`, e.g. the calibration run) as JSON, atomically."""
    write_json_atomic(path, {**sets.to_dict(labels=labels, scale=scale), **info})


def apply_conformal(sets: ConformalSets, records: Sequence, *, labels: Sequence[str], scale: str) -> list:
    """Copies of `records` with their `option_set`.

    Raises:
        DataError: the records' labels or probability scale differ from those the sets were fitted on.
    """
    from .metrics import input_scales
    from .records import records_to_arrays

    records = list(records)
    arrays = records_to_arrays(records, require_gold=False)  # a set needs no gold; served decisions have none
    if tuple(arrays.labels) != tuple(labels):
        raise DataError(f"the run's labels {list(arrays.labels)} differ from the conformal file's {list(labels)}", field="labels")
    run_scale = input_scales(calibrated=arrays.calibrated)["class_probs"]
    if run_scale != scale:
        raise DataError(f"the sets were fitted on {scale!r} but this run gives {run_scale!r}; "
                        "apply them to runs calibrated the same way as the calibration run", field="scale")
    members = sets.predict(arrays.class_probs)
    return [r.with_option_set([lab for lab, m in zip(labels, row) if m]) for r, row in zip(records, members)]
