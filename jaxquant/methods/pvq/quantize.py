"""PVQ on GPTQ's compiled column loop (``jaxquant.recipes.PVQ`` describes the method).

1. **Column scales**: each column's RMS, rounded to the stored dtype.
2. **Amplitude grid**: k-means (one-dimensional) on the amplitudes the pulse search gives
   the weight's own groups, in units of their column's ``s_i · √d``.
3. **Codes** in ``methods.gptq``'s column loop: every column (in ``diag(XᵀX)``-decreasing
   order with ``act_order``) is cut into groups, each coded by its nearest lattice point and
   the nearest grid amplitude to its projection on that direction; the column's error is
   spread over the columns not yet coded (``PulseRounding``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.methods import gptq
from jaxquant.methods._inputs import host_problem
from jaxquant.methods._lloyd1d import lloyd_1d, nearest_level
from jaxquant.methods.pvq.array import PVQQuantized
from jaxquant.methods.pvq.lattice import nearest_point
from jaxquant.qarray import check_layout, code_dtype
from jaxquant.recipes import PVQ


def direction_and_amplitude(groups: jax.Array, pulses: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For groups ``[..., d]``: the lattice points ``y`` (float32), their unit directions, and
    each group's amplitude along its direction (its projection, the L2-best scale)."""
    y = nearest_point(groups, pulses).astype(groups.dtype)
    unit = y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, -1, keepdims=True), 1.0))
    return y, unit, jnp.sum(groups * unit, -1)


def code_groups(groups: jax.Array, pulses: int, grid: jax.Array,
                units: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Groups ``[n, d]`` coded as the quantizer codes them: ``(lattice points, amplitude
    codes [n], decoded groups [n, d])``, amplitudes on ``grid`` in units of ``units``
    (``[n]`` or one for all)."""
    y, unit, amplitude = direction_and_amplitude(groups, pulses)
    codes = nearest_level(amplitude / units, grid)
    return y, codes, unit * (grid[codes] * units)[:, None]


@dataclasses.dataclass(frozen=True)
class PulseRounding:
    """The column rounding of PVQ for ``gptq.column_loop``.

    ``params`` is ``(grid, scales)``: the amplitude grid ``[2**b]`` and, per column in
    processing order, the amplitude unit ``s_i · √d`` ``[d_in]``. A column's codes are its
    pulses ``[d_out]`` then its amplitude codes ``[d_out / d]``.
    """

    group_size: int
    pulses: int

    def code_width(self, d_out: int) -> int:
        return d_out + d_out // self.group_size

    def __call__(self, x: jax.Array, column: jax.Array, params: Any) -> tuple[jax.Array, jax.Array]:
        grid, units = params
        y, codes, decoded = code_groups(x.reshape(-1, self.group_size), self.pulses, grid, units[column])
        return jnp.concatenate([y.reshape(-1), codes.astype(y.dtype)]).astype(x.dtype), decoded.reshape(-1)


@jax.jit(static_argnames=("group_size", "pulses", "levels", "iterations"))
def _amplitude_grid(w: jax.Array, units: jax.Array, *, group_size: int, pulses: int, levels: int,
                    iterations: int) -> jax.Array:
    d_out, d_in = w.shape
    groups = w.reshape(d_out // group_size, group_size, d_in).transpose(0, 2, 1)  # [groups, d_in, d]
    _, _, amplitude = direction_and_amplitude(groups, pulses)
    return lloyd_1d(amplitude / units, levels, iterations)


def quantize_pvq(w: jax.Array, xtx: Any, recipe: PVQ, key: jax.Array, *, layout: str = "out_in",
                 path: str = "") -> PVQQuantized:
    """PVQ quantization of one weight: the ``QuantizeFn`` of ``jaxquant.methods``.

    ``xtx`` is the ``(d_in, d_in)`` input second moment; ``key`` is unused (the method is
    deterministic; the rotation's signs, drawn by ``quantize_weight``, are its randomness).

    Raises:
        TypeError: ``recipe`` is not a ``PVQ``.
        ValueError: a weight that is not 2-D, ``group_size`` not dividing ``d_out``, missing
            or mis-shaped ``xtx``, or ``xtx`` not positive definite after damping.
    """
    del key
    where = path or "<weight>"
    check_layout(layout)
    w, h = host_problem(w, xtx, recipe, PVQ, where)
    dt = w.dtype.type
    d_out, d_in = w.shape
    d, pdt = recipe.group_size, jnp.dtype(recipe.param_dtype)
    rms = np.sqrt(np.mean(w * w, axis=0))
    scales = np.where(rms > 0, rms, 1.0).astype(pdt)
    units = scales.astype(dt) * dt(np.sqrt(d))
    grid = np.asarray(_amplitude_grid(jnp.asarray(w, jnp.float32), jnp.asarray(units, jnp.float32), group_size=d,
                                      pulses=recipe.pulses, levels=2**recipe.amplitude_bits,
                                      iterations=recipe.kmeans_iters)).astype(pdt)
    order = gptq.processing_order(h, recipe.act_order)
    codes = gptq.code_columns(w, h, PulseRounding(d, recipe.pulses), (grid.astype(dt), units[order]),
                              damp=recipe.damp, act_order=recipe.act_order, block_size=recipe.block_size,
                              where=where)  # [d_out + d_out / d, d_in]
    return PVQQuantized(
        pulses=jnp.asarray(np.rint(codes[:d_out]).astype(np.int8)),
        amplitude_codes=jnp.asarray(np.rint(codes[d_out:]).astype(code_dtype(recipe.amplitude_bits))),
        amplitude_grid=jnp.asarray(grid),
        column_scales=jnp.asarray(scales),
        group_size=d,
        pulses_per_group=recipe.pulses,
        amplitude_bits=recipe.amplitude_bits,
        shape=(d_out, d_in) if layout == "out_in" else (d_in, d_out),
        layout=layout,  # type: ignore[arg-type]
    )
