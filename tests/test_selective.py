"""decal.selective: the binomial bound, the threshold choice and its guarantee, applying it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from decal.selective import apply_threshold, binomial_lower_bound, choose_threshold, threshold_grid


def test_binomial_lower_bound_closed_forms():
    # k = n: P(all n correct | p) = p^n = delta  ->  p = delta^(1/n)
    assert float(binomial_lower_bound(20, 20, delta=0.05)) == pytest.approx(0.05 ** (1 / 20))
    # k = 0: no evidence of any accuracy
    assert float(binomial_lower_bound(0, 20)) == 0.0
    # k = n - 1 (n=2): solve P(X >= 1 | p) = 1 - (1-p)^2 = delta
    assert float(binomial_lower_bound(1, 2, delta=0.1)) == pytest.approx(1 - math.sqrt(0.9))
    bounds = binomial_lower_bound([5, 50, 500], [10, 100, 1000])
    assert np.all(bounds < 0.5) and np.all(np.diff(bounds) > 0)  # tighter with more data


def test_grid_is_fixed_and_dense_near_one():
    grid = threshold_grid()
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.all(np.diff(grid) > 0)
    assert 1 - 1e-6 in grid and 0.999 in grid


def test_choose_threshold_hand_case():
    # 100 correct at 0.95, 100 with 60 % correct at 0.7, 100 wrong at 0.2.
    conf = np.r_[np.full(100, 0.95), np.full(100, 0.7), np.full(100, 0.2)]
    correct = np.r_[np.ones(100, bool), np.arange(100) < 60, np.zeros(100, bool)]
    m = len(threshold_grid())
    choice = choose_threshold(conf, correct, target_accuracy=0.8)
    # Accepting >= 0.7 gives 160/200 correct, whose lower bound is below 0.8; only the 0.95
    # group passes, and 0.71 is the lowest grid point that accepts it alone.
    assert choice.threshold == pytest.approx(0.71)
    assert (choice.n_accepted, choice.coverage, choice.accuracy) == (100, 1 / 3, 1.0)
    assert choice.lower_bound == pytest.approx((0.05 / m) ** (1 / 100))  # union bound over the grid
    loose = choose_threshold(conf, correct, target_accuracy=0.69)
    assert loose.threshold == pytest.approx(0.21) and loose.n_accepted == 200
    # 160/200 has bound 0.693 at level 1 - 0.05 / m (0.748 without the correction): 0.7 fails.
    assert choose_threshold(conf, correct, target_accuracy=0.7).threshold == pytest.approx(0.71)


def test_flat_confidence_accepts_everything_when_the_whole_run_is_good_enough():
    # A run whose confidence says nothing still gets threshold 0 if its accuracy clears the bar.
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.9, 1.0, 300)
    correct = rng.random(300) < 0.75
    choice = choose_threshold(conf, correct, target_accuracy=0.6)
    assert choice.threshold == 0.0 and choice.coverage == 1.0


def test_no_threshold_when_the_target_is_out_of_reach():
    choice = choose_threshold([0.9] * 5, [True] * 5, target_accuracy=0.9)  # 5 examples cannot show 90 %
    assert choice.threshold is None and choice.coverage == 0.0 and choice.n_accepted == 0
    result = apply_threshold([0.9, 0.1], [True, False], choice.threshold)
    assert result.coverage == 0.0 and math.isnan(result.accuracy)
    assert choice.to_dict()["accuracy"] is None  # JSON-ready


def test_promise_holds_with_the_stated_probability():
    """Repeat the choice on fresh calibration samples; the true accuracy above the chosen
    threshold must fall below the target in at most about delta of the repetitions."""
    rng = np.random.default_rng(0)
    target, delta, failures, thresholds = 0.8, 0.1, 0, []
    for _ in range(300):
        conf = rng.random(2000)
        correct = rng.random(2000) < conf  # perfectly calibrated: accuracy above t is (1 + t) / 2
        choice = choose_threshold(conf, correct, target_accuracy=target, delta=delta)
        if choice.threshold is not None:
            thresholds.append(choice.threshold)
            failures += (1 + choice.threshold) / 2 < target
    assert failures / 300 <= delta
    # Not vacuous: nearly always a threshold, and not far above the ideal one (0.6).
    assert len(thresholds) > 290 and np.mean(thresholds) < 0.75


def test_apply_threshold_counts():
    r = apply_threshold([0.9, 0.8, 0.8, 0.1], [True, False, True, False], 0.8)
    assert (r.n_accepted, r.coverage, r.accuracy, r.n) == (3, 0.75, pytest.approx(2 / 3), 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_accuracy": 1.0}, r"`target_accuracy` must be in \(0, 1\)"),
        ({"target_accuracy": 0.9, "delta": 0.0}, r"`delta` must be in \(0, 1\)"),
    ],
)
def test_invalid_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_threshold([0.5], [True], **kwargs)


def test_invalid_arrays_and_threshold():
    with pytest.raises(ValueError, match="`confidence` must be finite"):
        choose_threshold([float("nan")], [True], target_accuracy=0.5)
    with pytest.raises(ValueError, match="`confidence` has 2, `correct` has 1"):
        apply_threshold([0.5, 0.4], [True], 0.5)
    with pytest.raises(ValueError, match="`threshold` must be in"):
        apply_threshold([0.5], [True], 1.5)
