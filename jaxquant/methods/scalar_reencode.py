"""Re-encoding scalar (RTN/GPTQ) weights toward a dense target: the V step of PV-Tuning
and straight-through. A group is one weight; re-encoding rounds it to the grid."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxquant.methods.reencoding import Reencoder, accept_changes
from jaxquant.qarray import ScalarQuantized


def _scalar_zero(q: ScalarQuantized) -> jax.Array:
    """Zero points per weight ``(d_out, d_in)`` float32."""
    if q.zeros is None:
        return jnp.full((q.d_out, q.d_in), (2**q.bits - 1) / 2, jnp.float32)
    return jnp.repeat(q.zeros.astype(jnp.float32), q.group_size, axis=1)


class _ScalarCandidates(NamedTuple):
    """The re-encodings of selected scalar weights (``[k]`` each)."""

    t: jax.Array  # targets
    cur: jax.Array  # current codes, as stored
    new: jax.Array  # float32 new codes
    dec_cur: jax.Array  # decoded current values
    dec_new: jax.Array  # decoded new values


def _scalar_candidates(q: ScalarQuantized, target: jax.Array, idx: jax.Array, *, force: bool) -> _ScalarCandidates:
    """New codes for the weights ``idx`` of ``q`` toward ``target`` (see ``reencode_scalar``)."""
    scale = jnp.repeat(q.scales.astype(jnp.float32), q.group_size, axis=1).reshape(-1)[idx]
    zero = _scalar_zero(q).reshape(-1)[idx]
    t = target.astype(jnp.float32).reshape(-1)[idx]
    cur = q.codes.reshape(-1)[idx]
    safe = jnp.where(scale == 0, jnp.float32(1), scale)  # a zero scale has one grid point
    level = t / safe + zero  # the target on the code axis
    new = jnp.round(level)
    cur_f = cur.astype(jnp.float32)
    if force:
        # At least one grid step in the target's direction on the code axis (the same
        # direction in weight space whatever the scale's sign).
        up, down = jnp.maximum(new, cur_f + 1), jnp.minimum(new, cur_f - 1)
        new = jnp.where(level > cur_f, up, jnp.where(level < cur_f, down, cur_f))
    new = jnp.clip(new, 0, jnp.float32(2**q.bits - 1))
    new = jnp.where(scale == 0, cur_f, new)
    return _ScalarCandidates(t, cur, new, (cur_f - zero) * scale, (new - zero) * scale)


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
    by rounding to the nearest grid point (exact for a scalar grid); with ``force``, to
    the nearest grid point other than the current one on ``target``'s side of it (none
    at the end of the grid: the weight keeps its code). Rounding needs no search:
    ``beam_size`` is unused."""
    del beam_size
    c = _scalar_candidates(q, target, idx, force=force)
    t, cur, new, dec_cur, dec_new = c.t, c.cur, c.new, c.dec_cur, c.dec_new
    better = (new != cur.astype(jnp.float32)) if force else (dec_new - t) ** 2 < (dec_cur - t) ** 2
    w_sq = jnp.sum(q.decode_out_in(jnp.float32) ** 2)
    keep = accept_changes(better, (dec_new - dec_cur) ** 2, w_sq, trust_ratio)
    chosen = jnp.where(keep, new.astype(q.codes.dtype), cur)
    codes = q.codes.reshape(-1).at[idx].set(chosen, unique_indices=True).reshape(q.codes.shape)
    return dataclasses.replace(q, codes=codes)


REENCODER = Reencoder(
    num_groups=lambda q: q.d_out * q.d_in,
    group_sums=lambda q, per_weight: per_weight.reshape(-1),
    reencode=reencode_scalar,
)
