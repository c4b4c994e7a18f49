"""The calibration term of calibration-aware GRPO: CE targets over the options and the CE itself.

Calibration-aware GRPO (docs/design.md, "Calibration-aware GRPO"; issue #6) keeps the GRPO loss on
every completion token except the decision token d, whose advantage is set to 0, and adds
``lambda * CE_d`` with

    CE_d = -sum_k q_k * log p(option_token_ids[k] | x, y_<d)

where ``p`` is the full-vocabulary softmax of the logits at d (temperature 1, no renormalisation
over the options) and ``q`` (the paper's target) is a distribution over the K options:

- ``kind="uniform"`` (the paper): one-hot on the gold option when the emitted decision is
  correct, uniform ``1/K`` over the options when it is wrong.
- ``kind="group-accuracy"`` (decal's extension, not in the paper): with ``a`` the share of the
  prompt's rollouts that were correct, the emitted option gets ``max(a, 1/K)`` and the rest is
  spread evenly over the other options, for right and wrong rollouts alike. The target
  confidence then tracks the empirical accuracy of the policy on that prompt.

A completion without a valid decision (``emitted_index == -1``) gets an all-zero target row and
no CE term. The CE is averaged over the rows that have a target.

What each target aims at (issue #15 item 5; `tests/test_losses.py` checks both views exactly).
For fixed targets the expected CE ``-sum_k w_k log p_k`` over the options is minimised at
``p = w``, the expected target.

- Open loop (the issue's argument): fix the emitted option e of a decision context whose
  emission is right with probability a (the true probability of e). "uniform" targets one-hot
  on e with weight a and 1/K on every option with weight 1 - a, so ``w_e = a + (1 - a)/K``, above
  a: an overconfidence of ``(1 - a)/K``. "group-accuracy" with group accuracy a targets
  ``w_e = max(a, 1/K)``, i.e. a itself when a >= 1/K.
- Closed loop (what training does when the decision token is sampled, at temperature 1, from
  the same distribution p that the CE trains, and the gold label is drawn from a truth t): the
  emitted option is itself drawn from p, and the stationary point is ``p = E_{y~p, g~t} q(y, g)``.
  For "uniform", ``p_k (1 - t_k) = (1 - sum_j p_j t_j)/K`` for every k, so ``p_k`` is
  proportional to ``1/(1 - t_k)``: exactly ``p = t`` (calibrated) when K = 2, and below t on the
  most likely option when K > 2. For "group-accuracy" the target ignores which option was right,
  so ``p_k = p_k a' + (1 - p_k)(1 - a')/(K - 1)`` with ``a' = max(a, 1/K) < 1``, whose only
  solution is ``p_k = 1/K``: alone, it pulls the decision towards uniform. Which view describes a
  run depends on how much of the decision the CE (rather than the reasoning the policy gradient
  trains) determines; the verdicts task measures it.

Gradient. For a row with targets ``q`` placed on the option token ids (zero elsewhere in the
vocabulary), ``d CE / d logits = (sum_k q_k) * softmax(logits) - q``. Every row that
`decision_targets` builds sums to 1, so the gradient of `decision_ce` is
``(softmax(logits) - q) / n_valid``; rows whose targets sum to something else (hand-made
targets) get ``(sum q) * softmax - q`` instead, and all-zero rows get exactly zero.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["CAL_TARGETS", "decision_targets", "decision_ce"]

#: Names accepted by `decision_targets(kind=...)` and `--cal-target`.
CAL_TARGETS: tuple[str, ...] = ("uniform", "group-accuracy")


def _as_long(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"`{name}` must be a 1-D array of option indices; got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise TypeError(f"`{name}` must hold integer option indices; got dtype {t.dtype}")
    return t.long()


def decision_targets(
    gold_index,
    emitted_index,
    num_options: int,
    kind: Literal["uniform", "group-accuracy"] = "uniform",
    group_accuracy=None,
) -> torch.Tensor:
    """Target distributions over the options for the decision-token CE (see module docstring).

    Args:
        gold_index: int array of shape (B,), values in [0, K): the gold option of each row.
        emitted_index: int array of shape (B,), values in [-1, K): the option whose decision
            token the rollout emitted, -1 when it has no valid decision.
        num_options: K >= 2.
        kind: "uniform" (the paper's rule) or "group-accuracy" (decal's extension).
        group_accuracy: float array of shape (B,), values in [0, 1], the share of correct
            rollouts in each row's group; required for "group-accuracy", ignored otherwise.

    Returns:
        Float32 tensor of shape (B, K). Rows with a valid decision sum to 1; rows with
        ``emitted_index == -1`` are all zero.

    Raises:
        ValueError: unknown `kind`, K < 2, mismatched shapes, or indices out of range.

    Example:
        >>> decision_targets([0, 1, 1], [0, 0, -1], 2).tolist()
        [[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]
        >>> decision_targets([0], [2], 4, kind="group-accuracy", group_accuracy=[0.7]).tolist()[0]
        [0.10000000149011612, 0.10000000149011612, 0.699999988079071, 0.10000000149011612]
    """
    if kind not in CAL_TARGETS:
        raise ValueError(f"`kind` must be one of {list(CAL_TARGETS)}; got {kind!r}.")
    if int(num_options) < 2:
        raise ValueError(f"`num_options` must be at least 2; got {num_options!r}.")
    k = int(num_options)
    gold = _as_long(gold_index, "gold_index")
    emitted = _as_long(emitted_index, "emitted_index").to(gold.device)
    if gold.shape != emitted.shape:
        raise ValueError(f"`gold_index` and `emitted_index` must have the same shape; got {tuple(gold.shape)} and {tuple(emitted.shape)}.")
    if gold.numel() and (gold.min() < 0 or gold.max() >= k):
        raise ValueError(f"`gold_index` values must be in [0, {k}); got {gold.tolist()!r}.")
    if emitted.numel() and (emitted.min() < -1 or emitted.max() >= k):
        raise ValueError(f"`emitted_index` values must be in [-1, {k}); got {emitted.tolist()!r}.")
    valid = emitted >= 0  # (B,)
    safe_emitted = emitted.clamp(min=0)  # (B,) an index for gather/scatter; invalid rows are zeroed below
    if kind == "uniform":
        one_hot = torch.nn.functional.one_hot(gold, k).float()  # (B, K)
        uniform = torch.full_like(one_hot, 1.0 / k)  # (B, K)
        targets = torch.where((emitted == gold).unsqueeze(1), one_hot, uniform)
    else:
        if group_accuracy is None:
            raise ValueError("`group_accuracy` is required when kind='group-accuracy'; pass the share of correct rollouts per row.")
        acc = torch.as_tensor(group_accuracy, dtype=torch.float32, device=gold.device)
        if acc.shape != gold.shape:
            raise ValueError(f"`group_accuracy` must have shape {tuple(gold.shape)}; got {tuple(acc.shape)}.")
        if acc.numel() and (torch.isnan(acc).any() or acc.min() < 0 or acc.max() > 1):
            raise ValueError(f"`group_accuracy` values must be in [0, 1]; got {acc.tolist()!r}.")
        top = torch.clamp(acc, min=1.0 / k)  # (B,) the emitted option's target, max(a, 1/K)
        rest = (1.0 - top) / (k - 1)  # (B,) each other option's share
        targets = rest.unsqueeze(1).expand(-1, k).clone()  # (B, K)
        targets.scatter_(1, safe_emitted.unsqueeze(1), top.unsqueeze(1))
    return targets * valid.unsqueeze(1).float()


def decision_ce(decision_logits: torch.Tensor, option_token_ids, targets: torch.Tensor) -> torch.Tensor:
    """Mean decision-token cross-entropy against option targets, over rows that have a target.

    Args:
        decision_logits: float tensor of shape (B, V), the logits at each row's decision position
            (temperature 1).
        option_token_ids: int tensor of shape (K,), each option's decision token id in [0, V);
            or shape (B, K) when rows carry their own (TRL splits batches along dim 0).
        targets: float tensor of shape (B, K), from `decision_targets`; all-zero rows are skipped.

    Returns:
        A scalar tensor: ``sum_b -sum_k targets[b, k] * log_softmax(decision_logits[b])[ids[k]]``
        divided by the number of rows whose targets are not all zero (0 when there are none,
        still attached to the graph so ``backward`` works).

    Example:
        >>> logits = torch.zeros(2, 4)  # uniform over a 4-token vocabulary
        >>> round(decision_ce(logits, torch.tensor([1, 3]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])).item(), 4)
        1.3863
    """
    if decision_logits.dim() != 2:
        raise ValueError(f"`decision_logits` must have shape (B, V); got {tuple(decision_logits.shape)}.")
    b, v = decision_logits.shape
    ids = torch.as_tensor(option_token_ids, device=decision_logits.device).long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0).expand(b, -1)  # (B, K)
    targets = torch.as_tensor(targets, device=decision_logits.device)
    if ids.shape != targets.shape or targets.shape[0] != b:
        raise ValueError(
            f"`option_token_ids` (K,) or (B, K) and `targets` (B, K) must match `decision_logits` (B={b}); "
            f"got {tuple(ids.shape)} and {tuple(targets.shape)}."
        )
    if ids.numel() and (ids.min() < 0 or ids.max() >= v):
        raise ValueError(f"`option_token_ids` must be in [0, {v}); got {ids.unique().tolist()!r}.")
    # At least float32 (bfloat16 logits lose the small option probabilities); float64 stays float64, for
    # the exactness tests (tests/test_grpo.py).
    compute_dtype = torch.promote_types(decision_logits.dtype, torch.float32)
    logprobs = torch.log_softmax(decision_logits.to(compute_dtype), dim=-1)  # (B, V), full vocabulary
    option_logprobs = logprobs.gather(1, ids)  # (B, K)
    has_target = (targets != 0).any(dim=1)  # (B,)
    row_ce = -(targets.to(option_logprobs.dtype) * option_logprobs).sum(dim=1)  # (B,)
    # where() rather than indexing keeps the graph shape fixed; 0 * log p of a masked row is 0.
    row_ce = torch.where(has_target, row_ce, torch.zeros_like(row_ce))
    n_valid = has_target.sum().clamp(min=1)
    return row_ce.sum() / n_valid
