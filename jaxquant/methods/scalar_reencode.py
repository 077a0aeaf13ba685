"""Re-encoding weights on scalar grids toward a dense target: the V step of PV-Tuning and
straight-through for RTN/GPTQ (and SpQR) weights. A group is one weight; re-encoding
rounds it to its grid."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxquant.methods.reencoding import Reencoder, accept_changes
from jaxquant.qarray import ScalarQuantized


def round_toward(
    target: jax.Array,
    cur: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    bits: int,
    w_sq: jax.Array,
    *,
    trust_ratio: float | None,
    force: bool,
    frozen: jax.Array | None = None,
) -> jax.Array:
    """New codes for selected weights, each on its own grid ``(code - zero) · scale``.

    A weight moves to the grid point nearest ``target`` if that is strictly closer than
    its current one; with ``force``, to the nearest grid point other than the current one
    on the target's side (none at the end of the grid: the code stays). Changes are then
    bounded by ``accept_changes`` (in the order given) against ``w_sq = ‖Ŵ‖²``.

    Args:
        target, scale, zero: ``[k]`` float32, per selected weight.
        cur: ``[k]`` current codes, as stored.
        bits: code width.
        w_sq: squared norm of the decoded weight.
        trust_ratio: the bound, or None.
        force: see above.
        frozen: ``[k]`` bool, weights that keep their codes whatever the target.

    Returns:
        ``[k]`` codes in ``cur``'s dtype.
    """
    safe = jnp.where(scale == 0, jnp.float32(1), scale)  # a zero scale has one grid point
    level = target / safe + zero  # the target on the code axis
    new = jnp.round(level)
    cur_f = cur.astype(jnp.float32)
    if force:
        # At least one grid step in the target's direction on the code axis (the same
        # direction in weight space whatever the scale's sign).
        up, down = jnp.maximum(new, cur_f + 1), jnp.minimum(new, cur_f - 1)
        new = jnp.where(level > cur_f, up, jnp.where(level < cur_f, down, cur_f))
    new = jnp.clip(new, 0, jnp.float32(2**bits - 1))
    new = jnp.where(scale == 0, cur_f, new)
    dec_cur, dec_new = (cur_f - zero) * scale, (new - zero) * scale
    better = (new != cur_f) if force else (dec_new - target) ** 2 < (dec_cur - target) ** 2
    if frozen is not None:
        better = better & ~frozen
    keep = accept_changes(better, (dec_new - dec_cur) ** 2, w_sq, trust_ratio)
    return jnp.where(keep, new.astype(cur.dtype), cur)


class GridSelection(NamedTuple):
    """Where selected weights sit in an array's codes, and their grids (``[k]`` each)."""

    stored: jax.Array  # flat positions in ``q.codes``
    scale: jax.Array
    zero: jax.Array
    frozen: jax.Array | None  # weights that keep their codes, or None


def _reencode_on_grid(
    select: Callable[[Any, jax.Array], GridSelection],
    q: Any,
    target: jax.Array,
    idx: jax.Array,
    *,
    beam_size: int = 1,
    trust_ratio: float | None = None,
    force: bool = False,
) -> Any:
    """Re-encode the weights ``idx`` (flat ``o * d_in + i``) of ``q`` toward ``target`` by
    rounding each on its grid (exact for a scalar grid; ``round_toward``). Rounding needs
    no search: ``beam_size`` is unused."""
    del beam_size
    sel = select(q, idx)
    w_sq = jnp.sum(q.decode_out_in(jnp.float32) ** 2)
    chosen = round_toward(target.astype(jnp.float32).reshape(-1)[idx], q.codes.reshape(-1)[sel.stored], sel.scale,
                          sel.zero, q.bits, w_sq, trust_ratio=trust_ratio, force=force, frozen=sel.frozen)
    codes = q.codes.reshape(-1).at[sel.stored].set(chosen, unique_indices=True).reshape(q.codes.shape)
    return dataclasses.replace(q, codes=codes)


def grid_reencoder(select: Callable[[Any, jax.Array], GridSelection]) -> Reencoder:
    """The ``Reencoder`` of an array type whose every weight has its own code on a scalar
    grid: one group per weight, in ``(d_out, d_in)`` order; ``select`` locates them."""
    return Reencoder(
        num_groups=lambda q: q.d_out * q.d_in,
        group_sums=lambda q, per_weight: per_weight.reshape(-1),
        reencode=functools.partial(_reencode_on_grid, select),
    )


def _scalar_selection(q: ScalarQuantized, idx: jax.Array) -> GridSelection:
    def per_weight(a: jax.Array) -> jax.Array:
        return jnp.repeat(a.astype(jnp.float32), q.group_size, axis=1).reshape(-1)[idx]

    zero = jnp.full(idx.shape, (2**q.bits - 1) / 2, jnp.float32) if q.zeros is None else per_weight(q.zeros)
    return GridSelection(idx, per_weight(q.scales), zero, None)


REENCODER = grid_reencoder(_scalar_selection)
reencode_scalar = REENCODER.reencode
