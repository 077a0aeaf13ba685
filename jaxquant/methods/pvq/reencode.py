"""Re-encoding PVQ weights toward a dense target (PV-Tuning's V step, straight-through).

A group is ``d`` consecutive rows of one column, in ``(d_out / d, d_in)`` order. A
selected group gets the nearest lattice direction to its target and the nearest grid
amplitude to the target's projection on it, the choice the quantizer makes. With
``force``, a change is kept when it moves the group toward the target.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.methods.pvq.array import PVQQuantized
from jaxquant.methods.pvq.quantize import code_groups
from jaxquant.methods.reencoding import Reencoder, keep_new


def _groups(x: jax.Array, d: int) -> jax.Array:
    """``[d_out, d_in] -> [d_out / d, d_in, d]``."""
    d_out, d_in = x.shape
    return x.reshape(d_out // d, d, d_in).transpose(0, 2, 1)


def reencode_pvq(q: PVQQuantized, target: jax.Array, idx: jax.Array, *, beam_size: int = 1,
                 trust_ratio: float | None = None, force: bool = False) -> PVQQuantized:
    """Re-encode the groups ``idx`` (flat ``g * d_in + i``) of ``q`` toward ``target``
    ``(d_out, d_in)`` (the ``Reencoder.reencode`` contract; ``beam_size`` is unused)."""
    del beam_size
    d = q.group_size
    rows, columns = idx // q.d_in, idx % q.d_in
    dense = q.decode_out_in(jnp.float32)
    want = _groups(target.astype(jnp.float32), d)[rows, columns]  # [n, d]
    current = _groups(dense, d)[rows, columns]
    units = q.column_scales.astype(jnp.float32)[columns] * jnp.sqrt(jnp.float32(d))
    y, codes, new = code_groups(want, q.pulses_per_group, q.amplitude_grid.astype(jnp.float32), units)
    keep = keep_new(current, new, want, jnp.sum(dense**2), trust_ratio, force)

    group_pulses = _groups(q.pulses, d)
    kept_pulses = jnp.where(keep[:, None], y.astype(q.pulses.dtype), group_pulses[rows, columns])
    pulses = group_pulses.at[rows, columns].set(kept_pulses, unique_indices=True)
    kept_codes = jnp.where(keep, codes, q.amplitude_codes[rows, columns].astype(jnp.int32))
    return dataclasses.replace(
        q,
        pulses=pulses.transpose(0, 2, 1).reshape(q.d_out, q.d_in),
        amplitude_codes=q.amplitude_codes.at[rows, columns].set(kept_codes.astype(q.amplitude_codes.dtype),
                                                                unique_indices=True),
    )


REENCODER = Reencoder(
    num_groups=lambda q: (q.d_out // q.group_size) * q.d_in,
    group_sums=lambda q, per_weight: jnp.sum(_groups(per_weight, q.group_size), axis=-1).reshape(-1),
    reencode=reencode_pvq,
)
