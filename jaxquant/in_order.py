"""Run independent per-layer work one layer after another inside one jit-compiled program.

XLA's CPU compiler removes ``lax.optimization_barrier`` before it schedules, and its
scheduler tends to run each kind of operation for every layer before the next kind: all
210 of SmolLM2's gradient transposes, then all 210 scatters, and so on. Every layer's
temporaries are then alive at once (1.3 GB in PV-Tuning's P step, against 0.1 GB in
order). A data dependence is the one ordering every backend keeps.

``map_stacked`` runs the layers of one kind (same structure, shapes and dtypes, stacked)
as one ``lax.scan``, one layer after another, and makes each kind's first index depend,
by a zero that no compiler pass can prove zero, on the previous kind's result. The
compiled program then holds one copy of the per-layer work for each kind instead of one
per layer, which shrinks both its compile time and the memory it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


def _zero_after(token: Any) -> jax.Array | None:
    """A float32 zero that exists only once every array of ``token`` does: ``min(t, 0)``
    where ``t`` sums the magnitude of one element of each array, which no compiler pass
    can prove zero (NaN if one of those elements is NaN); ``None`` for a token without
    elements."""
    firsts = [jnp.ravel(x)[0].astype(jnp.float32) for x in jax.tree.leaves(token) if jnp.size(x)]
    if not firsts:
        return None
    return jnp.minimum(sum(jnp.abs(f) for f in firsts), jnp.float32(0.0))


def alike_groups(trees: Sequence[Any], keys: Sequence[Any] | None = None) -> list[list[int]]:
    """Indices of ``trees`` grouped by pytree structure (static fields included), leaf
    shapes and dtypes, and by ``keys`` when given, groups in order of first appearance:
    the trees ``stack`` accepts."""
    groups: dict[Any, list[int]] = {}
    for i, tree in enumerate(trees):
        groups.setdefault((None if keys is None else keys[i], signature(tree)), []).append(i)
    return list(groups.values())


def signature(tree: Any) -> Any:
    """What two trees must share to be stacked: structure, leaf shapes and dtypes."""
    return jax.tree.structure(tree), tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree))


def stack(trees: Sequence[Any]) -> Any:
    """Trees of one ``signature`` as one tree with a new leading axis on every leaf."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    """The inverse of ``stack`` for ``n`` trees."""
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def map_stacked(fn: Callable[..., T], groups: Iterable[tuple[Any, ...]]) -> list[T]:
    """``fn`` over the leading axis of each group's stacked arguments, one element and one
    group after another.

    Each group compiles ``fn`` once, whatever its length, as a ``lax.scan`` that reads its
    element of every argument in place (no copy of the stacked arguments), and holds one
    call's temporaries at a time. A group's first index is made to depend on the previous
    group's result, which orders the groups without copying them (adding a zero to the
    arguments instead would write a new stacked copy of each).

    Args:
        fn: ``fn(*args)`` on one element of a group.
        groups: per group, a tuple of arguments stacked on a leading axis of one length.

    Returns:
        Per group, ``fn``'s results stacked on the leading axis.
    """
    out: list[T] = []
    for args in groups:
        lengths = {x.shape[0] for x in jax.tree.leaves(args)}
        if len(lengths) != 1:
            raise ValueError(f"map_stacked: a group's arguments must share one leading length, got {sorted(lengths)}")
        (n,) = lengths
        zero = None if not out else _zero_after(out[-1])
        indices = jnp.arange(n, dtype=jnp.int32)
        if zero is not None:
            indices = indices + zero.astype(jnp.int32)

        def body(carry: None, i: jax.Array, args: tuple[Any, ...] = args) -> tuple[None, T]:
            return carry, fn(*jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), args))

        out.append(jax.lax.scan(body, None, indices)[1])
    return out


__all__ = ["alike_groups", "map_stacked", "signature", "stack", "unstack"]
