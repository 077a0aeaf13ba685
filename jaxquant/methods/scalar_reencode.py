"""Re-encoding weights on scalar grids toward a dense target: the V step of PV-Tuning and
straight-through for RTN/GPTQ (and SpQR) weights. A group is one weight; re-encoding
rounds it to its grid."""

from __future__ import annotations

import dataclasses

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


def reencode_scalar(
    q: ScalarQuantized,
    target: jax.Array,
    idx: jax.Array,
    *,
    beam_size: int = 1,
    trust_ratio: float | None = None,
    force: bool = False,
) -> ScalarQuantized:
    """Re-encode the weights ``idx`` (flat ``o * d_in + i``) of ``q`` toward ``target``
    by rounding to the nearest grid point (exact for a scalar grid; ``round_toward``).
    Rounding needs no search: ``beam_size`` is unused."""
    del beam_size
    scale = jnp.repeat(q.scales.astype(jnp.float32), q.group_size, axis=1).reshape(-1)[idx]
    if q.zeros is None:
        zero = jnp.full(idx.shape, (2**q.bits - 1) / 2, jnp.float32)
    else:
        zero = jnp.repeat(q.zeros.astype(jnp.float32), q.group_size, axis=1).reshape(-1)[idx]
    cur = q.codes.reshape(-1)[idx]
    t = target.astype(jnp.float32).reshape(-1)[idx]
    w_sq = jnp.sum(q.decode_out_in(jnp.float32) ** 2)
    chosen = round_toward(t, cur, scale, zero, q.bits, w_sq, trust_ratio=trust_ratio, force=force)
    codes = q.codes.reshape(-1).at[idx].set(chosen, unique_indices=True).reshape(q.codes.shape)
    return dataclasses.replace(q, codes=codes)


REENCODER = Reencoder(
    num_groups=lambda q: q.d_out * q.d_in,
    group_sums=lambda q, per_weight: per_weight.reshape(-1),
    reencode=reencode_scalar,
)
