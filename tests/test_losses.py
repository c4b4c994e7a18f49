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
