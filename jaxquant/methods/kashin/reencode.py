"""Re-encoding Kashin weights toward a dense target (PV-Tuning's V step, straight-through).

A group is one row: its ``v`` codes mix the whole row through ``Q``, so a row is re-coded
as a whole, as the quantizer codes it (split, ``u`` on its grid, ``v`` refitted), on the
row's current grids and scales (the continuous part, which the P step tunes). With
``force``, a change is kept when it moves the row toward the target.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant import rotations
from jaxquant.methods._lloyd1d import nearest_level
from jaxquant.methods.kashin.array import KashinQuantized, decode_factor
from jaxquant.methods.kashin.quantize import kashin_split
from jaxquant.methods.reencoding import Reencoder, keep_new
from jaxquant.recipes import Kashin

_DEFAULTS = Kashin()


def reencode_kashin(q: KashinQuantized, target: jax.Array, idx: jax.Array, *, beam_size: int = 1,
                    trust_ratio: float | None = None, force: bool = False) -> KashinQuantized:
    """Re-encode the rows ``idx`` of ``q`` toward ``target`` ``(d_out, d_in)`` (the
    ``Reencoder.reencode`` contract; ``beam_size`` is unused). The split uses the default
    recipe's rounds and truncation."""
    del beam_size
    dense = q.decode_out_in(jnp.float32)
    want, current = target.astype(jnp.float32)[idx], dense[idx]
    u_grid, v_grid = q.u_grid.astype(jnp.float32), q.v_grid.astype(jnp.float32)
    u_scales, v_scales = q.u_scales[idx], q.v_scales[idx]
    u, _, _ = kashin_split(want, q.signs, q.transform, _DEFAULTS.iterations, _DEFAULTS.truncation)
    u_codes = nearest_level(u / u_scales.astype(jnp.float32)[:, None], u_grid)
    u_hat = decode_factor(u_codes, u_grid, u_scales)
    v = rotations.rotate(want - u_hat, q.signs, q.transform)
    v_codes = nearest_level(v / v_scales.astype(jnp.float32)[:, None], v_grid)
    new = u_hat + rotations.unrotate(decode_factor(v_codes, v_grid, v_scales), q.signs, q.transform)
    keep = keep_new(current, new, want, jnp.sum(dense**2), trust_ratio, force)

    def update(codes: jax.Array, chosen: jax.Array) -> jax.Array:
        kept = jnp.where(keep[:, None], chosen.astype(codes.dtype), codes[idx])
        return codes.at[idx].set(kept, unique_indices=True)

    return dataclasses.replace(q, u_codes=update(q.u_codes, u_codes), v_codes=update(q.v_codes, v_codes))


REENCODER = Reencoder(
    num_groups=lambda q: q.d_out,
    group_sums=lambda q, per_weight: jnp.sum(per_weight, axis=1),
    reencode=reencode_kashin,
)
