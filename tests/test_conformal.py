"""decal.conformal: sets equal MAPIE's and crepes' on the same arrays, and coverage by simulation.

Coverage is tested against a known truth, as in `test_risk_control.py`: the population is the
2,000 `verdicts` examples with their `true_probs` (and, for a four-option case, 2,000 examples
whose truth is drawn from a Dirichlet), the model's probabilities a fixed overconfident, noisy
function of the truth; records are simulated from the truth (the guarantee needs only
exchangeable calibration and test draws, not a real model). Each repetition draws a calibration
set i.i.d. from the population with labels from the truth, fits the sets, and computes their
coverage on the whole population exactly: ``mean_i sum_k 1[k in C_i] true_probs[i, k]``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from decal.cli import main
from decal.conformal import ConformalSets, apply_conformal, conformal_scores, load_conformal
from decal.errors import DataError
from decal.records import PredictionRecord, RecordWriter, read_records

N_REPEATS = 250


def _population(kind: str):
    rng = np.random.default_rng(0)
    if kind == "verdicts":
        from decal.tasks import load_task

        truth = np.array([e.true_probs for s in ("train", "validation", "test") for e in load_task("verdicts", s).examples])
    else:
        truth = rng.dirichlet(np.full(4, 0.6), 2000)
    logits = 2.0 * np.log(np.clip(truth, 1e-6, 1)) + rng.normal(0, 0.5, truth.shape)  # overconfident and noisy
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return truth, probs / probs.sum(1, keepdims=True)


def _draw(rng, truth, probs, n):
    idx = rng.integers(0, len(truth), n)
    cum = np.cumsum(truth[idx], axis=1)
    label = np.minimum((rng.random(n)[:, None] > cum).sum(1), truth.shape[1] - 1)
    return probs[idx], label


def _coverage_tolerance(values: np.ndarray) -> float:
    """The mean of N_REPEATS i.i.d. coverages (one per calibration draw) is compared with its
    bound; 3.3 standard errors (estimated from the draws) make a one-sided test whose false
    alarm rate is about 0.0005 by the central limit theorem, and a rule whose expected coverage
    misses the bound by 0.01 (about 10 standard errors here) fails it."""
    return 3.3 * float(np.std(values, ddof=1)) / np.sqrt(len(values))


@pytest.mark.parametrize(("kind", "score", "mondrian", "alpha", "n_cal"), [
    ("verdicts", "lac", False, 0.1, 300),
    ("verdicts", "lac", True, 0.1, 400),
    ("dirichlet", "lac", False, 0.1, 300),
    ("dirichlet", "aps", False, 0.1, 300),
    ("dirichlet", "aps", True, 0.2, 600),
])
def test_coverage_is_at_least_one_minus_alpha(kind, score, mondrian, alpha, n_cal):
    truth, probs = _population(kind)
    rng = np.random.default_rng(1)
    k = truth.shape[1]
    marginal, per_class = [], []
    for _ in range(N_REPEATS):
        p, y = _draw(rng, truth, probs, n_cal)
        members = ConformalSets(alpha, score=score, mondrian=mondrian).fit(p, y).predict(probs)  # (N, K)
        covered = members * truth  # P(gold option k and k in the set)
        marginal.append(covered.sum(1).mean())
        per_class.append(covered.sum(0) / truth.sum(0))  # P(gold in set | gold = k)
    marginal, per_class = np.array(marginal), np.array(per_class)
    assert marginal.mean() >= 1 - alpha - _coverage_tolerance(marginal)
    if mondrian:  # class-conditional: every label's coverage
        for c in range(k):
            assert per_class[:, c].mean() >= 1 - alpha - _coverage_tolerance(per_class[:, c])
    if score == "lac" and not mondrian:
        # Not vacuous: continuous scores make split conformal nearly exact, at most 1/(n+1) over.
        assert marginal.mean() <= 1 - alpha + 1 / (n_cal + 1) + _coverage_tolerance(marginal)


def test_marginal_coverage_fails_per_class_where_mondrian_holds():
    """The per-class check above can fail: marginal LAC sets under-cover the rarer, harder label."""
    truth, probs = _population("verdicts")
    truth = truth.copy()
    truth[:, 0] = np.clip(truth[:, 0] * 1.25, 0, 1)  # make Positive the common label...
    truth[:, 1] = 1 - truth[:, 0]
    rng = np.random.default_rng(2)
    worst = []
    for _ in range(50):
        p, y = _draw(rng, truth, probs, 400)
        members = ConformalSets(0.1).fit(p, y).predict(probs)
        worst.append(((members * truth).sum(0) / truth.sum(0)).min())
    assert np.mean(worst) < 0.9 - 0.02  # ...and the marginal sets miss 90 % on the other label


class _Fixed:
    """A prefit scikit-learn classifier whose probabilities are looked up by row index."""

    _estimator_type = "classifier"

    def __init__(self, probs):
        self.probs = probs
        self.classes_ = np.arange(probs.shape[1])

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return self.probs[np.asarray(X, dtype=int).ravel()]

    def predict(self, X):
        return self.predict_proba(X).argmax(1)

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True), classifier_tags=ClassifierTags())

    def get_params(self, deep=True):
        return {"probs": self.probs}

    def __sklearn_is_fitted__(self):
        return True


@pytest.fixture(scope="module")
def arrays():
    truth, probs = _population("dirichlet")
    rng = np.random.default_rng(3)
    idx = rng.permutation(len(truth))
    cal, test = idx[:700], idx[700:1000]
    cum = np.cumsum(truth, axis=1)
    label = np.minimum((rng.random(len(truth))[:, None] > cum).sum(1), 3)
    return probs, label, cal, test


def test_lac_sets_equal_mapie_and_crepes(arrays):
    from crepes import ConformalClassifier
    from mapie.classification import SplitConformalClassifier

    probs, label, cal, test = arrays
    ours = ConformalSets(0.1).fit(probs[cal], label[cal]).predict(probs[test])
    mapie = SplitConformalClassifier(_Fixed(probs), confidence_level=0.9, conformity_score="lac", prefit=True)
    mapie.conformalize(cal.reshape(-1, 1), label[cal])
    _, mapie_sets = mapie.predict_set(test.reshape(-1, 1))
    np.testing.assert_array_equal(ours, mapie_sets[:, :, 0])
    crepes = ConformalClassifier().fit(1 - probs[cal, label[cal]])
    np.testing.assert_array_equal(ours, crepes.predict_set(1 - probs[test], confidence=0.9, smoothing=False).astype(bool))
    assert 1.2 < ours.sum(1).mean() < 3.5  # sets of varying size, not trivially all or one


def test_mondrian_sets_equal_crepes_class_conditional(arrays):
    from crepes import ConformalClassifier

    probs, label, cal, test = arrays
    ours = ConformalSets(0.1, mondrian=True).fit(probs[cal], label[cal]).predict(probs[test])
    crepes = ConformalClassifier().fit(1 - probs[cal, label[cal]], bins=label[cal])
    # crepes' class-conditional p-values: each candidate label's score against its own bin
    # (as crepes.WrapClassifier(class_cond=True) computes them).
    p_values = np.stack([crepes.predict_p(1 - probs[test], bins=np.full(len(test), c), smoothing=False)[:, c]
                         for c in range(4)], axis=1)
    np.testing.assert_array_equal(ours, p_values >= 1 - 0.9)


def test_aps_scores_equal_mapie_cumulative_probability(arrays):
    from mapie.conformity_scores import APSConformityScore

    probs, label, cal, _ = arrays
    mapie_scores, _ = APSConformityScore.get_true_label_cumsum_proba(label[cal], probs[cal], np.arange(4))
    ours = conformal_scores(probs[cal], score="aps")[np.arange(len(cal)), label[cal]]
    np.testing.assert_allclose(ours, mapie_scores[:, 0], rtol=0, atol=1e-12)
    # a set is the top-ranked options whose cumulative probability stays within the quantile
    sets = ConformalSets(0.1, score="aps").fit(probs[cal], label[cal])
    members = sets.predict(probs[:50])
    for row, m in zip(probs[:50], members):
        order = np.argsort(-row, kind="stable")
        kept = np.cumsum(row[order]) <= sets.quantiles_[0] + 1e-8
        assert set(order[kept]) == set(np.flatnonzero(m))


def test_small_calibration_sets_include_everything():
    # ceil(6 * 0.9) = 6 > 5 examples: no finite quantile, every option stays in
    sets = ConformalSets(0.1).fit(np.full((5, 2), 0.5), [0, 1, 0, 1, 0])
    assert np.isinf(sets.quantiles_).all() and sets.predict([[0.99, 0.01]]).all()


def _records(probs, label, *, labels=("Safe", "Unsafe"), calibrated=False):
    out = []
    for i, (p, y) in enumerate(zip(probs, label)):
        pred = int(np.argmax(p))
        raw = [float(v) * 0.3 for v in p]  # label mass 0.3: the sets read the renormalised scale
        r = PredictionRecord(id=str(i), task="toy", split="test", label=labels[y], prediction=labels[pred],
                             correct=bool(pred == y), valid=True, confidence=raw[pred], option_probs=raw, labels=list(labels))
        out.append(r.with_calibration(list(map(float, p)), float(p[pred]), calibrator="platt") if calibrated else r)
    return out


def test_conformal_file_round_trip_and_scale_check(tmp_path):
    truth, probs = _population("verdicts")
    rng = np.random.default_rng(4)
    p, y = _draw(rng, truth, probs, 300)
    records = _records(p, y)
    sets = ConformalSets(0.1, score="aps", mondrian=True).fit(p, y)
    from decal.conformal import save_conformal

    save_conformal(tmp_path / "c.json", sets, labels=("Safe", "Unsafe"), scale="option_probs / label mass")
    back, labels, scale = load_conformal(tmp_path / "c.json")
    np.testing.assert_array_equal(back.quantiles_, sets.quantiles_)
    with_sets = apply_conformal(back, records, labels=labels, scale=scale)
    np.testing.assert_array_equal([[lab in r.option_set for lab in labels] for r in with_sets], sets.predict(p))
    with pytest.raises(DataError, match="fitted on 'option_probs / label mass' but this run gives 'calibrated_probs'"):
        apply_conformal(back, _records(p, y, calibrated=True), labels=labels, scale=scale)
    bad = json.loads((tmp_path / "c.json").read_text())
    bad["quantiles"]["Safe"] = "big"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="field 'quantiles.Safe'"):
        load_conformal(tmp_path / "bad.json")


def test_conformal_command_writes_runs_with_sets_and_metrics_show_coverage(tmp_path, capsys):
    truth, probs = _population("verdicts")
    rng = np.random.default_rng(5)
    for name, n in (("cal", 400), ("test", 300)):
        (tmp_path / name).mkdir()
        p, y = _draw(rng, truth, probs, n)
        with RecordWriter(tmp_path / name / "predictions.jsonl") as w:
            w.write_batch(_records(p, y))
    out = tmp_path / "sets"
    assert main(["conformal", str(tmp_path / "cal"), "--alpha", "0.1", "--mondrian", "--apply", str(tmp_path / "test"),
                 "--out", str(out)]) == 0
    assert "coverage" in capsys.readouterr().out
    conformal = json.loads((out / "conformal.json").read_text())
    assert conformal["mondrian"] and conformal["n_calibration"] == 400 and set(conformal["quantiles"]) == {"Safe", "Unsafe"}
    records = read_records(out / "test")
    assert all(r.option_set is not None for r in records) and len(records) == 300
    assert json.loads((out / "test" / "run.json").read_text())["conformal"]["subset"] == "all"
    assert main(["metrics", str(out / "test"), "--bootstrap", "20", "--no-figure"]) == 0
    report = json.loads((out / "test" / "metrics.json").read_text())
    for key in ("set_coverage", "mean_set_size", "singleton_share", "set_coverage[Safe]", "mean_set_size[Unsafe]"):
        assert report["metrics"][key]["scale"] == "option_set"
    assert 0.8 < report["metrics"]["set_coverage"]["value"] <= 1.0
    assert report["metrics"]["mean_label_mass"]["value"] == pytest.approx(0.3)
    assert report["metrics"]["low_label_mass_share"]["value"] == 1.0
