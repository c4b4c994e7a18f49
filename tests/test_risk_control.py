"""decal.selective's per-class risk control: targets, equality with MAPIE, and the guarantee by simulation.

The guarantees are tested against a known truth (issue #23, "Must show"). The population is the
2,000 examples of the generated `verdicts` task (train, validation and test), each with its true
label distribution `true_probs`, and a fixed model-like score: the true probability made
overconfident and noisy (`sigmoid(2 logit(p) + N(0, 0.3))`, drawn once). Records are simulated
from the generator's truth rather than scored by SmolLM2: the guarantee assumes nothing about the
score (it is distribution-free), only that the calibration records are an i.i.d. sample of the
population with labels drawn from their truth, which the simulation makes exactly true and
cheap to repeat 250 times; the score only has to make the targets bind, which the plug-in check
below shows it does. Each repetition draws a calibration set i.i.d. from the population, draws
its labels from `true_probs`, chooses thresholds, and compares them with the population's true
rates, computed exactly from `true_probs` (no test-sample noise: the guarantee is about the
population, and a finite test split would add noise the guarantee does not cover).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from decal.selective import (
    RiskControl,
    Target,
    apply_risk_control,
    choose_threshold,
    control_risks,
    parse_target,
    threshold_grid,
)

LABELS = ("Positive", "Negative")
N_REPEATS = 250
N_PLUG_IN = 100  # repetitions that also run the uncorrected rule (slower, and only needs to fail often)


@pytest.fixture(scope="module")
def population():
    from decal.tasks import load_task

    examples = [e for split in ("train", "validation", "test") for e in load_task("verdicts", split).examples]
    truth = np.array([e.true_probs for e in examples])  # (N, 2), aligned with LABELS
    rng = np.random.default_rng(0)
    logit = np.log(truth[:, 0] / truth[:, 1])
    score = 1.0 / (1.0 + np.exp(-(2.0 * logit + rng.normal(0.0, 0.3, len(truth)))))  # the model's P(Positive)
    probs = np.c_[score, 1.0 - score]
    return truth, probs.argmax(1), probs.max(1), probs


def _true_rates(targets, thresholds, truth, pred, conf):
    """Each target's rate on the whole population, exactly, from the true label probabilities."""
    thr = np.array([np.inf if thresholds[lab] is None else thresholds[lab] for lab in LABELS])
    answered = conf >= thr[pred]
    right = truth[np.arange(len(pred)), pred]  # P(the prediction is right)
    out = []
    for t in targets:
        if t.quantity == "accuracy":
            out.append(right[answered].sum() / max(answered.sum(), 1) if answered.any() else 1.0)
            continue
        k = LABELS.index(t.label)
        mine = answered & (pred == k)
        if t.quantity == "precision":
            out.append(truth[mine, k].sum() / mine.sum() if mine.any() else 1.0)  # nothing answered: vacuous
        else:
            out.append(truth[mine, k].sum() / truth[:, k].sum())
    return np.array(out)


def _draw(rng, truth, pred, conf, n):
    idx = rng.integers(0, len(truth), n)  # i.i.d. from the population
    label = (rng.random(n) >= truth[idx, 0]).astype(int)  # 0 = Positive with probability truth[:, 0]
    return conf[idx], pred[idx], pred[idx] == label, label


def _tolerance(delta: float, repeats: int) -> float:
    """Violations are Binomial(repeats, q) with q <= delta when the guarantee holds; the test allows
    the 99.9 % quantile of Binomial(repeats, delta), so a procedure that keeps its promise fails
    this test with probability below 0.001, and one whose q exceeds it by ~3 sd fails often."""
    return binom.ppf(0.999, repeats, delta) / repeats - delta


def _plug_in(targets, conf, pred, correct, label, grid):
    """The uncorrected rule: lowest threshold whose empirical rates meet every target (no guarantee)."""
    thresholds = {}
    above = conf[:, None] >= grid[None, :]  # (n, m)
    for k, lab in enumerate(LABELS):
        answered = above & (pred == k)[:, None]
        right = (answered & correct[:, None]).sum(0)
        ok = np.ones(len(grid), dtype=bool)
        for t in (t for t in targets if t.label == lab):
            cases = answered.sum(0) if t.quantity == "precision" else np.full(len(grid), max((label == k).sum(), 1))
            ok &= (cases > 0) & (right >= t.level * cases)
        thresholds[lab] = float(grid[int(np.argmax(ok))]) if ok.any() else None
    return thresholds


@pytest.mark.parametrize(
    ("targets", "delta", "n_cal"),
    [
        (["precision(Positive)>=0.8", "recall(Negative)>=0.7"], 0.05, 800),
        (["precision(Positive)>=0.82", "precision(Negative)>=0.82"], 0.1, 800),
        (["accuracy>=0.8", "precision(Negative)>=0.8"], 0.1, 500),
    ],
)
def test_targets_hold_jointly_with_probability_one_minus_delta(population, targets, delta, n_cal):
    truth, pred, conf, _ = population
    parsed = [parse_target(t, LABELS) for t in targets]
    rng = np.random.default_rng(1)
    grid = threshold_grid()
    levels = np.array([t.level for t in parsed])
    violations = plug_in_violations = deferred = answered_all = 0
    for _ in range(N_REPEATS):
        c, p, ok, y = _draw(rng, truth, pred, conf, n_cal)
        rc = control_risks(c, p, ok, y, labels=LABELS, targets=parsed, delta=delta)
        # A violation: some target the file calls certified misses its level in the population.
        violations += np.any((_true_rates(parsed, rc.thresholds, truth, pred, conf) < levels) & np.array(rc.certified))
        deferred += rc.deferral_rate
        answered_all += all(rc.certified) and None not in rc.thresholds.values()
        if _ < N_PLUG_IN and not any(t.quantity == "accuracy" for t in parsed):
            naive = _plug_in(parsed, c, p, ok, y, grid)
            plug_in_violations += np.any(_true_rates(parsed, naive, truth, pred, conf) < [t.level for t in parsed])
    assert violations / N_REPEATS <= delta + _tolerance(delta, N_REPEATS)
    # Not vacuous: in most draws every target is certified with every label answered above its
    # threshold, and most cases are answered...
    assert answered_all / N_REPEATS > 0.6 and deferred / N_REPEATS < 0.7
    # ...and the targets bind: without the correction they fail far more often than delta.
    if not any(t.quantity == "accuracy" for t in parsed):
        assert plug_in_violations / N_PLUG_IN > delta + 2 * _tolerance(delta, N_PLUG_IN)


def _answered_grid(probs):
    """The grid below every label's largest confidence: MAPIE gives a nan p-value where no case is
    answered (and its Holm then rejects nothing); decal gives p = 1 there (tested below)."""
    grid = threshold_grid()
    top = min(probs.max(1)[probs.argmax(1) == k].max() for k in range(probs.shape[1]))
    return grid[grid < top]


def _mapie_valid(probs, label, risks, levels, delta, grid):
    from mapie.risk_control import MultiClassificationLTTController

    controller = MultiClassificationLTTController(
        predict_function=lambda X: probs[X], risks=risks, target_level=list(levels), confidence_level=1 - delta,
        list_predict_params=grid, classes=np.array([0, 1]), fwer_method="bonferroni_holm",
    )
    controller.calibrate(np.arange(len(label)), label)
    return controller.valid_predict_params


def test_thresholds_equal_mapie_learn_then_test_on_the_same_arrays(population):
    """Per label, decal's valid thresholds are MAPIE's `MultiClassificationLTTController`'s with that
    label's targets at the label's share of delta; the chosen one is the lowest valid."""
    from mapie.risk_control.risks import build_precision_ovr, build_recall_ovr

    truth, pred, conf, probs = population
    rng = np.random.default_rng(2)
    idx = rng.integers(0, len(truth), 1000)
    label = (rng.random(1000) >= truth[idx, 0]).astype(int)
    p = probs[idx]
    grid = _answered_grid(p)
    targets = [Target("precision", "Positive", 0.8), Target("recall", "Positive", 0.3), Target("precision", "Negative", 0.8)]
    rc = control_risks(p.max(1), p.argmax(1), p.argmax(1) == label, label, labels=LABELS, targets=targets, delta=0.1, grid=grid)
    assert rc.family_delta == pytest.approx(0.05)  # two labels with targets
    pos = _mapie_valid(p, label, [build_precision_ovr([0])[0], build_recall_ovr([0])[0]], [0.8, 0.3], 0.05, grid)
    neg = _mapie_valid(p, label, build_precision_ovr([1]), [0.8], 0.05, grid)
    assert len(pos) and len(neg)  # both targets reachable, so the comparison has content
    assert rc.thresholds["Positive"] == float(pos.min()) and rc.thresholds["Negative"] == float(neg.min())


def test_recall_only_labels_equal_mapie_fixed_sequence_testing(population):
    from mapie.risk_control import MultiClassificationLTTController
    from mapie.risk_control.risks import build_recall_ovr

    truth, pred, conf, probs = population
    rng = np.random.default_rng(6)
    idx = rng.integers(0, len(truth), 400)
    label = (rng.random(400) >= truth[idx, 0]).astype(int)
    p = probs[idx]
    grid = _answered_grid(p)
    controller = MultiClassificationLTTController(
        predict_function=lambda X: p[X], risks=build_recall_ovr([1]), target_level=[0.6], confidence_level=0.95,
        list_predict_params=grid, classes=np.array([0, 1]), fwer_method="fixed_sequence",
    ).calibrate(np.arange(400), label)
    rc = control_risks(p.max(1), p.argmax(1), p.argmax(1) == label, label, labels=LABELS,
                       targets=[Target("recall", "Negative", 0.6)], delta=0.05, grid=grid)
    assert len(controller.valid_predict_params) > 1
    assert rc.thresholds["Negative"] == float(controller.valid_predict_params.min()) == 0.0


def test_accuracy_target_equals_mapie_with_a_shared_threshold(population):
    from mapie.risk_control import BinaryRisk

    truth, pred, conf, probs = population
    rng = np.random.default_rng(3)
    idx = rng.integers(0, len(truth), 500)
    label = (rng.random(500) >= truth[idx, 0]).astype(int)
    p = probs[idx]
    grid = _answered_grid(p)
    answered_accuracy = BinaryRisk(  # accuracy of the answered (non-abstained) cases
        risk_occurrence=lambda y, yp: yp == y, risk_condition=lambda y, yp: yp == yp, higher_is_better=True)
    valid = _mapie_valid(p, label, [answered_accuracy], [0.85], 0.1, grid)
    rc = control_risks(p.max(1), p.argmax(1), p.argmax(1) == label, label, labels=LABELS,
                       targets=[Target("accuracy", None, 0.85)], delta=0.1, grid=grid)
    assert rc.mode == "shared" and rc.thresholds["Positive"] == rc.thresholds["Negative"] == float(valid.min())


def test_a_threshold_nothing_reaches_does_not_block_the_others():
    """Non-regression against MAPIE 1.6.0's Holm: a candidate with no answered case has a nan
    p-value there, and its step-down test stops at it before rejecting anything."""
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 0.97, 2000)  # nothing reaches the grid's thresholds above 0.97
    pred = np.zeros(2000, dtype=int)
    label = np.where(rng.random(2000) < conf, 0, 1)
    rc = control_risks(conf, pred, pred == label, label, labels=LABELS, targets=[Target("precision", "Positive", 0.7)])
    assert rc.thresholds["Positive"] is not None and rc.thresholds["Positive"] < 0.7


def test_unreachable_targets_defer_and_say_so():
    conf, pred = np.full(50, 0.9), np.r_[np.zeros(25, int), np.ones(25, int)]
    label = 1 - pred  # every prediction wrong
    rc = control_risks(conf, pred, pred == label, label, labels=LABELS,
                       targets=[Target("precision", "Positive", 0.9), Target("recall", "Negative", 0.9)])
    assert rc.thresholds == {"Positive": None, "Negative": None}
    assert rc.certified == (True, False)  # no Positive answer keeps its precision; no recall without answers
    assert rc.deferral_rate == 1.0 and np.all(rc.defers(pred, conf))
    assert [g["vacuous"] for g in rc.to_dict()["guarantees"]] == [True, False]
    assert rc.band()["Positive"] == {"deferred_below": None, "always_deferred": True}


def test_threshold_file_round_trip_and_band(population):
    truth, pred, conf, _ = population
    rng = np.random.default_rng(4)
    c, p, ok, y = _draw(rng, truth, pred, conf, 1000)
    rc = control_risks(c, p, ok, y, labels=LABELS, targets=[parse_target("precision(Positive)>=0.75", LABELS),
                                                            parse_target("precision(Negative)>=0.75", LABELS)])
    assert None not in rc.thresholds.values()
    back = RiskControl.from_dict(rc.to_dict())
    assert back.thresholds == rc.thresholds and back.targets == rc.targets and back.deferral_rate == rc.deferral_rate
    band = rc.to_dict()["band"]
    assert band == {lab: {"deferred_below": rc.thresholds[lab], "always_deferred": False} for lab in LABELS}
    applied = apply_risk_control(rc, c, p, ok, y)
    assert applied["deferral_rate"] == pytest.approx(rc.deferral_rate)
    assert rc.guarantees_for("Positive") == ["precision(Positive)>=0.75"] and rc.guarantees_for("Negative") == ["precision(Negative)>=0.75"]


def test_choose_threshold_is_the_accuracy_only_case():
    rng = np.random.default_rng(5)
    conf = rng.random(1000)
    correct = rng.random(1000) < conf
    choice = choose_threshold(conf, correct, target_accuracy=0.8)
    rc = control_risks(conf, np.zeros(1000, int), correct, np.where(correct, 0, 1), labels=LABELS,
                       targets=[Target("accuracy", None, 0.8)], fwer="bonferroni")
    assert choice.threshold == rc.thresholds["Positive"]
    # Holm rejects at least what Bonferroni does, so its threshold is never higher
    holm = control_risks(conf, np.zeros(1000, int), correct, np.where(correct, 0, 1), labels=LABELS,
                         targets=[Target("accuracy", None, 0.8)])
    assert holm.thresholds["Positive"] <= choice.threshold


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("precision(Positive)", "must look like"),
        ("precison(Positive)>=0.9", "Did you mean: precision?"),
        ("recall(Maybe)>=0.9", "not one of the run's labels"),
        ("recall>=0.9", "needs a label"),
        ("accuracy(Positive)>=0.9", "takes no label"),
        ("accuracy>=1", "must be a number in (0, 1)"),
    ],
)
def test_bad_targets_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_target(text, LABELS)
