"""The monitor's alarms against crepes, hand-computed values and simulated traffic with a known truth.

Records: `decal.serve.simulate.verdicts_records`, the `verdicts` generator's examples with a
model-like score (no model runs here); every label is drawn from the record's true probabilities.
That suffices for the false-alarm rates: the guarantee alarm's null is about the labels'
conditional mean and the drift alarm's about exchangeability, and both hold exactly for draws
from a pool of records whatever their scores; the score's shape only changes the delays.

Tolerance of every false-alarm check: if an alarm's false-alarm rate were exactly its level
alpha, the number of alarms in n independent streams would be Binomial(n, alpha); each check
allows up to that distribution's 99.9 % quantile, so a valid alarm fails it with probability at
most 0.001 (the seeds are fixed, so the outcome is deterministic). The same bound catches a
broken monitor: a fixed-sample test checked after every label fires in far more streams (below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, binom

from decal.serve.alarms import (
    DriftAlarm,
    GuaranteeAlarm,
    conformal_p_values,
    first_crossing,
    guarantee_log_capital,
    simple_jumper_log,
)
from decal.serve.simulate import simulate_streams, stream_pool, verdicts_records

ALPHA = 0.05


def _tolerance(n: int, alpha: float = ALPHA) -> int:
    return int(binom.ppf(0.999, n, alpha))


@pytest.fixture(scope="module")
def pools():
    """In-domain pool, the OOD variant's pool and a miscalibrated model's, served through one Platt
    calibrator and the threshold `decal threshold` picks on the in-domain validation split."""
    from decal.calibrators import apply_calibrator, fit_calibrator
    from decal.records import records_to_arrays
    from decal.selective import choose_threshold

    in_domain = verdicts_records("in")
    validation = [r for r in in_domain if r.split == "validation"]
    platt = fit_calibrator("platt", validation)
    calibrated = records_to_arrays(apply_calibrator(platt, validation))
    choice = choose_threshold(calibrated.confidence, calibrated.correct, target_accuracy=0.8)
    assert choice.threshold is not None

    def pool(records):
        return stream_pool(records, calibrator=platt, threshold=choice.threshold)

    return {
        "in": pool(in_domain),
        "ood": pool(verdicts_records("ood", read_accuracy=0.5, mass=(14.0, 3.0))),
        "miscalibrated": pool(verdicts_records("in", read_accuracy=0.7, sharpness=3.0, seed=1)),
        "target": choice.target_accuracy,
    }


def test_p_values_and_simple_jumper_equal_crepes():
    from crepes.martingales import SimpleJumper, semi_online_p_values

    rng = np.random.default_rng(4)
    scores = np.round(rng.beta(2, 5, size=400), 2)  # two decimals: many ties, which the smoothing must handle
    from decal.serve.alarms import quantize

    levels = quantize(scores).astype(float)
    np.random.seed(11)
    thetas = np.random.rand(len(scores))  # what crepes draws with seed=11
    expected = semi_online_p_values(levels, seed=11)
    np.testing.assert_array_equal(conformal_p_values(scores, thetas), expected)
    # a reference window first: its p-values are crepes' for the scores after it
    np.testing.assert_array_equal(conformal_p_values(scores[150:], thetas[150:], reference=scores[:150]), expected[150:])
    np.testing.assert_allclose(np.exp(simple_jumper_log(expected)), SimpleJumper().apply(expected), rtol=1e-12, atol=0)


def test_streaming_alarms_equal_the_vectorised_ones():
    rng = np.random.default_rng(5)
    reference = {"confidence": rng.random(300), "label_mass": rng.beta(5, 1, 300)}
    stream = {"confidence": rng.random(400) ** 0.7, "label_mass": rng.beta(5, 1, 400)}
    thetas = {k: rng.random(400) for k in stream}
    alarm = DriftAlarm(reference, alpha=ALPHA)
    logs = []
    for t in range(400):
        alarm.update({k: v[t] for k, v in stream.items()}, {k: v[t] for k, v in thetas.items()})
        logs.append(alarm.log_e_value)
    per_score = [simple_jumper_log(conformal_p_values(stream[k], thetas[k], reference=reference[k])) for k in stream]
    np.testing.assert_allclose(logs, np.logaddexp(*per_score) - math.log(2), rtol=0, atol=1e-12)
    correct = rng.random(300) < 0.8
    guarantee = GuaranteeAlarm(0.85, alpha=ALPHA, window=25)
    streamed = []
    for c in correct:
        guarantee.update(bool(c))
        streamed.append(guarantee.log_e_value)
    np.testing.assert_allclose(streamed, guarantee_log_capital(correct.astype(float), target=0.85, window=25), atol=1e-12)
    crossing = first_crossing(np.array(streamed), ALPHA)
    assert guarantee.fired_at == (None if crossing < 0 else crossing + 1)


def test_guarantee_capital_by_hand():
    # target 0.9; estimates start at mean 0.9, variance 0.09 (one pseudo-observation), window 25.
    # label 1 (wrong): gap 0 -> bet 0 -> K = 1; then mean 0.45, var (0.09 + 0.81) / 2 = 0.45.
    # label 2 (right): bet 0.45 / (0.45 + 0.2025) = 0.689655; K = 1 - 0.1 * 0.689655 = 0.931034;
    #   then mean (0.9 + 0 + 1) / 3 = 0.633333, var (2/3) 0.45 + (1/3) 0.55^2 = 0.400833.
    # label 3 (wrong): bet 0.266667 / (0.400833 + 0.071111) = 0.565037; K = 0.931034 * (1 + 0.9 * 0.565037).
    k = np.exp(guarantee_log_capital([0.0, 1.0, 0.0], target=0.9, window=25))
    np.testing.assert_allclose(k, [1.0, 0.931034, 0.931034 * (1 + 0.9 * 0.565037)], rtol=1e-5)
    # a missing label (NaN) changes nothing
    np.testing.assert_array_equal(guarantee_log_capital([0.0, np.nan, 1.0], target=0.9)[[0, 2]],
                                  guarantee_log_capital([0.0, 1.0], target=0.9))


def _naive_repeated_test(result_correct: np.ndarray, target: float) -> np.ndarray:
    """A broken guarantee monitor: a fixed-sample one-sided Clopper-Pearson test at ALPHA after every label."""
    seen = ~np.isnan(result_correct)
    k = np.cumsum(np.where(seen, result_correct, 0.0), axis=1)
    n = np.cumsum(seen, axis=1)
    upper = np.where(n > 0, beta.ppf(1 - ALPHA, k + 1, np.maximum(n - k, 1e-9)), 1.0)
    return ((upper < target) & seen).any(axis=1)


@pytest.mark.slow
def test_no_drift_false_alarm_rates_are_at_most_alpha(pools):
    pool = pools["in"]
    n_streams = 600
    # The least favourable null: the promise equals the pool's exact accuracy of answered decisions.
    result = simulate_streams(pool, None, n_streams=n_streams, n_reference=500, n_before=1000, label_rate=0.5,
                              target=pool.accuracy, alpha=ALPHA, seed=7)
    tolerance = _tolerance(n_streams)
    assert result.false_alarm_rate("guarantee") * n_streams <= tolerance
    assert result.false_alarm_rate("drift") * n_streams <= tolerance
    # The same streams' labels through a fixed-sample test checked after every label: far above alpha.
    rng = np.random.default_rng(7)
    idx = rng.integers(len(pool.confidence), size=(n_streams, 1000))
    labelled = rng.random(idx.shape) < 0.5
    correct = rng.random(idx.shape) < pool.p_correct[idx]
    observed = np.where(labelled & pool.answered[idx], correct.astype(float), np.nan)
    assert _naive_repeated_test(observed, pool.accuracy).sum() > tolerance


@pytest.mark.slow
@pytest.mark.parametrize("shifted", ["ood", "miscalibrated"])
def test_switch_mid_stream_fires_both_alarms(pools, shifted):
    n_streams = 200
    result = simulate_streams(pools["in"], pools[shifted], n_streams=n_streams, n_reference=500, n_before=500,
                              n_after=2000, label_rate=0.25, target=pools["target"], alpha=ALPHA, seed=8)
    assert pools[shifted].accuracy < pools["target"] < pools["in"].accuracy  # the promise holds before, not after
    for alarm in ("guarantee", "drift"):
        assert result.false_alarm_rate(alarm) * n_streams <= _tolerance(n_streams)
        detection = result.detection(alarm)
        assert detection["rate"] >= 0.9, (alarm, detection)
    # label-free, the drift alarm fires long before the labels show the accuracy drop
    assert result.detection("drift")["median_requests"] < result.detection("guarantee")["median_requests"]


def test_label_free_estimate(pools):
    inside, ood = pools["in"], pools["miscalibrated"]
    # Calibrated in domain: the mean calibrated confidence of answered decisions is their accuracy
    # (Platt fitted on 500 records: a few points of error).
    assert abs(inside.confidence[inside.answered].mean() - inside.accuracy) < 0.03
    # A miscalibrated model fools it; this is why the guarantee alarm watches labels.
    assert ood.confidence[ood.answered].mean() - ood.accuracy > 0.15
