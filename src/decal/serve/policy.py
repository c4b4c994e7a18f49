"""When `decal serve` defers, and which guarantee an answer carries: thresholds, option sets, label mass.

`DeferralPolicy` gathers the three deferral rules a server may apply to each decision, after the
calibrator (`decal serve --threshold`, `--conformal`, `--min-label-mass`):

- threshold: a value in [0, 1], a `decal threshold --out` file of an earlier release (one
  accuracy threshold, `settings.load_threshold`), or a risk-control file (`decal.selective.
  RiskControl`: one threshold per label, each guarantee with delta). A decision is deferred
  when its confidence (calibrated, with a calibrator) is below its label's threshold; an answer
  that is not deferred names the certified guarantees that speak about it (the accuracy of
  answered cases, the precision of its label);
- conformal: a `decal conformal --out` file; the answer carries its option set and is deferred
  unless the set is exactly the decision (`decal.conformal`);
- min label mass: deferred when the options hold less than this share of the full-vocabulary
  probability together (the position read is probably not where the model decides).

The files must fit the server: their labels are the task's, and their scale (calibrated or raw)
is the one the server's calibrator gives; a mismatch stops the server before it binds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, DataError
from ..records import PredictionRecord

__all__ = ["Verdict", "DeferralPolicy", "load_policy"]


@dataclass(frozen=True)
class Verdict:
    """The policy's word on one decision: defer or not, why, the guarantees, the option set."""

    defer: bool
    reasons: tuple[str, ...] = ()
    guarantees: tuple[str, ...] = ()
    option_set: list[str] | None = None


def _final_confidence(r: PredictionRecord) -> float:
    """The confidence a threshold compares: calibrated when the server calibrates, else raw."""
    return r.confidence if r.calibrated_confidence is None else r.calibrated_confidence


@dataclass(frozen=True, kw_only=True)
class DeferralPolicy:
    """The deferral rules of one server (module docstring); each part None when not given."""

    threshold: object = None  # settings.ThresholdInfo (a value or an earlier file)
    risk_control: object = None  # decal.selective.RiskControl
    conformal: object = None  # decal.conformal.ConformalSets
    conformal_scale: str | None = None
    min_label_mass: float | None = None
    labels: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    def decide(self, records: Sequence[PredictionRecord]) -> list[Verdict]:
        """One `Verdict` per (calibrated) record."""
        records = list(records)
        sets = None
        if self.conformal is not None:
            from ..conformal import apply_conformal

            sets = [r.option_set for r in apply_conformal(self.conformal, records, labels=self.labels, scale=self.conformal_scale)]
        return [self._verdict(r, None if sets is None else sets[i]) for i, r in enumerate(records)]

    def _verdict(self, r: PredictionRecord, option_set: list[str] | None) -> Verdict:
        reasons, guarantees = [], []
        conf = _final_confidence(r)
        if self.risk_control is not None:
            index = self.labels.index(r.prediction)
            limit = self.risk_control.thresholds[r.prediction]
            if bool(self.risk_control.defers([index], [conf])[0]):
                reasons.append(f"{r.prediction} is never answered: no threshold met its targets" if limit is None
                               else f"confidence {conf:.6g} below the {r.prediction} threshold {limit:.6g}")
            guarantees += self.risk_control.guarantees_for(r.prediction)
        elif self.threshold is not None:
            if self.threshold.defers(conf):
                reasons.append("no threshold met the target accuracy" if self.threshold.value is None
                               else f"confidence {conf:.6g} below the threshold {self.threshold.value:.6g}")
            if self.threshold.target_accuracy is not None:
                guarantees.append(f"accuracy>={self.threshold.target_accuracy:g}")
        if option_set is not None:
            if option_set != [r.prediction]:
                reasons.append(f"the option set holds {len(option_set)} labels" if option_set else "the option set is empty")
            guarantees.append(f"option set coverage>={1 - self.conformal.alpha:g}")
        if self.min_label_mass is not None and r.label_mass < self.min_label_mass:
            reasons.append(f"label mass {r.label_mass:.3g} below {self.min_label_mass:g}")
        defer = bool(reasons)
        return Verdict(defer=defer, reasons=tuple(reasons), guarantees=() if defer else tuple(guarantees), option_set=option_set)


def _risk_control(path: Path, labels: tuple[str, ...], calibrated: bool):
    from .._io import read_json
    from ..metrics import input_scales
    from ..selective import RiskControl

    data = read_json(path)
    rc = RiskControl.from_dict(data, path=path)
    if rc.labels != labels:
        raise DataError(f"labels {list(rc.labels)} differ from the task's {list(labels)}", path=path, field="labels")
    scale, served = data.get("scale"), input_scales(calibrated=calibrated)["confidence"]
    if scale is not None and scale != served:
        raise ConfigError(f"--threshold {path}: its thresholds compare {scale!r} but this server gives {served!r}; "
                          f"serve with the calibrator the threshold run was calibrated with" + ("" if calibrated else " (--calibrator)"))
    return rc


def _conformal(path: Path, labels: tuple[str, ...], calibrated: bool):
    from ..conformal import load_conformal
    from ..metrics import input_scales

    sets, file_labels, scale = load_conformal(path)
    if file_labels != labels:
        raise DataError(f"labels {list(file_labels)} differ from the task's {list(labels)}", path=path, field="labels")
    served = input_scales(calibrated=calibrated)["class_probs"]
    if scale != served:
        raise ConfigError(f"--conformal {path}: its sets were fitted on {scale!r} but this server gives {served!r}; "
                          "serve with the calibrator the conformal run was calibrated with")
    return sets, scale


def load_policy(*, threshold: str | None, conformal: str | None, min_label_mass: float | None,
                labels: Sequence[str], calibrated: bool) -> DeferralPolicy:
    """Read and check the deferral rules of `decal serve` (module docstring).

    Raises:
        ConfigError: a file whose scale is not the server's, or a label mass outside [0, 1].
        DataError: a malformed file, or one for other labels (the message names the file and field).
        FileNotFoundError: a file that does not exist.
    """
    from .._io import read_json
    from .settings import file_sha256, load_threshold

    labels = tuple(labels)
    if min_label_mass is not None and not (isinstance(min_label_mass, (int, float)) and 0.0 <= min_label_mass <= 1.0
                                           and math.isfinite(min_label_mass)):
        raise ConfigError(f"`--min-label-mass` must be in [0, 1]; got {min_label_mass!r}")
    info: dict = {"threshold": None, "conformal": None, "min_label_mass": min_label_mass}
    parts: dict = {}
    if threshold is not None:
        path = Path(threshold)
        data = read_json(path) if path.is_file() else None
        if isinstance(data, dict) and data.get("kind") == "decal.risk_control":
            rc = _risk_control(path, labels, calibrated)
            parts["risk_control"] = rc
            info["threshold"] = {"source": str(path), "sha256": file_sha256(path), "thresholds": rc.thresholds,
                                 "band": rc.band(), "delta": rc.delta, "deferral_rate": rc.deferral_rate,
                                 "guarantees": [str(t) for t, ok in zip(rc.targets, rc.certified) if ok]}
        else:
            parts["threshold"] = load_threshold(threshold)
            info["threshold"] = parts["threshold"].to_dict()
    if conformal is not None:
        path = Path(conformal)
        if not path.is_file():
            raise FileNotFoundError(f"--conformal {conformal}: no such file")
        parts["conformal"], parts["conformal_scale"] = _conformal(path, labels, calibrated)
        info["conformal"] = {"source": str(path), "sha256": file_sha256(path), "alpha": parts["conformal"].alpha,
                             "score": parts["conformal"].score, "mondrian": parts["conformal"].mondrian}
    return DeferralPolicy(labels=labels, min_label_mass=min_label_mass, info=info, **parts)
