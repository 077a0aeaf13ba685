"""Assignments to compare a search against: uniform levels and the error-sum heuristic."""

from __future__ import annotations

import numpy as np

from jaxquant.search.moves import BitsBudget


def uniform_within(budget: BitsBudget, slack: float = 0.0) -> list[int]:
    """Levels whose uniform assignment spends at most the budget, dearest first.

    Args:
        budget: bits of every option and the budget.
        slack: bits per weight a uniform level may exceed the budget by (a 2-bit level
            with rotation signs costs 2.003 bits: a fair baseline for a 2.0 budget).
    """
    n = budget.bits.shape[0]
    limit = budget.total + slack * float(budget.sizes.sum())
    fits = [(budget.spent(np.full(n, k)), k) for k in range(budget.bits.shape[1])]
    return [k for spent, k in sorted(fits, reverse=True) if spent <= limit + 1e-6]


def error_sum_greedy(errors: np.ndarray, budget: BitsBudget) -> np.ndarray:
    """The assignment that greedily minimises the *sum* of per-layer errors under the budget.

    It assumes what EvoPress questions: that the model's loss grows with the sum of its
    layers' errors. Every layer starts at its cheapest level; then, while any move fits
    the budget, the move with the largest error reduction per added bit is taken, where
    a move sets one layer to any level with a smaller error.

    Args:
        errors: ``[layers, levels]`` per-option errors (e.g. relative output errors).
        budget: bits of every option and the budget.

    Raises:
        ValueError: ``errors`` does not match the budget's shape or is not finite.
    """
    errors = np.asarray(errors, np.float64)
    if errors.shape != budget.bits.shape:
        raise ValueError(f"errors has shape {errors.shape}, the bits table {budget.bits.shape}")
    if not np.all(np.isfinite(errors)):
        raise ValueError("errors holds non-finite values at (layer, level) "
                         f"{[tuple(map(int, ij)) for ij in np.argwhere(~np.isfinite(errors))[:5]]}")
    layers = np.arange(errors.shape[0])
    choice = budget.order[:, 0].copy()
    spent = budget.spent(choice)
    while True:
        gain = errors[layers, choice][:, None] - errors                    # [layers, levels]
        cost = budget.bits - budget.bits[layers, choice][:, None]
        ok = (gain > 0) & (spent + cost <= budget.total + 1e-6)
        if not ok.any():
            return choice
        # A move that costs no bits and lowers the error is taken first.
        ratio = np.where(ok, gain / np.maximum(cost, 1e-9), -np.inf)
        i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        spent += cost[i, k]
        choice[i] = k


__all__ = ["error_sum_greedy", "uniform_within"]
