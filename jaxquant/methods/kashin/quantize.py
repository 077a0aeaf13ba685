"""Kashin quantization of one weight: the split by alternating truncation, then a k-means
grid per factor (``jaxquant.recipes.Kashin`` describes the method)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant import rotations
from jaxquant.methods._lloyd1d import lloyd_1d, nearest_level
from jaxquant.methods.kashin.array import KashinQuantized, decode_factor
from jaxquant.qarray import check_layout
from jaxquant.recipes import Kashin


def kashin_split(w: jax.Array, signs: jax.Array, transform: str, iterations: int,
                 truncation: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Kashin's representation of each row ``w`` of ``w``: ``w = u + Qᵀ v + residual``, with
    ``Q`` the rotation ``transform`` with ``signs`` of ``jaxquant.rotations``.

    Returns:
        ``(u, v, residual)``, each ``[d_out, d_in]``.
    """
    return kashin_split_with(w, lambda x: rotations.rotate(x, signs, transform),
                             lambda y: rotations.unrotate(y, signs, transform), iterations, truncation)


def kashin_split_with(w: jax.Array, forward: Callable[[jax.Array], jax.Array],
                      backward: Callable[[jax.Array], jax.Array], iterations: int,
                      truncation: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``kashin_split`` for any orthogonal ``Q``: ``forward`` maps rows ``r`` to ``Q r``, ``backward`` to ``Qᵀ r``.

    Each round moves the residual's entries, clipped to ``±truncation · RMS(residual)``,
    into ``u``, then does the same for ``Q · residual`` into ``v``; the clipping makes both
    factors flat and the residual shrinks geometrically when ``Q`` mixes coordinates well.
    """
    d_in = w.shape[1]

    def level(x: jax.Array) -> jax.Array:
        return truncation * jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True) / d_in)

    def one_round(carry: tuple[jax.Array, jax.Array, jax.Array], _: None) -> tuple[tuple, None]:
        x, u, v = carry
        a = jnp.clip(x, -level(x), level(x))
        x, u = x - a, u + a
        y = forward(x)
        b = jnp.clip(y, -level(y), level(y))
        x, v = x - backward(b), v + b
        return (x, u, v), None

    zeros = jnp.zeros_like(w)
    (residual, u, v), _ = jax.lax.scan(one_round, (w, zeros, zeros), None, length=iterations)
    return u, v, residual


def _factor_codes(f: jax.Array, bits: int, kmeans_iters: int, param_dtype: Any) -> tuple[jax.Array, ...]:
    """A factor's per-row scales, grid and codes, scales and grid rounded to their storage dtype."""
    peak = jnp.max(jnp.abs(f), axis=1)
    scales = jnp.where(peak > 0, peak, 1.0).astype(param_dtype)
    normalised = f / scales.astype(jnp.float32)[:, None]
    grid = lloyd_1d(normalised, 2**bits, kmeans_iters).astype(param_dtype)
    codes = nearest_level(normalised, grid.astype(jnp.float32)).astype(jnp.uint8)  # bits <= 8
    return codes, grid, scales


@functools.partial(jax.jit, static_argnames=("u_bits", "v_bits", "transform", "iterations", "kmeans_iters",
                                             "param_dtype"))
def _kashin(w: jax.Array, signs: jax.Array, truncation: jax.Array, *, u_bits: int, v_bits: int, transform: str,
            iterations: int, kmeans_iters: int, param_dtype: str) -> tuple[jax.Array, ...]:
    u, _, _ = kashin_split(w, signs, transform, iterations, truncation)
    u_codes, u_grid, u_scales = _factor_codes(u, u_bits, kmeans_iters, param_dtype)
    # v is refitted to what u's codes left, so it also absorbs u's rounding error.
    v = rotations.rotate(w - decode_factor(u_codes, u_grid, u_scales), signs, transform)
    v_codes, v_grid, v_scales = _factor_codes(v, v_bits, kmeans_iters, param_dtype)
    return u_codes, u_grid, u_scales, v_codes, v_grid, v_scales


def quantize_kashin(w: jax.Array, xtx: Any, recipe: Kashin, key: jax.Array, *, layout: str = "out_in",
                    path: str = "") -> KashinQuantized:
    """Kashin quantization of one weight: the ``QuantizeFn`` of ``jaxquant.methods``.

    ``xtx`` is ignored (the method is data-free); ``key`` draws the signs of ``Q``.

    Raises:
        TypeError: ``recipe`` is not a ``Kashin``.
        ValueError: a weight that is not 2-D.
    """
    if not isinstance(recipe, Kashin):
        raise TypeError(f"quantize_kashin needs a Kashin recipe, got {type(recipe).__name__}")
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"Kashin at {path or '<weight>'}: the weight must be 2-D, got shape {tuple(w.shape)}")
    del xtx
    d_out, d_in = w.shape
    signs = rotations.random_signs(key, d_in)
    parts = _kashin(w, signs, jnp.float32(recipe.truncation), u_bits=recipe.u_bits, v_bits=recipe.v_bits,
                    transform=recipe.transform, iterations=recipe.iterations, kmeans_iters=recipe.kmeans_iters,
                    param_dtype=recipe.param_dtype)
    shape = (d_out, d_in) if check_layout(layout) == "out_in" else (d_in, d_out)
    return KashinQuantized(*parts, signs, u_bits=recipe.u_bits, v_bits=recipe.v_bits, transform=recipe.transform,
                           shape=shape, layout=layout)
