"""SpQR (Dettmers et al., 2024) on GPTQ's compiled column loop.

The loop is ``methods.gptq``'s, with groups fitted as it reaches them (so groups follow
the processing order; with ``act_order`` the columns are permuted first and the
permutation is stored), with SpQR's group grid, and with outliers found as it rounds:

- **Group grid** (``SpQRGrid``). Each row's weights in the group get a min/max grid of
  ``bits``. Weights that would likely be outliers are left out of that fit: a weight is a
  likely outlier when fitting the grid without it lowers the group's ``U``-scaled squared
  error by more than the threshold (the reference's leave-one-out estimate); it is
  replaced by the mean of the others for the fit. The grid's scale and zero point, one
  per row, are then quantized to ``stat_bits`` on min/max grids over ``stat_group``
  consecutive rows, whose steps and zero points are stored in float16; rounding uses the
  decoded values, so decoding reproduces the loop's grid exactly.
- **Outliers**. A weight whose rounding error scaled by ``U_ii`` has a square above the
  threshold keeps its (error-updated) value and passes no error on. The threshold is
  ``outlier_threshold`` times the mean over columns of ``var(W[:, j]) / U_jj²``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.methods import _grid, gptq
from jaxquant.methods._inputs import check_weight_and_statistics
from jaxquant.methods.spqr.array import SpQRQuantized, grid_of
from jaxquant.qarray import check_layout
from jaxquant.recipes import SpQR


def minmax_grid(x: jax.Array, bits: Any) -> tuple[jax.Array, jax.Array]:
    """Asymmetric min/max grid of each row of ``x [..., n]``: ``(step, zero)``, zero unrounded.

    A constant row gets the range ``[-1, 1]`` (the reference's convention).
    """
    lo, hi = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
    flat = lo == hi
    lo, hi = jnp.where(flat, -1.0, lo), jnp.where(flat, 1.0, hi)
    step = (hi - lo) / _grid.max_code(bits, x.dtype)
    return step, -lo / step


def _round_trip(x: jax.Array, step: jax.Array, zero: jax.Array, bits: Any) -> jax.Array:
    """Each row of ``x [..., n]`` rounded to its grid ``(step, zero)`` ``[...]``."""
    return _grid.fake_quantize(x, step[..., None], zero[..., None], bits)


def leave_one_out_gain(w: jax.Array, u_diag: jax.Array, bits: Any) -> jax.Array:
    """How much leaving each weight out of its row's grid lowers the row's scaled error.

    Args:
        w: ``[rows, g]`` one group's weights.
        u_diag: ``[g]`` the group's diagonal of ``U``.
        bits: grid bits.

    Returns:
        ``[rows, g]``: the row's ``Σ ((q - w) / u)²`` with every weight on one grid, minus
        the same sum over the other weights on a grid fitted without weight ``j``.
    """
    g = w.shape[-1]
    others = np.array([[k for k in range(g) if k != j] for j in range(g)])  # [g, g - 1]
    loo = w[:, others]  # [rows, g, g - 1]
    step, zero = minmax_grid(loo, bits)
    loo_err = jnp.sum(((_round_trip(loo, step, zero, bits) - loo) / u_diag[others]) ** 2, axis=-1)
    step, zero = minmax_grid(w, bits)
    base_err = jnp.sum(((_round_trip(w, step, zero, bits) - w) / u_diag) ** 2, axis=-1, keepdims=True)
    return base_err - loo_err


def quantize_stat(values: jax.Array, bits: int, group: int) -> tuple[jax.Array, jax.Array]:
    """Codes ``[n]`` and float16 ``(step, zero)`` ``[n // group, 2]`` of ``values [n]`` on
    min/max grids over ``group`` consecutive entries (the stored step and zero are used)."""
    groups = values.reshape(-1, group)
    step, zero = minmax_grid(groups, bits)
    stats = jnp.stack([step, zero], axis=-1).astype(jnp.float16)
    step, zero = stats[:, 0].astype(values.dtype), stats[:, 1].astype(values.dtype)
    codes = _grid.quantize_codes(groups, step[:, None], zero[:, None], bits)
    return codes.reshape(-1).astype(jnp.uint8), stats


@dataclasses.dataclass(frozen=True)
class SpQRGrid:
    """SpQR's group grid for ``gptq``'s loop (see the module docstring)."""

    stat_bits: int
    stat_group: int

    def __call__(self, rows: jax.Array, u_diag: jax.Array, threshold: jax.Array, bits: Any) -> tuple[Any, ...]:
        w = rows.T  # [d_out, g]
        keep = leave_one_out_gain(w, u_diag, bits) <= threshold
        mean = jnp.sum(jnp.where(keep, w, 0.0), axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1).astype(w.dtype)
        step, zero = minmax_grid(jnp.where(keep, w, mean[:, None]), bits)
        scale_codes, scale_stats = quantize_stat(step, self.stat_bits, self.stat_group)
        zero_codes, zero_stats = quantize_stat(zero, self.stat_bits, self.stat_group)
        scale, zero = grid_of(scale_codes[:, None], zero_codes[:, None], scale_stats[:, None],
                              zero_stats[:, None], self.stat_group, w.dtype)
        return scale[:, 0], zero[:, 0], (scale_codes, zero_codes, scale_stats, zero_stats)


def _index_dtype(largest: int) -> type:
    """uint16 for indices up to 65535, else int32."""
    return np.uint16 if largest < 2**16 else np.int32


def _csr(deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-compressed nonzeros of ``deltas [d_out, d_in]``: float16 values, columns, row starts."""
    rows, cols = np.nonzero(deltas)
    starts = np.searchsorted(rows, np.arange(deltas.shape[0] + 1))
    return (deltas[rows, cols].astype(np.float16), cols.astype(_index_dtype(deltas.shape[1] - 1)),
            starts.astype(_index_dtype(len(rows))))


def quantize_spqr(w: jax.Array, xtx: Any, recipe: SpQR, key: jax.Array, *, layout: str = "out_in",
                  path: str = "") -> SpQRQuantized:
    """SpQR quantization of one weight: the ``QuantizeFn`` of ``jaxquant.methods``.

    ``xtx`` is the ``(d_in, d_in)`` input second moment; ``key`` is ignored (SpQR is
    deterministic).

    Raises:
        TypeError: ``recipe`` is not an ``SpQR``.
        ValueError: a weight that is not 2-D, missing or mis-shaped ``xtx``, groups that
            do not divide the weight, or ``xtx`` not positive definite after damping.
    """
    del key
    where = path or "<weight>"
    d_out, d_in = check_weight_and_statistics(w, xtx, recipe, SpQR, where)
    check_layout(layout)
    w = jnp.asarray(w)
    dt = jnp.float64 if w.dtype == jnp.float64 else jnp.float32  # float64 where x64 is on (tests)
    w = w.astype(dt)
    h = jnp.asarray(xtx).astype(dt)
    order = np.argsort(-np.asarray(jnp.diagonal(h)), kind="stable") if recipe.act_order else None
    if order is not None:
        w, h = w[:, order], h[order][:, order]
    codes, records, deltas, ok = gptq.column_loop(
        w, h, jnp.asarray(recipe.damp, dt), recipe.bits, jnp.asarray(recipe.outlier_threshold, dt),
        group_size=recipe.group_size, symmetric=False, act_order=False,
        block_size=recipe.block_size, clip_search=False, param_dtype="float32",
        group_grid=SpQRGrid(recipe.stat_bits, recipe.stat_group), find_outliers=True,
    )
    if not bool(ok):
        raise ValueError(f"XᵀX at {where} is not positive definite even after damping with damp={recipe.damp}")
    scale_codes, zero_codes, scale_stats, zero_stats = records  # [d_out, groups], [d_out/β2, groups, 2]
    values, columns, starts = _csr(np.asarray(deltas))
    return SpQRQuantized(
        codes=codes.astype(jnp.uint8),
        scale_codes=scale_codes,
        zero_codes=zero_codes,
        scale_stats=scale_stats,
        zero_stats=zero_stats,
        outlier_values=jnp.asarray(values),
        outlier_columns=jnp.asarray(columns),
        outlier_row_starts=jnp.asarray(starts),
        column_positions=None if order is None else jnp.asarray(np.argsort(order).astype(_index_dtype(d_in - 1))),
        bits=recipe.bits,
        group_size=recipe.group_size,
        stat_bits=recipe.stat_bits,
        stat_group=recipe.stat_group,
        shape=(d_out, d_in) if layout == "out_in" else (d_in, d_out),
        layout=layout,  # type: ignore[arg-type]
    )
