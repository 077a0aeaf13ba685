"""Re-encoding SpQR weights toward a dense target (PV-Tuning's V step, straight-through).

A group is one weight, as for scalar grids: it is re-rounded on its row's decoded group
grid (``scalar_reencode.round_toward``). Outliers keep their codes (their float16
corrections are continuous parameters, moved by the P step). Targets and selections are
in the weight's column order; codes are stored in quantization order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.methods.scalar_reencode import GridSelection, grid_reencoder
from jaxquant.methods.spqr.array import SpQRQuantized, grid_of


def _stored_index(q: SpQRQuantized, idx: jax.Array) -> jax.Array:
    """Flat positions in ``q.codes`` of the weights ``idx`` (flat ``o * d_in + i``)."""
    if q.column_positions is None:
        return idx
    return idx // q.d_in * q.d_in + q.column_positions.astype(jnp.int32)[idx % q.d_in]


def _spqr_selection(q: SpQRQuantized, idx: jax.Array) -> GridSelection:
    stored = _stored_index(q, idx)
    scale, zero = grid_of(q.scale_codes, q.zero_codes, q.scale_stats, q.zero_stats, q.stat_group)

    def per_weight(a: jax.Array) -> jax.Array:
        return jnp.repeat(a, q.group_size, axis=1).reshape(-1)[stored]

    outliers = jnp.zeros((q.d_out * q.d_in,), bool).at[
        q.outlier_rows() * q.d_in + q.outlier_columns.astype(jnp.int32)
    ].set(True)
    return GridSelection(stored, per_weight(scale), per_weight(zero), outliers[stored])


REENCODER = grid_reencoder(_spqr_selection)
reencode_spqr = REENCODER.reencode
