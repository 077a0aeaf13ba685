"""Scalar (one-dimensional) k-means grids: Kashin's factor grids and PVQ's amplitude grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lloyd_1d(x: jax.Array, levels: int, iterations: int) -> jax.Array:
    """An increasing grid of ``levels`` values minimising ``Σ (x − nearest)²`` over the
    entries of ``x`` (Lloyd's algorithm from the quantiles; in one dimension the cells
    stay intervals, so the grid stays sorted)."""
    x = x.reshape(-1)
    grid = jnp.quantile(x, (jnp.arange(levels, dtype=x.dtype) + 0.5) / levels)

    def step(_: int, grid: jax.Array) -> jax.Array:
        cells = nearest_level(x, grid)
        sums = jax.ops.segment_sum(x, cells, levels)
        counts = jax.ops.segment_sum(jnp.ones_like(x), cells, levels)
        return jnp.sort(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), grid))

    return jax.lax.fori_loop(0, iterations, step, grid)


def nearest_level(x: jax.Array, grid: jax.Array) -> jax.Array:
    """Index of the nearest value of the increasing ``grid`` for each entry of ``x``."""
    return jnp.searchsorted((grid[1:] + grid[:-1]) / 2, x).astype(jnp.int32)
