"""Diagnosis experiments of the paper (issue #7): rollout confidence spread and reasoning swap.

- `decal.analysis.rollouts`: sample many completions per query and measure how many decide with
  a decision-token probability above 0.99 (Table 2).
- `decal.analysis.swap`: replace a confident prediction's reasoning with one that led another
  example to a different label, and see whether the decision follows it (Table 3, Figure 3).

Both call the scoring code of `decal evaluate` (`decal.scoring`) and resume after an interruption.
"""

from .rollouts import RolloutConfig, run_rollouts, summarize_rollouts
from .swap import SwapConfig, run_swap, summarize_swaps

__all__ = ["RolloutConfig", "SwapConfig", "run_rollouts", "run_swap", "summarize_rollouts", "summarize_swaps"]
