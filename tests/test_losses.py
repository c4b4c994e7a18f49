"""Tests for decal.training.losses: CE targets and the decision-token CE (issue #6 item 3)."""

from __future__ import annotations

import math

import pytest
import torch

from decal.training.losses import decision_ce, decision_targets


# --- decision_targets: hand-computed values -------------------------------------------------


def test_uniform_targets_one_hot_when_correct_uniform_when_wrong_zero_when_invalid():
    t = decision_targets([2, 0, 1, 4], [2, 3, -1, 4], 5)
    assert t.shape == (4, 5)
    assert t[0].tolist() == [0, 0, 1, 0, 0]
    assert torch.allclose(t[1], torch.full((5,), 0.2))
    assert t[2].tolist() == [0, 0, 0, 0, 0]
    assert t[3].tolist() == [0, 0, 0, 0, 1]


def test_group_accuracy_targets_follow_the_rule_for_right_and_wrong_rollouts():
    # K=4; a=0.75 -> emitted 0.75, others 0.25/3; a=0.1 < 1/K -> emitted 0.25, others 0.25
    t = decision_targets([1, 1, 0, 0], [1, 3, 2, -1], 4, kind="group-accuracy", group_accuracy=[0.75, 0.75, 0.1, 0.5])
    assert torch.allclose(t[0], torch.tensor([1 / 12, 0.75, 1 / 12, 1 / 12]))
    assert torch.allclose(t[1], torch.tensor([1 / 12, 1 / 12, 1 / 12, 0.75]))  # wrong rollout: same rule
    assert torch.allclose(t[2], torch.full((4,), 0.25))
    assert t[3].abs().sum() == 0
    assert torch.allclose(t[:3].sum(1), torch.ones(3))


def test_group_accuracy_one_gives_one_hot_on_emitted():
    t = decision_targets([0], [1], 2, kind="group-accuracy", group_accuracy=[1.0])
    assert t.tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gold_index=[0], emitted_index=[0], num_options=2, kind="nope"), "kind"),
        (dict(gold_index=[0], emitted_index=[0], num_options=1), "num_options"),
        (dict(gold_index=[0, 1], emitted_index=[0], num_options=2), "same shape"),
        (dict(gold_index=[2], emitted_index=[0], num_options=2), "gold_index"),
        (dict(gold_index=[0], emitted_index=[-2], num_options=2), "emitted_index"),
        (dict(gold_index=[0], emitted_index=[0], num_options=2, kind="group-accuracy"), "group_accuracy"),
        (dict(gold_index=[0], emitted_index=[0], num_options=2, kind="group-accuracy", group_accuracy=[1.5]), r"\[0, 1\]"),
    ],
)
def test_decision_targets_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decision_targets(**kwargs)


# --- decision_ce: values and gradients -------------------------------------------------------


def test_decision_ce_matches_hand_computation():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    ids = torch.tensor([1, 3])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    lse0 = math.log(sum(math.exp(v) for v in [0, 1, 2, 3]))
    lse1 = math.log(math.e + 3)
    expected = ((lse0 - 1.0) + (lse1 - 0.0)) / 2  # row 2 has no target and is not counted
    assert decision_ce(logits, ids, targets).item() == pytest.approx(expected, rel=1e-6)


def test_decision_ce_accepts_per_row_option_ids():
    logits = torch.randn(3, 11)
    ids = torch.tensor([4, 7, 9])
    targets = decision_targets([0, 1, 2], [0, 2, 2], 3)
    a = decision_ce(logits, ids, targets)
    b = decision_ce(logits, ids.expand(3, -1), targets)
    assert torch.equal(a, b)


def test_decision_ce_with_no_valid_row_is_zero_and_backpropagates():
    logits = torch.randn(2, 6, requires_grad=True)
    ce = decision_ce(logits, torch.tensor([0, 1]), torch.zeros(2, 2))
    ce.backward()
    assert ce.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros(2, 6))


@pytest.mark.parametrize("kind", ["uniform", "group-accuracy"])
def test_decision_ce_gradient_is_softmax_minus_target_over_n_valid(kind):
    torch.manual_seed(0)
    b, v, k = 6, 13, 3
    ids = torch.tensor([2, 5, 11])
    gold = torch.tensor([0, 1, 2, 0, 1, 2])
    emitted = torch.tensor([0, 2, -1, 1, 1, -1])  # rows 2 and 5 have no valid decision
    acc = torch.tensor([0.5, 0.25, 0.0, 0.9, 0.1, 1.0])
    targets = decision_targets(gold, emitted, k, kind=kind, group_accuracy=acc)
    logits = torch.randn(b, v, dtype=torch.float64, requires_grad=True)
    decision_ce(logits, ids, targets.double()).backward()
    valid = emitted >= 0
    n_valid = int(valid.sum())
    q = torch.zeros(b, v, dtype=torch.float64)
    q[:, ids] = targets.double()  # q placed on the option token ids, zero elsewhere
    expected = (torch.softmax(logits.detach(), dim=-1) - q) / n_valid
    expected[~valid] = 0.0
    assert torch.allclose(logits.grad, expected, atol=1e-12)
    assert torch.equal(logits.grad[~valid], torch.zeros(int((~valid).sum()), v, dtype=torch.float64))


def test_decision_ce_gradient_for_targets_not_summing_to_one_scales_softmax():
    # the identity (softmax - q) needs sum(q) == 1; in general it is (sum q) * softmax - q
    logits = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0.2, 0.3]], dtype=torch.float64)
    decision_ce(logits, torch.tensor([1, 4]), targets).backward()
    q = torch.zeros(1, 5, dtype=torch.float64)
    q[0, 1], q[0, 4] = 0.2, 0.3
    expected = 0.5 * torch.softmax(logits.detach(), -1) - q
    assert torch.allclose(logits.grad, expected, atol=1e-12)


def test_decision_ce_is_invariant_to_row_permutation():
    torch.manual_seed(1)
    logits = torch.randn(5, 9)
    targets = decision_targets([0, 1, 0, 1, 0], [0, 0, -1, 1, 1], 2)
    ids = torch.tensor([3, 8])
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert decision_ce(logits, ids, targets).item() == pytest.approx(decision_ce(logits[perm], ids, targets[perm]).item())


@pytest.mark.parametrize(
    "logits, ids, targets, match",
    [
        (torch.zeros(4), [0, 1], torch.zeros(1, 2), "decision_logits"),
        (torch.zeros(2, 4), [0, 1, 2], torch.zeros(2, 2), "must match"),
        (torch.zeros(2, 4), [0, 4], torch.zeros(2, 2), "option_token_ids"),
    ],
)
def test_decision_ce_rejects_bad_shapes(logits, ids, targets, match):
    with pytest.raises(ValueError, match=match):
        decision_ce(logits, torch.tensor(ids), targets)


# --- what each target aims at (issue #15 item 5; the losses module docstring) --------------------


def _expected_target_open_loop(kind: str, k: int, a: float, emitted: int = 0) -> torch.Tensor:
    """E[q] over the gold for a context that always emits `emitted`, right with probability a
    (when wrong, the gold is one of the other options, each equally likely)."""
    acc = [a]
    right = decision_targets([emitted], [emitted], k, kind=kind, group_accuracy=acc)[0]
    wrong = [decision_targets([g], [emitted], k, kind=kind, group_accuracy=acc)[0] for g in range(k) if g != emitted]
    return a * right + (1 - a) * torch.stack(wrong).mean(0)


def _minimise_expected_ce(k: int, weighted_targets: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """softmax of the logits that minimise sum_i w_i * decision_ce(logits, targets_i), by gradient descent."""
    logits = torch.zeros(1, k, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)
    ids = torch.arange(k)

    def closure():
        opt.zero_grad()
        loss = sum(w * decision_ce(logits, ids, t.unsqueeze(0)) for w, t in weighted_targets)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), dim=-1)[0]


@pytest.mark.parametrize("k, a", [(k, a) for k in (2, 3, 5) for a in (0.3, 0.6, 0.9) if a >= 1 / k])  # above chance
def test_open_loop_uniform_target_aims_above_the_accuracy_by_one_minus_a_over_k(k, a):
    w = _expected_target_open_loop("uniform", k, a)
    assert w[0].item() == pytest.approx(a + (1 - a) / k, abs=1e-6)
    # and the minimiser of the expected CE (decision_ce itself, optimised) is that target
    acc = [a]
    right = decision_targets([0], [0], k, group_accuracy=acc)[0]
    terms = [(a, right)] + [((1 - a) / (k - 1), decision_targets([g], [0], k)[0]) for g in range(1, k)]
    p = _minimise_expected_ce(k, terms)
    assert p[0].item() == pytest.approx(a + (1 - a) / k, abs=1e-4)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("a", [0.1, 0.6, 0.9])
def test_open_loop_group_accuracy_target_aims_at_the_accuracy(k, a):
    w = _expected_target_open_loop("group-accuracy", k, a)
    assert w[0].item() == pytest.approx(max(a, 1 / k), abs=1e-6)
    p = _minimise_expected_ce(k, [(1.0, w)])
    assert p[0].item() == pytest.approx(max(a, 1 / k), abs=1e-4)


def _closed_loop_fixed_point(kind: str, truth: list[float], steps: int = 600) -> torch.Tensor:
    """Iterate p <- E_{y~p, g~truth} q(y, g) (exact expectation over the K x K outcomes): the point where
    the expected CE gradient, softmax - E[q], vanishes when the decision is sampled from p itself."""
    k = len(truth)
    t = torch.tensor(truth, dtype=torch.float64)
    p = torch.full((k,), 1.0 / k, dtype=torch.float64) * 0.5 + 0.5 * t  # start away from both answers
    ys, gs = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    for _ in range(steps):
        accuracy = float((p * t).sum())
        q = decision_targets(gs.reshape(-1), ys.reshape(-1), k, kind=kind,
                             group_accuracy=[accuracy] * (k * k)).double()  # (K*K, K)
        weight = (p[ys] * t[gs]).reshape(-1, 1)  # P(y, g)
        p = 0.5 * p + 0.5 * (weight * q).sum(0)  # damped, same fixed point
    return p


@pytest.mark.parametrize("truth", [[0.73, 0.27], [0.95, 0.05], [0.5, 0.5]])
def test_closed_loop_uniform_target_is_calibrated_for_two_options(truth):
    p = _closed_loop_fixed_point("uniform", truth)
    assert p.tolist() == pytest.approx(truth, abs=1e-6)


def test_closed_loop_uniform_target_with_more_options_is_proportional_to_one_over_one_minus_truth():
    truth = [0.6, 0.3, 0.1]
    p = _closed_loop_fixed_point("uniform", truth)
    expected = torch.tensor([1 / (1 - x) for x in truth], dtype=torch.float64)
    # 1e-4: the targets are float32, and 1/3 in float32 moves the fixed point by about 2e-5
    assert p.tolist() == pytest.approx((expected / expected.sum()).tolist(), abs=1e-4)
    assert p[0] < truth[0]  # below the truth on the most likely option


@pytest.mark.parametrize("truth", [[0.73, 0.27], [0.95, 0.05], [0.6, 0.3, 0.1]])
def test_closed_loop_group_accuracy_target_pulls_towards_uniform(truth):
    p = _closed_loop_fixed_point("group-accuracy", truth)
    assert p.tolist() == pytest.approx([1 / len(truth)] * len(truth), abs=1e-4)
