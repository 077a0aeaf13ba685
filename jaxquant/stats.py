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


def as_xtx(stats: Any) -> jax.Array:
    """The normalised ``XᵀX`` of a ``LayerStats`` or a plain ``[d_in, d_in]`` array."""
    return stats.mean() if isinstance(stats, LayerStats) else jnp.asarray(stats)
