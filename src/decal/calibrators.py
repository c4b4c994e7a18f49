"""Post-hoc calibrators: temperature scaling, Platt scaling and isotonic regression.

All three follow scikit-learn's shape: ``__init__`` stores parameters, ``fit(scores, y)``
returns ``self``, fitted attributes end in ``_``, ``transform`` before ``fit`` raises
`NotFittedError`, and ``to_dict`` / ``from_dict`` / ``save`` / ``load`` use JSON of plain numbers
(never pickle).

- `TemperatureScaling` (Guo et al. 2017) fits one temperature ``T`` by minimising the NLL of
  ``softmax(option_logprobs / T)`` against the gold option. Only the options' log-probabilities
  are known (not the rest of the vocabulary), so the result is a distribution over the options.
- `PlattScaling` (Platt 1999) fits ``p = sigmoid(a * logit(confidence) + b)`` to ``correct``
  with Platt's smoothed targets ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``.
- `IsotonicCalibration` (Zadrozny & Elkan 2002) fits scikit-learn's
  ``IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)`` of ``correct`` on
  ``confidence``; a saved calibrator keeps the thresholds and predicts by linear interpolation,
  exactly as scikit-learn does. With fewer than about 1000 fitting examples isotonic regression
  overfits (a staircase of few steps); prefer Platt scaling there.

On prediction records (`apply_calibrator`) the raw fields never change: ``confidence`` and
``option_probs`` stay the model's full-vocabulary probabilities, and the prediction, ``correct``
and ``valid`` stay as they are. The calibrated values go beside them (docs/design.md, "Label mass"):
``calibrated_probs`` (a distribution over the options) and ``calibrated_confidence`` (its value
at the prediction), with ``extra["calibrator"]`` naming the method. Calibrators always fit on and
transform the raw fields, so applying one to an already calibrated run replaces its calibration.
- Temperature scaling gives ``calibrated_probs`` the tempered distribution over the options.
  Note the change of scale: a probability among the options, not a full-vocabulary one.
- Platt and isotonic map the confidence only. To keep SCE, MCE, Brier and NLL consistent with
  it, ``calibrated_probs`` gives the predicted option the calibrated confidence and shares
  ``1 - confidence`` among the others in proportion to their raw probabilities (uniformly if
  those were all 0). For two options this is exactly ``(c, 1 - c)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ._io import read_json, write_json_atomic
from .errors import DataError, NotFittedError
from ._checks import check_conf_correct, check_labels, check_probabilities, check_same_length

__all__ = [
    "TemperatureScaling",
    "PlattScaling",
    "IsotonicCalibration",
    "CALIBRATORS",
    "make_calibrator",
    "fit_calibrator",
    "apply_calibrator",
    "load_calibrator",
]

# Confidences of exactly 0 or 1 occur (float32 rounding of very confident models); the logit
# is taken after clipping to [_CLIP, 1 - _CLIP] so it stays finite (|logit| <= 27.6).
_CLIP = 1e-12


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class _Calibrator:
    """Shared persistence; subclasses define `name`, `_params`, `_fitted` and the two hooks."""

    name = ""
    _params: tuple[str, ...] = ()
    _fitted: tuple[str, ...] = ()

    def _check_fitted(self) -> None:
        if not all(hasattr(self, f) for f in self._fitted):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call `fit` first.")

    def to_dict(self) -> dict:
        """Parameters and fitted values as JSON-ready plain numbers and lists."""
        self._check_fitted()
        out = {"method": self.name, "params": {p: getattr(self, p) for p in self._params}}
        out["fitted"] = {f: _plain(getattr(self, f)) for f in self._fitted}
        return out

    @classmethod
    def from_dict(cls, data: dict, *, path=None):
        """Rebuild a fitted calibrator; malformed input raises `DataError` naming the field."""
        if not isinstance(data, dict):
            raise DataError("calibrator must be a JSON object", path=path)
        if data.get("method") != cls.name:
            raise DataError(f"expected {cls.name!r}; got {data.get('method')!r}", path=path, field="method")
        params, fitted = data.get("params", {}), data.get("fitted")
        if not isinstance(params, dict):
            raise DataError("must be an object", path=path, field="params")
        if not isinstance(fitted, dict):
            raise DataError("must be an object of fitted values", path=path, field="fitted")
        unknown = set(params) - set(cls._params)
        if unknown:
            raise DataError(f"unknown parameter(s) {sorted(unknown)}; expected {list(cls._params)}", path=path, field="params")
        obj = cls(**params)
        for f in cls._fitted:
            if f not in fitted:
                raise DataError("missing fitted value", path=path, field=f"fitted.{f}")
            setattr(obj, f, obj._load_value(f, fitted[f], path))
        obj._validate_loaded(path)
        return obj

    def save(self, path: str | os.PathLike) -> None:
        """Write `to_dict` as JSON (atomically)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a calibrator saved by `save`."""
        return cls.from_dict(read_json(path), path=Path(path))

    def _load_value(self, field: str, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise DataError(f"must be a finite number; got {value!r}", path=path, field=f"fitted.{field}")
        return float(value)

    def _validate_loaded(self, path) -> None:
        """Cross-field checks after loading; nothing by default."""

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self._params)
        return f"{type(self).__name__}({args})"


def _plain(value):
    if isinstance(value, np.ndarray):
        return [float(v) for v in value]
    return float(value)


def _minimize(fun, x0: np.ndarray, bounds=None) -> np.ndarray:
    """L-BFGS-B on a function returning (loss, gradient)."""
    from scipy.optimize import minimize

    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds)
    return np.asarray(res.x, dtype=np.float64)


class TemperatureScaling(_Calibrator):
    """One temperature for the options' log-probabilities, fitted by NLL (module docstring).

    Args:
        max_temperature: Upper bound of the search, ``T`` in ``[1/max, max]`` (100).

    Example:
        >>> logp = np.log([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
        >>> ts = TemperatureScaling().fit(logp, [0, 0, 0, 1])
        >>> round(float(ts.transform(logp)[0, 0]), 3)  # the empirical accuracy 3/4
        0.75
    """

    name = "temperature"
    _params = ("max_temperature",)
    _fitted = ("temperature_",)

    def __init__(self, max_temperature: float = 100.0):
        self.max_temperature = max_temperature

    @staticmethod
    def _check_scores(scores) -> np.ndarray:
        arr = np.asarray(scores, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
            raise ValueError(f"`option_logprobs` must have shape (n, K) with n >= 1, K >= 2; got shape {arr.shape}.")
        if np.isnan(arr).any() or (arr == np.inf).any():
            raise ValueError("`option_logprobs` must not hold nan or +inf; -inf (probability 0) is allowed.")
        # A zero probability is -inf; clip so it stays a finite, very unlikely option.
        return np.maximum(arr, np.log(np.finfo(np.float64).tiny))

    def fit(self, option_logprobs, labels) -> "TemperatureScaling":
        """Fit ``T`` on log-probabilities (n, K) and integer gold option indices (n,)."""
        z = self._check_scores(option_logprobs)
        y = check_labels(labels, z.shape[1])
        check_same_length(option_logprobs=z, labels=y)
        if not (isinstance(self.max_temperature, (int, float)) and self.max_temperature > 1):
            raise ValueError(f"`max_temperature` must be a number > 1; got {self.max_temperature!r}.")
        z = z - z.max(axis=1, keepdims=True)
        rows = np.arange(len(y))
        bound = float(np.log(self.max_temperature))

        def nll_and_grad(x):
            scaled = z * np.exp(x[0])  # x[0] = log(1 / T)
            lse = np.log(np.sum(np.exp(scaled - scaled.max(axis=1, keepdims=True)), axis=1)) + scaled.max(axis=1)
            p = np.exp(scaled - lse[:, None])
            loss = np.mean(lse - scaled[rows, y])
            # d/ds of mean(lse - scaled_y) = mean(E_p[scaled] - scaled_y)
            grad = np.mean(np.sum(p * scaled, axis=1) - scaled[rows, y])
            return loss, np.array([grad])

        log_inv_t = float(_minimize(nll_and_grad, np.zeros(1), bounds=[(-bound, bound)])[0])
        self.temperature_ = float(np.exp(-log_inv_t))
        return self

    def transform(self, option_logprobs) -> np.ndarray:
        """Calibrated distributions over the options, shape (n, K)."""
        self._check_fitted()
        z = self._check_scores(option_logprobs) / self.temperature_
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def _validate_loaded(self, path) -> None:
        if not self.temperature_ > 0:
            raise DataError(f"must be > 0; got {self.temperature_!r}", path=path, field="fitted.temperature_")


class PlattScaling(_Calibrator):
    """``sigmoid(a * logit(confidence) + b)`` fitted with Platt's smoothed targets.

    Example:
        Identity-calibrated data keeps a close to 1 and b close to 0:

        >>> c = np.repeat([0.2, 0.8], 500); y = np.r_[np.arange(500) < 100, np.arange(500) < 400]
        >>> p = PlattScaling().fit(c, y)
        >>> round(p.a_, 1), abs(round(p.b_, 1))
        (1.0, 0.0)
    """

    name = "platt"
    _fitted = ("a_", "b_")

    def fit(self, confidence, correct) -> "PlattScaling":
        """Fit on confidences (n,) in [0, 1] and booleans `correct` (n,)."""
        conf, corr = check_conf_correct(confidence, correct)
        x = _logit(conf)
        n_pos = float(corr.sum())
        n_neg = float(len(corr) - n_pos)
        # Platt (1999): targets pulled off 0 and 1 so a separable fit stays finite.
        t = np.where(corr, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

        def loss_and_grad(w):
            z = w[0] * x + w[1]
            # Cross-entropy with soft targets: log(1 + e^z) - t z, written stably.
            loss = np.mean(np.logaddexp(0.0, z) - t * z)
            r = _sigmoid(z) - t
            return loss, np.array([np.mean(r * x), np.mean(r)])

        self.a_, self.b_ = (float(v) for v in _minimize(loss_and_grad, np.array([1.0, 0.0])))
        return self

    def transform(self, confidence) -> np.ndarray:
        """Calibrated confidences, shape (n,)."""
        self._check_fitted()
        conf = check_probabilities(confidence, "confidence")
        return _sigmoid(self.a_ * _logit(conf) + self.b_)


class IsotonicCalibration(_Calibrator):
    """Monotone step-wise map of confidence to accuracy (scikit-learn's isotonic regression).

    Example:
        >>> iso = IsotonicCalibration().fit([0.1, 0.4, 0.6, 0.9], [0, 1, 0, 1])
        >>> iso.transform([0.0, 0.5, 1.0]).tolist()
        [0.0, 0.5, 1.0]
    """

    name = "isotonic"
    _fitted = ("X_thresholds_", "y_thresholds_")

    def fit(self, confidence, correct) -> "IsotonicCalibration":
        """Fit on confidences (n,) in [0, 1] and booleans `correct` (n,)."""
        from sklearn.isotonic import IsotonicRegression

        conf, corr = check_conf_correct(confidence, correct)
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
        iso.fit(conf, corr.astype(np.float64))
        self.X_thresholds_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds_ = np.asarray(iso.y_thresholds_, dtype=np.float64)
        return self

    def transform(self, confidence) -> np.ndarray:
        """Calibrated confidences (n,): linear interpolation between thresholds, clipped."""
        self._check_fitted()
        conf = check_probabilities(confidence, "confidence")
        if len(self.X_thresholds_) == 1:
            return np.full(conf.shape, self.y_thresholds_[0])
        return np.clip(np.interp(conf, self.X_thresholds_, self.y_thresholds_), 0.0, 1.0)

    def _load_value(self, field: str, value, path):
        if not isinstance(value, list) or not value:
            raise DataError("must be a non-empty list of numbers", path=path, field=f"fitted.{field}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise DataError("must hold only numbers", path=path, field=f"fitted.{field}")
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise DataError("must hold numbers in [0, 1]", path=path, field=f"fitted.{field}")
        return arr

    def _validate_loaded(self, path) -> None:
        if len(self.X_thresholds_) != len(self.y_thresholds_):
            raise DataError(
                f"has {len(self.y_thresholds_)} values but X_thresholds_ has {len(self.X_thresholds_)}",
                path=path,
                field="fitted.y_thresholds_",
            )
        for f in self._fitted:
            if np.any(np.diff(getattr(self, f)) < 0):
                raise DataError("must be non-decreasing", path=path, field=f"fitted.{f}")


CALIBRATORS = {"temperature": TemperatureScaling, "platt": PlattScaling, "isotonic": IsotonicCalibration}


def make_calibrator(name: str) -> _Calibrator:
    """A new, unfitted calibrator by name (`CALIBRATORS`)."""
    if name not in CALIBRATORS:
        import difflib

        close = difflib.get_close_matches(str(name), CALIBRATORS, n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ValueError(f"Unknown calibrator {name!r}.{hint} Available: {', '.join(CALIBRATORS)}.")
    return CALIBRATORS[name]()


def load_calibrator(path: str | os.PathLike) -> _Calibrator:
    """Load any saved calibrator; its ``method`` field picks the class."""
    path = Path(path)
    data = read_json(path)
    method = data.get("method") if isinstance(data, dict) else None
    if method not in CALIBRATORS:
        raise DataError(f"unknown calibrator {method!r}; expected one of {list(CALIBRATORS)}", path=path, field="method")
    return CALIBRATORS[method].from_dict(data, path=path)


def _option_logprobs(arrays) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(arrays.option_probs)


def fit_calibrator(calibrator: str | _Calibrator, records: Sequence) -> _Calibrator:
    """Fit a calibrator (or a name from `CALIBRATORS`) on prediction records.

    Temperature scaling fits on the options' log-probabilities and gold options; Platt and
    isotonic fit on the raw ``confidence`` and ``correct`` (a calibrated run's calibrated values
    are ignored). Invalid predictions are kept (they are wrong).
    """
    from .records import records_to_arrays

    cal = make_calibrator(calibrator) if isinstance(calibrator, str) else calibrator
    arrays = records_to_arrays(list(records), scale="raw")
    if isinstance(cal, TemperatureScaling):
        return cal.fit(_option_logprobs(arrays), arrays.label_index)
    return cal.fit(arrays.confidence, arrays.correct)


def _rescale_options(class_probs: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Give the predicted option `conf` and share ``1 - conf`` among the others by their mass."""
    n, k = class_probs.shape
    rows = np.arange(n)
    others = class_probs.copy()
    others[rows, pred] = 0.0
    mass = others.sum(axis=1, keepdims=True)
    uniform = np.full((n, k), 1.0 / (k - 1))
    uniform[rows, pred] = 0.0
    share = np.where(mass > 0, others / np.where(mass > 0, mass, 1.0), uniform)
    out = share * (1.0 - conf)[:, None]
    out[rows, pred] = conf
    return out


def apply_calibrator(calibrator: _Calibrator, records: Sequence) -> list:
    """New prediction records with ``calibrated_probs`` and ``calibrated_confidence`` (module docstring).

    The raw ``confidence`` and ``option_probs``, the prediction, ``correct`` and ``valid`` are
    unchanged.
    """
    from .records import records_to_arrays

    records = list(records)
    # raw: a calibrator maps the model's values; served decisions have no gold, and calibration reads none
    arrays = records_to_arrays(records, scale="raw", require_gold=False)
    rows = np.arange(len(records))
    if isinstance(calibrator, TemperatureScaling):
        new_probs = calibrator.transform(_option_logprobs(arrays))
        new_conf = new_probs[rows, arrays.prediction_index]
    else:
        new_conf = calibrator.transform(arrays.confidence)
        new_probs = _rescale_options(arrays.class_probs, arrays.prediction_index, new_conf)
    return [
        r.with_calibration([float(v) for v in p], float(c), calibrator=calibrator.name)
        for r, c, p in zip(records, new_conf, new_probs)
    ]
