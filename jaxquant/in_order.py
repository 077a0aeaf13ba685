"""Run independent per-layer work one layer after another inside one jit-compiled program.

XLA's CPU compiler removes ``lax.optimization_barrier`` before it schedules, and its
scheduler tends to run each kind of operation for every layer before the next kind: all
210 of SmolLM2's gradient transposes, then all 210 scatters, and so on. Every layer's
temporaries are then alive at once (1.3 GB in PV-Tuning's P step, against 0.1 GB in
order). A data dependence is the one ordering every backend keeps, so ``after`` makes
one layer's inputs depend, by a zero that no compiler pass can prove zero, on the
previous layer's result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


def after(tree: T, token: Any) -> T:
    """``tree`` unchanged in value, but computed only once ``token`` exists.

    Every floating leaf gets ``+ min(t, 0)`` added, where ``t`` sums the magnitude of one
    element of each array of ``token`` (so it exists only once all of them do): zero
    unless one of those elements is NaN, which then propagates. Integer leaves are returned as they are; they are ordered through the
    floating leaves computed from them.

    Args:
        tree: a pytree of arrays.
        token: a pytree of arrays (e.g. the previous layer's result).
    """
    firsts = [jnp.ravel(x)[0].astype(jnp.float32) for x in jax.tree.leaves(token) if jnp.size(x)]
    if not firsts:
        return tree
    zero = jnp.minimum(sum(jnp.abs(f) for f in firsts), jnp.float32(0.0))

    def tie(x: Any) -> Any:
        x = jnp.asarray(x)
        return x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(tie, tree)


def map_in_order(fn: Callable[..., T], items: Iterable[tuple[Any, ...]]) -> list[T]:
    """``[fn(*args) for args in items]``, each call's inputs made to wait for the previous result.

    Use it for per-layer work whose layers do not interact, so that the compiled program
    holds one layer's temporaries at a time.
    """
    out: list[T] = []
    for args in items:
        if out:
            args = after(args, out[-1])
        out.append(fn(*args))
    return out


__all__ = ["after", "map_in_order"]
