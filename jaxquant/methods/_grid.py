"""Uniform quantization grids shared by RTN and GPTQ.

A grid is a per-group ``(scale, zero)`` pair in *code units*:
``dequant(c) = (c - zero) * scale`` with integer codes ``c ∈ [0, 2**bits - 1]``.

- Asymmetric grids span ``[min(w, 0), max(w, 0)]`` of the group (the range always
  contains zero, as in the reference GPTQ quantizer) with an *integer* zero point
  ``round(-min / scale) ∈ [0, 2**bits - 1]``, so 0.0 is exactly a grid point. At low
  bit widths this matters a great deal: most weights sit near zero, and on the shared
  synthetic problem a fractional zero point (grid ends exactly on the range ends but
  no grid point at 0) raises 2-bit RTN's output error from 0.36 to 0.49. Integer zero
  points are also exact in float16.
- Symmetric grids are centred on zero, ``zero = (2**bits - 1) / 2`` (implicit, not
  stored), with ``scale = 2 * max|w| / (2**bits - 1)``; this is what
  ``ScalarQuantized.decode`` assumes.

Scales and zero points are rounded to the storage ``param_dtype`` *before* codes are
computed, so the decoded weight is exactly what was fitted and searched.

The optional clip search shrinks each group's range by ratios ``1.00, 0.99, ..., 0.21``
and keeps, per group, the ratio with the smallest squared rounding error (the reference
GPTQ quantizer's grid: 80 ratios from 1.0 down to 0.21).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.qarray import ScalarQuantized, check_layout, code_dtype

# Clip-search shrink ratios (the reference GPTQ quantizer's grid=100, maxshrink=0.8).
CLIP_RATIOS = tuple(float(1.0 - i / 100.0) for i in range(80))


def max_code(bits: Any, dtype: Any = None) -> Any:
    """``2**bits - 1``: a Python float for a static ``bits``; for a traced one (compiled code
    shared by every width) an array of ``dtype``."""
    if isinstance(bits, int | np.integer):
        return float(2 ** int(bits) - 1)
    return ((jnp.int32(1) << jnp.asarray(bits, jnp.int32)) - 1).astype(dtype)


def round_to(x: jax.Array, param_dtype: str) -> jax.Array:
    """Round ``x`` to ``param_dtype`` and back, keeping the compute dtype."""
    return x.astype(jnp.dtype(param_dtype)).astype(x.dtype)


def _grid_from_range(
    lo: jax.Array, hi: jax.Array, bits: Any, symmetric: bool, param_dtype: str
) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero)`` for ranges ``[lo, hi]`` (``lo <= 0 <= hi``), rounded to storage."""
    dtype = lo.dtype
    maxq = max_code(bits, dtype)
    # The smallest normal of the storage dtype: a zero-width group (e.g. an all-zero
    # column block) gets this step instead of 0, so nothing divides by zero and the
    # stored scale is exactly representable.
    tiny = jnp.asarray(float(jnp.finfo(jnp.dtype(param_dtype)).tiny), dtype)
    if symmetric:
        amax = jnp.maximum(-lo, hi)
        scale = round_to(jnp.maximum(amax * (2.0 / maxq), tiny), param_dtype)
        zero = jnp.full_like(scale, maxq / 2.0)
    else:
        scale = round_to(jnp.maximum((hi - lo) / maxq, tiny), param_dtype)
        zero = jnp.clip(jnp.round(-lo / scale), 0.0, maxq)  # integers: exact in every param_dtype
    return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: Any) -> jax.Array:
    """Integer codes (in ``w``'s float dtype) of ``w`` on the grid ``(scale, zero)``; ``bits``
    may be traced."""
    return jnp.clip(jnp.round(w / scale + zero), 0.0, max_code(bits, w.dtype))


def dequantize_codes(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    return (codes - zero) * scale


def fake_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: Any) -> jax.Array:
    """``w`` rounded to the nearest grid point (clamped to the grid ends)."""
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


def fit_grid(
    w: jax.Array,
    bits: Any,
    *,
    symmetric: bool,
    param_dtype: str,
    clip_search: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Fit one grid per row of the last axis of ``w``.

    Args:
        w: ``[..., group]`` weights; every leading index is one group.
        bits: code width (may be traced).
        symmetric: centred grid without stored zero point.
        param_dtype: storage dtype of scales and zeros (they are rounded to it).
        clip_search: search shrink ratios of the range for the least squared error.

    Returns:
        ``(scale, zero)``, each ``w.shape[:-1]``, in ``w``'s dtype, already rounded to
        ``param_dtype``.
    """
    lo = jnp.minimum(jnp.min(w, axis=-1), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=-1), 0.0)
    if not clip_search:
        return _grid_from_range(lo, hi, bits, symmetric, param_dtype)

    def err_for(ratio: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        scale, zero = _grid_from_range(lo * ratio, hi * ratio, bits, symmetric, param_dtype)
        diff = fake_quantize(w, scale[..., None], zero[..., None], bits) - w
        return jnp.sum(diff * diff, axis=-1), scale, zero

    best_err, best_scale, best_zero = err_for(jnp.asarray(1.0, w.dtype))

    def step(carry, ratio):
        b_err, b_scale, b_zero = carry
        err, scale, zero = err_for(ratio)
        better = err < b_err
        return (
            jnp.where(better, err, b_err),
            jnp.where(better, scale, b_scale),
            jnp.where(better, zero, b_zero),
        ), None

    ratios = jnp.asarray(np.asarray(CLIP_RATIOS[1:]), w.dtype)
    (best_err, best_scale, best_zero), _ = jax.lax.scan(step, (best_err, best_scale, best_zero), ratios)
    return best_scale, best_zero


def expand_groups(x: jax.Array, group_size: int) -> jax.Array:
    """``[d_out, n_groups]`` -> ``[d_out, n_groups * group_size]`` (repeat along columns)."""
    return jnp.repeat(x, group_size, axis=1)


def effective_group_size(group_size: int | None, d_in: int) -> int:
    """``group_size``, or ``d_in`` (one group per row) when it is ``None``."""
    return d_in if group_size is None else int(group_size)


def checked_group_size(w: jax.Array, recipe: Any, method: str, where: str) -> int:
    """The group size of a scalar recipe for ``w``, after the checks RTN and GPTQ share.

    Raises:
        ValueError: ``w`` is not 2-D, its groups do not divide ``d_in``, or it holds a value
            beyond what ``recipe.param_dtype`` scales can represent.
    """
    if w.ndim != 2:
        raise ValueError(f"{method} expects a 2-D weight, got shape {w.shape} at {where}")
    d_in = w.shape[1]
    group_size = effective_group_size(recipe.group_size, d_in)
    if d_in % group_size:
        raise ValueError(f"d_in={d_in} is not divisible by group_size={group_size} at {where}")
    limit = float(jnp.finfo(jnp.dtype(recipe.param_dtype)).max)
    amax = float(jnp.max(jnp.abs(w))) if w.size else 0.0
    if amax > limit:
        raise ValueError(
            f"the weight at {where} has max |w|={amax:g}, beyond what {recipe.param_dtype} "
            f"scales can represent ({limit:g}); use param_dtype='float32'"
        )
    return group_size


def to_scalar_quantized(
    codes: jax.Array, scale: jax.Array, zero: jax.Array, recipe: Any, *, group_size: int, layout: str
) -> ScalarQuantized:
    """Package fitted codes and grids (all ``(d_out, ·)``) of an RTN or GPTQ ``recipe`` as a
    ``ScalarQuantized``."""
    bits, symmetric, param_dtype = recipe.bits, recipe.symmetric, recipe.param_dtype
    d_out, d_in = codes.shape
    check_layout(layout)
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    pdt = jnp.dtype(param_dtype)
    return ScalarQuantized(
        codes=codes.astype(code_dtype(bits)),
        scales=scale.astype(pdt),
        zeros=None if symmetric else zero.astype(pdt),
        bits=bits,
        group_size=group_size,
        shape=shape,
        layout=layout,  # type: ignore[arg-type]
    )
