"""Re-encoding rotated weights toward a dense target: the wrapped array's own re-encoding,
on the target rotated into its basis.

The rotation stays fixed. ``‖ΔŴ‖`` and ``‖Ŵ‖`` do not change under it, so the trust
ratio means the same in either basis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxquant import rotations
from jaxquant.methods.reencoding import Reencoder
from jaxquant.rotations import RotatedQuantized


def _inner_target(q: RotatedQuantized, target: jax.Array) -> jax.Array:
    """``U T Vᵀ``: the ``(d_out, d_in)`` target in the wrapped array's basis."""
    return rotations.rotate_weight(target, q.in_signs, q.out_signs, q.kind)


def reencoder(inner_reencoder_for: Any) -> Reencoder:
    """The ``Reencoder`` of ``RotatedQuantized``, delegating to ``inner_reencoder_for(inner)``."""

    def reencode(q: RotatedQuantized, target: jax.Array, idx: jax.Array, **options: Any) -> RotatedQuantized:
        inner = inner_reencoder_for(q.inner).reencode(q.inner, _inner_target(q, target), idx, **options)
        return dataclasses.replace(q, inner=inner)

    return Reencoder(
        num_groups=lambda q: inner_reencoder_for(q.inner).num_groups(q.inner),
        group_sums=lambda q, per_weight: _not_per_weight(),
        reencode=reencode,
        distances=lambda q, target: inner_reencoder_for(q.inner).group_distances(q.inner, _inner_target(q, target)),
    )


def _not_per_weight() -> jax.Array:
    raise TypeError("a rotated array's groups are in the rotated basis: use Reencoder.group_distances")
