"""How fine-tuning re-encodes a quantized array toward a dense target.

PV-Tuning's V step and the straight-through baseline work on *groups*, the unit of
codes of an array type (an ``og × ig`` tile with its ``M`` codes for additive arrays,
one weight for scalar ones). A type's ``Reencoder`` tells them how many groups it has,
how to sum a per-weight quantity over each group, and how to give selected groups new
codes; the method that makes the type registers it with the type
(``jaxquant.methods.register``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Reencoder:
    """The re-encoding operations of one quantized array type.

    Attributes:
        num_groups: ``q -> int``, the number of code groups (static).
        group_sums: ``(q, per_weight) -> [num_groups]``, a ``(d_out, d_in)`` per-weight
            quantity summed over each group (in group order).
        reencode: ``(q, target, idx, *, beam_size, trust_ratio, force) -> q'``: ``q`` with
            the groups ``idx`` re-encoded toward the ``(d_out, d_in)`` float32 ``target``.
            A group keeps its codes unless the new ones are strictly closer (or, with
            ``force``, unless no code moves it toward the target), and with
            ``trust_ratio`` the changes are accepted in the order of ``idx`` while
            ``‖ΔŴ‖_F ≤ trust_ratio · ‖Ŵ‖_F`` (``accept_changes``). ``beam_size`` is for
            searches that use one.
        distances: ``(q, target) -> [num_groups]``, each group's squared distance to the
            ``(d_out, d_in)`` target, for a type whose groups are not sets of weights (a
            rotated array's groups live in the rotated basis); ``None``: ``group_sums`` of
            the squared difference.
    """

    num_groups: Callable[[Any], int]
    group_sums: Callable[[Any, jax.Array], jax.Array]
    reencode: Callable[..., Any]
    distances: Callable[[Any, jax.Array], jax.Array] | None = None

    def group_distances(self, q: Any, target: jax.Array) -> jax.Array:
        """Squared distance per group between ``target`` and ``q``'s decoding: ``[num_groups]``."""
        if self.distances is not None:
            return self.distances(q, target)
        diff = target.astype(jnp.float32) - q.decode_out_in(jnp.float32)
        return self.group_sums(q, diff * diff)


def accept_changes(better: jax.Array, delta_sq: jax.Array, w_sq: jax.Array, trust_ratio: float | None) -> jax.Array:
    """Which candidate changes to keep: strictly better ones and, with a trust ratio, in
    selection order each one that still fits ``Σ ‖Δ‖² ≤ (trust_ratio · ‖Ŵ‖)²`` (greedy)."""
    if trust_ratio is None:
        return better
    bound = jnp.float32(trust_ratio) ** 2 * w_sq

    def admit(total: jax.Array, cand: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        ok, d = cand
        ok = ok & (total + d <= bound)
        return total + jnp.where(ok, d, jnp.float32(0.0)), ok

    # Sequential over the (few) selected groups: a greedy knapsack in selection order.
    _, keep = jax.lax.scan(admit, jnp.float32(0.0), (better, delta_sq.astype(jnp.float32)))
    return keep


def keep_new(current: jax.Array, new: jax.Array, want: jax.Array, w_sq: jax.Array, trust_ratio: float | None,
             force: bool) -> jax.Array:
    """Which groups (``[n, ...]`` rows of decoded values) take their new codes: those strictly
    closer to the target ``want`` (with ``force``: those that move toward it), admitted under
    the trust ratio by ``accept_changes``."""
    axes = tuple(range(1, current.ndim))
    if force:
        better = jnp.sum((new - current) * (want - current), axis=axes) > 0
    else:
        better = jnp.sum((new - want) ** 2, axis=axes) < jnp.sum((current - want) ** 2, axis=axes)
    return accept_changes(better, jnp.sum((new - current) ** 2, axis=axes), w_sq, trust_ratio)
