"""Moves between assignments under a bits budget: level steps, mutations, starting points.

Each layer orders its levels by the bits they cost *in that layer* (a level with a
large codebook may cost more bits in a small layer than a higher bit width does), and a
step moves one layer to the next cheaper or dearer level in that order. The budget is a
total of bits; a valid assignment spends at most the budget and at least the budget less
a tolerance, so that no candidate wins by simply being larger or wastes bits.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class BitsBudget:
    """Bits of every option and the budget an assignment must meet.

    Attributes:
        bits: stored bits of every option, ``[layers, levels]``.
        sizes: weights per layer, ``[layers]``.
        average: the target average bits per weight.
        tolerance: how far below ``average`` a valid assignment may fall (bits per weight).
        order: ``order[i]`` lists layer ``i``'s levels from cheapest to dearest.
        rank: the inverse of ``order``: ``rank[i, k]`` is level ``k``'s place in it.
    """

    bits: np.ndarray
    sizes: np.ndarray
    average: float
    tolerance: float
    order: np.ndarray = dataclasses.field(init=False, repr=False)
    rank: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        bits = np.asarray(self.bits, np.float64)
        if bits.ndim != 2 or bits.shape[0] != np.shape(self.sizes)[0] or bits.size == 0:
            raise ValueError(f"bits must be [layers, levels] with one row per size, got {bits.shape} and "
                             f"{np.shape(self.sizes)} sizes")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 bits per weight, got {self.tolerance}")
        lowest = float(bits.min(axis=1).sum() / np.sum(self.sizes))
        if self.average < lowest:
            raise ValueError(f"average={self.average} bits per weight is below the cheapest assignment "
                             f"({lowest:.4f}); add a cheaper level or raise the budget")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "sizes", np.asarray(self.sizes, np.int64))
        order = np.argsort(bits, axis=1, kind="stable")
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "rank", np.argsort(order, axis=1, kind="stable"))

    @property
    def total(self) -> float:
        """The budget in bits."""
        return self.average * float(self.sizes.sum())

    @property
    def floor(self) -> float:
        """The fewest bits a valid assignment may spend."""
        return (self.average - self.tolerance) * float(self.sizes.sum())

    def spent(self, choice: np.ndarray) -> float:
        """Total bits of an assignment."""
        return float(self.bits[np.arange(len(choice)), choice].sum())

    def average_of(self, choice: np.ndarray) -> float:
        """Average bits per weight of an assignment."""
        return self.spent(choice) / float(self.sizes.sum())

    def is_valid(self, choice: np.ndarray) -> bool:
        """Whether an assignment spends between the floor and the budget."""
        spent = self.spent(choice)
        return self.floor - 1e-6 <= spent <= self.total + 1e-6

    def step(self, choice: np.ndarray, layer: int, direction: int) -> float:
        """Move ``layer`` one level up (+1, dearer) or down (-1, cheaper) in place.

        Returns:
            The bits the move adds (negative for a step down).
        """
        before = self.bits[layer, choice[layer]]
        choice[layer] = self.order[layer, self.rank[layer, choice[layer]] + direction]
        return float(self.bits[layer, choice[layer]] - before)

    def can_step(self, choice: np.ndarray, direction: int) -> np.ndarray:
        """Layers that have a level one step up (+1) or down (-1)."""
        ranks = self.rank[np.arange(len(choice)), choice] + direction
        return np.flatnonzero((ranks >= 0) & (ranks < self.bits.shape[1]))


def mutate(parent: np.ndarray, budget: BitsBudget, rng: np.random.Generator,
           max_changes: int = 10, attempts: int = 1000) -> np.ndarray:
    """A valid offspring of ``parent``: a few layers one level up, then random layers one
    level down until the budget holds (EvoPress's level-switch mutation).

    The number of up-steps is ``min(U(1,3), U(1,3))``, biased towards one. Offspring that
    need more than ``max_changes`` steps, fall below the budget's floor, or equal the
    parent are drawn again.

    Raises:
        RuntimeError: no valid offspring in ``attempts`` draws (the tolerance is too tight
            for the levels' bit steps; the message says so).
    """
    for _ in range(attempts):
        child = parent.copy()
        spent = budget.spent(child)
        changes = 0
        for _ in range(min(rng.integers(1, 4), rng.integers(1, 4))):
            ups = budget.can_step(child, +1)
            if ups.size == 0:
                break
            spent += budget.step(child, int(rng.choice(ups)), +1)
            changes += 1
        while spent > budget.total + 1e-6 and changes <= max_changes:
            downs = budget.can_step(child, -1)
            if downs.size == 0:
                break
            spent += budget.step(child, int(rng.choice(downs)), -1)
            changes += 1
        if changes <= max_changes and budget.is_valid(child) and not np.array_equal(child, parent):
            return child
    raise RuntimeError(f"no valid mutation in {attempts} draws: the levels' bit steps are too coarse for "
                       f"tolerance={budget.tolerance} bits per weight; raise the tolerance or add levels in between")


def fill_up(start: np.ndarray, budget: BitsBudget, rng: np.random.Generator) -> np.ndarray:
    """``start`` with random layers stepped up while the budget allows any step."""
    choice = start.copy()
    spent = budget.spent(choice)
    while True:
        ups = budget.can_step(choice, +1)
        ranks = budget.rank[ups, choice[ups]] + 1
        cost = budget.bits[ups, budget.order[ups, ranks]] - budget.bits[ups, choice[ups]]
        fits = ups[spent + cost <= budget.total + 1e-6]
        if fits.size == 0:
            return choice
        spent += budget.step(choice, int(rng.choice(fits)), +1)


def fit_to_budget(start: np.ndarray, budget: BitsBudget, rng: np.random.Generator) -> np.ndarray:
    """``start`` made valid: random layers stepped down while it spends more than the
    budget, then random layers stepped up while a step still fits.

    Raises:
        RuntimeError: the assignment falls below the budget's floor.
    """
    choice = np.array(start, np.int64)
    spent = budget.spent(choice)
    while spent > budget.total + 1e-6:
        spent += budget.step(choice, int(rng.choice(budget.can_step(choice, -1))), -1)
    choice = fill_up(choice, budget, rng)
    if not budget.is_valid(choice):
        raise RuntimeError(f"the starting assignment spends {budget.average_of(choice):.4f} bits per weight, under "
                           f"the budget {budget.average} less its tolerance {budget.tolerance}; raise the tolerance")
    return choice


def starting_point(budget: BitsBudget, rng: np.random.Generator) -> np.ndarray:
    """A random valid assignment near uniform (as EvoPress starts): every layer at the
    cheapest level whose uniform assignment meets the budget (the dearest level when none
    does), then ``fit_to_budget``.

    Raises:
        RuntimeError: the assignment falls below the budget's floor.
    """
    n = budget.bits.shape[0]
    uniform = sorted((budget.spent(np.full(n, k)), k) for k in range(budget.bits.shape[1]))
    level = next((k for spent, k in uniform if spent >= budget.total - 1e-6), uniform[-1][1])
    return fit_to_budget(np.full(n, level), budget, rng)


__all__ = ["BitsBudget", "fill_up", "fit_to_budget", "mutate", "starting_point"]
