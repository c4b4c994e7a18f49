"""When `decal serve` defers, and which guarantee an answer carries: thresholds, option sets, label mass.

`DeferralPolicy` gathers the three deferral rules a server may apply to each decision, after the
calibrator (`decal serve --threshold`, `--conformal`, `--min-label-mass`):

- threshold (`settings.load_threshold`): a value in [0, 1], a `decal threshold --out` file of
  an earlier release (one accuracy threshold), or a per-label file (`decal.selective.RiskControl`:
  one threshold per label, each guarantee with delta). A decision is deferred when its confidence
  (calibrated, with a calibrator) is below its label's threshold; an answer that is not deferred
  names the certified guarantees that speak about it (the accuracy of answered cases, the
  precision of its label). A reload (`decal.serve.app`) swaps the threshold, checked like this;
- conformal: a `decal conformal --out` file; the answer carries its option set and is deferred
  unless the set is exactly the decision (`decal.conformal`);
- min label mass: deferred when the options hold less than this share of the full-vocabulary
  probability together (the position read is probably not where the model decides).

The files must fit the server: their labels are the task's, and their scale (calibrated or raw)
is the one the server's calibrator gives; a mismatch stops the server before it binds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    """The deferral rules of one server (module docstring); each part None when not given.

    threshold: `settings.ThresholdInfo` (a value, a file of an earlier release, or a per-label
        file with its `risk_control`); a reload swaps it (`with_threshold`).
    conformal, conformal_scale: `decal.conformal.ConformalSets` and the probabilities it was fitted on.
    min_label_mass: defer below this label mass.
    """

    threshold: object = None
    conformal: object = None
    conformal_scale: str | None = None
    min_label_mass: float | None = None
    labels: tuple[str, ...] = ()

    def with_threshold(self, threshold) -> "DeferralPolicy":
        return replace(self, threshold=threshold)

    def check_fits(self, threshold, *, calibrated: bool) -> None:
        """Raise unless `threshold` and the conformal sets fit this server's labels and scale.

        Raises:
            ConfigError: a file whose scale is not the one the server gives (calibrated or raw).
            DataError: a per-label threshold file for other labels.
        """
        from ..metrics import input_scales

        scales = input_scales(calibrated=calibrated)
        rc = getattr(threshold, "risk_control", None)
        if rc is not None:
            if rc.labels != self.labels:
                raise DataError(f"labels {list(rc.labels)} differ from the task's {list(self.labels)}",
                                path=threshold.source, field="labels")
            if threshold.scale is not None and threshold.scale != scales["confidence"]:
                raise ConfigError(f"--threshold {threshold.source}: its thresholds compare {threshold.scale!r} but this server "
                                  f"gives {scales['confidence']!r}; serve with the calibrator the threshold run was calibrated with")
        if self.conformal is not None and self.conformal_scale != scales["class_probs"]:
            raise ConfigError(f"--conformal: its sets were fitted on {self.conformal_scale!r} but this server gives "
                              f"{scales['class_probs']!r}; serve with the calibrator the conformal run was calibrated with")

    def decide(self, records: Sequence[PredictionRecord]) -> list[Verdict]:
        """One `Verdict` per (calibrated) record."""
        records = list(records)
        sets = None
        if self.conformal is not None:
            from ..conformal import apply_conformal

            sets = [r.option_set for r in apply_conformal(self.conformal, records, labels=self.labels, scale=self.conformal_scale)]
        return [self._verdict(r, None if sets is None else sets[i]) for i, r in enumerate(records)]

    def _threshold_rule(self, r: PredictionRecord, conf: float) -> tuple[list[str], list[str]]:
        """(reasons to defer, guarantees) of the threshold for one decision."""
        thr = self.threshold
        rc = getattr(thr, "risk_control", None)
        if rc is not None:
            limit = rc.thresholds[r.prediction]
            reasons = [] if not thr.defers(conf, r.prediction) else [
                f"{r.prediction} is never answered: no threshold met its targets" if limit is None
                else f"confidence {conf:.6g} below the {r.prediction} threshold {limit:.6g}"]
            return reasons, rc.guarantees_for(r.prediction)
        reasons = [] if not thr.defers(conf) else [
            "no threshold met the target accuracy" if thr.value is None else f"confidence {conf:.6g} below the threshold {thr.value:.6g}"]
        return reasons, [] if thr.target_accuracy is None else [f"accuracy>={thr.target_accuracy:g}"]

    def _verdict(self, r: PredictionRecord, option_set: list[str] | None) -> Verdict:
        reasons, guarantees = [], []
        if self.threshold is not None:
            reasons, guarantees = self._threshold_rule(r, _final_confidence(r))
        if option_set is not None:
            if option_set != [r.prediction]:
                reasons.append(f"the option set holds {len(option_set)} labels" if option_set else "the option set is empty")
            guarantees.append(f"option set coverage>={1 - self.conformal.alpha:g}")
        if self.min_label_mass is not None and r.label_mass < self.min_label_mass:
            reasons.append(f"label mass {r.label_mass:.3g} below {self.min_label_mass:g}")
        defer = bool(reasons)
        return Verdict(defer=defer, reasons=tuple(reasons), guarantees=() if defer else tuple(guarantees), option_set=option_set)


def load_policy(*, threshold: str | None, conformal: str | None, min_label_mass: float | None,
                labels: Sequence[str], calibrated: bool) -> tuple[DeferralPolicy, dict]:
    """Read and check the deferral rules of `decal serve` (module docstring).

    Returns:
        (the policy, its identities for responses: ``threshold``, ``conformal``, ``min_label_mass``).

    Raises:
        ConfigError: a file whose scale is not the server's, or a label mass outside [0, 1].
        DataError: a malformed file, or one for other labels (the message names the file and field).
        FileNotFoundError: a file that does not exist.
    """
    from ..conformal import load_conformal
    from .settings import file_sha256, load_threshold

    labels = tuple(labels)
    if min_label_mass is not None and not (isinstance(min_label_mass, (int, float)) and 0.0 <= min_label_mass <= 1.0
                                           and math.isfinite(min_label_mass)):
        raise ConfigError(f"`--min-label-mass` must be in [0, 1]; got {min_label_mass!r}")
    thr = load_threshold(threshold) if threshold is not None else None
    sets = scale = None
    info: dict = {"threshold": None if thr is None else thr.to_dict(), "conformal": None, "min_label_mass": min_label_mass}
    if conformal is not None:
        path = Path(conformal)
        if not path.is_file():
            raise FileNotFoundError(f"--conformal {conformal}: no such file")
        sets, file_labels, scale = load_conformal(path)
        if file_labels != labels:
            raise DataError(f"labels {list(file_labels)} differ from the task's {list(labels)}", path=path, field="labels")
        info["conformal"] = {"source": str(path), "sha256": file_sha256(path), "alpha": sets.alpha, "score": sets.score,
                             "mondrian": sets.mondrian}
    policy = DeferralPolicy(threshold=thr, conformal=sets, conformal_scale=scale, min_label_mass=min_label_mass, labels=labels)
    policy.check_fits(thr, calibrated=calibrated)
    return policy, info
