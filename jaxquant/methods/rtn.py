"""Round-to-nearest: fit a uniform grid per group and round every weight to it."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.methods import _grid
from jaxquant.qarray import ScalarQuantized
from jaxquant.recipes import RTN


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "clip_search", "param_dtype"))
def _rtn(
    w: jax.Array, *, bits: int, group_size: int, symmetric: bool, clip_search: bool, param_dtype: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    d_out, d_in = w.shape
    groups = w.reshape(d_out, d_in // group_size, group_size)
    scale, zero = _grid.fit_grid(groups, bits, symmetric=symmetric, param_dtype=param_dtype, clip_search=clip_search)
    codes = _grid.quantize_codes(groups, scale[..., None], zero[..., None], bits)
    return codes.reshape(d_out, d_in), scale, zero


def quantize_rtn(w: jax.Array, xtx: Any, recipe: RTN, key: jax.Array, *, layout: str = "out_in",
                 path: str = "") -> ScalarQuantized:
    """Round-to-nearest quantization of one weight: the ``QuantizeFn`` of ``jaxquant.methods``.

    ``xtx`` and ``key`` are ignored (RTN is data-free and deterministic).
    """
    del xtx, key
    w = jnp.asarray(w)
    group_size = _grid.checked_group_size(w, recipe, "RTN", path or "<weight>")
    if w.dtype != jnp.float64:  # float64 is kept (x64 tests); everything else computes in float32
        w = w.astype(jnp.float32)
    codes, scale, zero = _rtn(
        w,
        bits=recipe.bits,
        group_size=group_size,
        symmetric=recipe.symmetric,
        clip_search=recipe.clip_search,
        param_dtype=recipe.param_dtype,
    )
    return _grid.to_scalar_quantized(codes, scale, zero, recipe, group_size=group_size, layout=layout)
