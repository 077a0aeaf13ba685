"""``SpQRQuantized``: a low-bit grid with quantized statistics, plus sparse outliers.

``W[o, i] = (codes[o, k] - zero[o, k // β1]) · scale[o, k // β1] + outliers[o, k]`` with
``k = positions[i]``: codes are stored in the order the columns were quantized (the
stored ``column_positions``, or the identity), ``β1`` is ``group_size``, and the scale and
zero of each row's group are decoded from ``stat_bits`` codes on a second-level grid
shared by ``β2 = stat_group`` consecutive rows. ``outliers`` is sparse, stored row-compressed: a
float16 correction (the kept weight minus its decoded code) per outlier.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.qarray import Layout, QuantizedArray, array_bits, static_field

# Second-level decoded scales are kept above this, so that rounding never divides by zero.
MIN_SCALE = 1e-9


def dequantize_stats(codes: jax.Array, stats: jax.Array, stat_group: int, dtype: Any = jnp.float32) -> jax.Array:
    """Decoded first-level statistics ``[rows, groups]`` from their codes and the
    second-level ``stats`` ``[rows // stat_group, groups, 2]`` (step, zero point)."""
    stats = jnp.repeat(stats.astype(dtype), stat_group, axis=0)
    return (codes.astype(dtype) - stats[..., 1]) * stats[..., 0]


def grid_of(scale_codes: jax.Array, zero_codes: jax.Array, scale_stats: jax.Array, zero_stats: jax.Array,
            stat_group: int, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The first-level ``(scale, zero)`` ``[rows, groups]`` every code is rounded on and decoded with."""
    scale = jnp.maximum(dequantize_stats(scale_codes, scale_stats, stat_group, dtype), MIN_SCALE)
    return scale, dequantize_stats(zero_codes, zero_stats, stat_group, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)  # repr: QuantizedArray's one-line summary
class SpQRQuantized(QuantizedArray):
    """SpQR storage (see the module docstring).

    Attributes:
        codes: ``[d_out, d_in]`` weight codes, columns in quantization order.
        scale_codes: ``[d_out, d_in // group_size]`` codes of the groups' scales.
        zero_codes: ``[d_out, d_in // group_size]`` codes of the groups' zero points.
        scale_stats: ``[d_out // stat_group, d_in // group_size, 2]`` float16 step and
            zero point of the scales' grids.
        zero_stats: the same for the zero points' grids.
        outlier_values: ``[nnz]`` float16 corrections, row by row.
        outlier_columns: ``[nnz]`` their columns (in quantization order).
        outlier_row_starts: ``[d_out + 1]`` (uint16 while they fit, else int32): row
            ``o``'s outliers are ``outlier_row_starts[o]:outlier_row_starts[o + 1]``.
        column_positions: ``[d_in]``: input column ``i`` is stored at column
            ``column_positions[i]`` of ``codes``; ``None`` for the identity.
        bits: bits per weight code.
        group_size: ``β1``.
        stat_bits: bits per scale and zero-point code.
        stat_group: ``β2``.
        shape: shape of the dense leaf this array stands for.
        layout: ``"out_in"`` or ``"in_out"``.
    """

    codes: jax.Array
    scale_codes: jax.Array
    zero_codes: jax.Array
    scale_stats: jax.Array
    zero_stats: jax.Array
    outlier_values: jax.Array
    outlier_columns: jax.Array
    outlier_row_starts: jax.Array
    column_positions: jax.Array | None
    bits: int = static_field()
    group_size: int = static_field()
    stat_bits: int = static_field()
    stat_group: int = static_field()
    shape: tuple[int, int] = static_field()
    layout: Layout = static_field("out_in")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        groups = self.d_in // self.group_size
        stats = (self.d_out // self.stat_group, groups, 2)
        nnz = (self.num_outliers,)
        return {"codes": (self.d_out, self.d_in), "scale_codes": (self.d_out, groups),
                "zero_codes": (self.d_out, groups), "scale_stats": stats, "zero_stats": stats,
                "outlier_values": nnz, "outlier_columns": nnz, "outlier_row_starts": (self.d_out + 1,),
                "column_positions": (self.d_in,)}

    @property
    def row_group(self) -> int:
        return self.stat_group

    @property
    def num_outliers(self) -> int:
        return int(self.outlier_values.shape[0])

    def outlier_rows(self) -> jax.Array:
        """The row of every outlier, ``[nnz]`` int32."""
        counts = jnp.diff(self.outlier_row_starts.astype(jnp.int32))
        return jnp.repeat(jnp.arange(self.d_out, dtype=jnp.int32), counts, total_repeat_length=self.num_outliers)

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        take = lambda a, step=1: jax.lax.dynamic_slice_in_dim(a, start // step, n_rows // step, axis=0)  # noqa: E731
        scale, zero = grid_of(take(self.scale_codes), take(self.zero_codes), take(self.scale_stats, self.stat_group),
                              take(self.zero_stats, self.stat_group), self.stat_group)
        codes = take(self.codes).astype(jnp.float32).reshape(n_rows, -1, self.group_size)
        tile = ((codes - zero[..., None]) * scale[..., None]).reshape(n_rows, self.d_in)
        # Outliers of other rows go to row n_rows, out of bounds, and are dropped.
        rows = self.outlier_rows() - start
        rows = jnp.where((rows >= 0) & (rows < n_rows), rows, n_rows)
        tile = tile.at[rows, self.outlier_columns.astype(jnp.int32)].add(
            self.outlier_values.astype(jnp.float32), mode="drop"
        )
        if self.column_positions is None:
            return tile
        return tile[:, self.column_positions.astype(jnp.int32)]  # a gather: far cheaper than scattering

    def few_rows_matmul(self, x: jax.Array) -> jax.Array:
        """``x @ W`` for a few rows through the native CPU kernel (``methods.spqr.kernel``)."""
        from jaxquant.methods.spqr import kernel  # noqa: PLC0415 (builds native code: only when asked)

        return kernel.matmul(x, self)

    @property
    def storage_bits(self) -> int:
        """Codes at ``bits``, statistic codes at ``stat_bits``, every other array at its dtype."""
        weights = int(np.prod(self.codes.shape)) * self.bits
        stats = (int(np.prod(self.scale_codes.shape)) + int(np.prod(self.zero_codes.shape))) * self.stat_bits
        rest = (self.scale_stats, self.zero_stats, self.outlier_values, self.outlier_columns,
                self.outlier_row_starts, self.column_positions)
        return weights + stats + sum(array_bits(a) for a in rest)

    @property
    def resident_bytes(self) -> int:
        fields = (self.codes, self.scale_codes, self.zero_codes, self.scale_stats, self.zero_stats,
                  self.outlier_values, self.outlier_columns, self.outlier_row_starts, self.column_positions)
        return sum(array_bits(a) for a in fields) // 8

    @property
    def code_widths(self) -> dict[str, int]:
        return {"codes": self.bits, "scale_codes": self.stat_bits, "zero_codes": self.stat_bits}

    @property
    def scheme(self) -> str:
        return (f"spqr int{self.bits} g{self.group_size}, stats int{self.stat_bits} g{self.stat_group}, "
                f"{self.num_outliers} outliers")
