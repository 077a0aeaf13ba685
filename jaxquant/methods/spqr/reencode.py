"""Re-encoding SpQR weights toward a dense target (PV-Tuning's V step, straight-through).

A group is one weight, as for scalar grids: it is re-rounded on its row's decoded group
grid (``scalar_reencode.round_toward``). Outliers keep their codes (their float16
corrections are continuous parameters, moved by the P step). Targets and selections are
in the weight's column order; codes are stored in quantization order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.methods.reencoding import Reencoder
from jaxquant.methods.scalar_reencode import round_toward
from jaxquant.methods.spqr.array import SpQRQuantized, grid_of


def _stored_index(q: SpQRQuantized, idx: jax.Array) -> jax.Array:
    """Flat positions in ``q.codes`` of the weights ``idx`` (flat ``o * d_in + i``)."""
    if q.column_order is None:
        return idx
    order = q.column_order.astype(jnp.int32)
    position = jnp.zeros((q.d_in,), jnp.int32).at[order].set(jnp.arange(q.d_in, dtype=jnp.int32))
    return idx // q.d_in * q.d_in + position[idx % q.d_in]


def reencode_spqr(
    q: SpQRQuantized,
    target: jax.Array,
    idx: jax.Array,
    *,
    beam_size: int = 1,
    trust_ratio: float | None = None,
    force: bool = False,
) -> SpQRQuantized:
    """Re-encode the weights ``idx`` (flat ``o * d_in + i``) of ``q`` toward ``target`` on
    their grids; outliers keep their codes. Rounding needs no search: ``beam_size`` is unused."""
    del beam_size
    stored = _stored_index(q, idx)
    scale, zero = grid_of(q.scale_codes, q.zero_codes, q.scale_stats, q.zero_stats, q.stat_group)

    def per_weight(a: jax.Array) -> jax.Array:
        return jnp.repeat(a, q.group_size, axis=1).reshape(-1)[stored]

    outliers = jnp.zeros((q.d_out * q.d_in,), bool).at[
        q.outlier_rows() * q.d_in + q.outlier_columns.astype(jnp.int32)
    ].set(True)
    w_sq = jnp.sum(q.decode_out_in(jnp.float32) ** 2)
    chosen = round_toward(
        target.astype(jnp.float32).reshape(-1)[idx], q.codes.reshape(-1)[stored], per_weight(scale),
        per_weight(zero), q.bits, w_sq, trust_ratio=trust_ratio, force=force, frozen=outliers[stored],
    )
    codes = q.codes.reshape(-1).at[stored].set(chosen, unique_indices=True).reshape(q.codes.shape)
    return dataclasses.replace(q, codes=codes)


REENCODER = Reencoder(
    num_groups=lambda q: q.d_out * q.d_in,
    group_sums=lambda q, per_weight: per_weight.reshape(-1),
    reencode=reencode_spqr,
)
