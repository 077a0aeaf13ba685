"""Calibration statistics of one linear layer: the running sum of ``XᵀX`` and a token count."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Sufficient statistics of a linear layer's inputs for output-error objectives.

    Attributes:
        xtx: ``Σ_t x_t x_tᵀ`` over calibration tokens, ``[d_in, d_in]`` (float32 or float64).
        count: number of tokens summed (a scalar array, so the whole object is a pytree
            that can be accumulated under ``jit``).
    """

    xtx: jax.Array
    count: jax.Array

    def mean(self) -> jax.Array:
        """``XᵀX / n``: the per-token second moment that methods optimise against."""
        return self.xtx / jnp.maximum(self.count, 1).astype(self.xtx.dtype)

    def __add__(self, other: "LayerStats") -> "LayerStats":
        return LayerStats(self.xtx + other.xtx, self.count + other.count)


def damped(stats: LayerStats, min_tokens: int) -> LayerStats:
    """``stats`` filled up to ``min_tokens`` tokens with an isotropic second moment.

    A layer that saw few calibration tokens (an expert the router seldom picks) has a
    rank-deficient, noisy ``XᵀX``. The missing ``min_tokens - count`` tokens are taken
    as isotropic with the layer's own mean energy per feature (``trace / (count · d)``,
    or 1 for a layer that saw nothing, whose objective becomes the plain weight error):
    ``XᵀX + (min_tokens - count) · s · I``. Stats with at least ``min_tokens`` tokens
    come back unchanged.
    """
    count = int(stats.count)
    if count >= min_tokens:
        return stats
    d = stats.xtx.shape[0]
    energy = float(jnp.trace(stats.xtx)) / (count * d) if count else 0.0
    scale = energy if energy > 0 else 1.0
    xtx = stats.xtx + (min_tokens - count) * scale * jnp.eye(d, dtype=stats.xtx.dtype)
    return LayerStats(xtx, jnp.asarray(min_tokens, stats.count.dtype))


def as_xtx(stats: Any) -> jax.Array:
    """The normalised ``XᵀX`` of a ``LayerStats`` or a plain ``[d_in, d_in]`` array."""
    return stats.mean() if isinstance(stats, LayerStats) else jnp.asarray(stats)
