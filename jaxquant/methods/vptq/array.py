"""``VPTQQuantized``: vectors of output rows coded by codebook indices.

``W[r·v + t, i] = s_i · (C_i[codes[r, i], t] + R[residual_codes[r, i], t])`` with ``v`` the
vector size, ``C_i`` the outlier codebook for the outlier columns and the main codebook
for the others, ``R`` the residual codebook (absent: zero) and ``s_i`` the column scale
(absent: one). Codes are stored in the weight's column order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.qarray import Layout, QuantizedArray, array_bits, static_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)  # repr: QuantizedArray's one-line summary
class VPTQQuantized(QuantizedArray):
    """VPTQ storage (see the module docstring).

    Attributes:
        codes: ``[d_out // v, d_in]`` indices into the main (or outlier) codebook.
        codebook: ``[2**codebook_bits, v]`` main codebook.
        residual_codes: ``[d_out // v, d_in]`` indices into ``residual_codebook``, or None.
        residual_codebook: ``[2**residual_bits, v]``, or None.
        outlier_codebook: ``[2**codebook_bits, v]`` codebook of the outlier columns, or None.
        outlier_columns: ``[n]`` the input columns coded with ``outlier_codebook`` (int16
            or int32), or None.
        column_scales: ``[d_in]`` per-column scale, or None.
        codebook_bits: bits per code.
        residual_bits: bits per residual code (0 without a residual codebook).
        shape: shape of the dense leaf this array stands for.
        layout: ``"out_in"`` or ``"in_out"``.
    """

    codes: jax.Array
    codebook: jax.Array
    residual_codes: jax.Array | None
    residual_codebook: jax.Array | None
    outlier_codebook: jax.Array | None
    outlier_columns: jax.Array | None
    column_scales: jax.Array | None
    codebook_bits: int = static_field()
    residual_bits: int = static_field()
    shape: tuple[int, int] = static_field()
    layout: Layout = static_field("out_in")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        v = self.vector_size
        book = (2**self.codebook_bits, v)
        codes = (self.d_out // v, self.d_in)
        n_outliers = 0 if self.outlier_columns is None else int(self.outlier_columns.shape[0])
        return {"codes": codes, "codebook": book, "residual_codes": codes,
                "residual_codebook": (2**self.residual_bits, v), "outlier_codebook": book,
                "outlier_columns": (n_outliers,), "column_scales": (self.d_in,)}

    @property
    def vector_size(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def row_group(self) -> int:
        return self.vector_size

    def outlier_mask(self) -> jax.Array:
        """``[d_in]`` bool: which columns the outlier codebook codes."""
        mask = jnp.zeros((self.d_in,), bool)
        if self.outlier_columns is None:
            return mask
        return mask.at[self.outlier_columns.astype(jnp.int32)].set(True)

    def decode_vectors(self, codes: jax.Array, residual_codes: jax.Array | None, columns: jax.Array) -> jax.Array:
        """Decoded vectors ``[..., v]`` (float32) of codes ``[...]`` in input columns ``columns [...]``."""
        vec = jnp.take(self.codebook.astype(jnp.float32), codes.astype(jnp.int32), axis=0)
        if self.outlier_codebook is not None:
            outlier = jnp.take(self.outlier_codebook.astype(jnp.float32), codes.astype(jnp.int32), axis=0)
            vec = jnp.where(self.outlier_mask()[columns][..., None], outlier, vec)
        if residual_codes is not None:
            vec = vec + jnp.take(self.residual_codebook.astype(jnp.float32), residual_codes.astype(jnp.int32), axis=0)
        if self.column_scales is not None:
            vec = vec * self.column_scales.astype(jnp.float32)[columns][..., None]
        return vec

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        v = self.vector_size
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start // v, n_rows // v, axis=0)  # noqa: E731
        residual = None if self.residual_codes is None else take(self.residual_codes)
        columns = jnp.broadcast_to(jnp.arange(self.d_in), (n_rows // v, self.d_in))
        vec = self.decode_vectors(take(self.codes), residual, columns)  # [n_rows / v, d_in, v]
        return vec.transpose(0, 2, 1).reshape(n_rows, self.d_in)

    def few_rows_matmul(self, x: jax.Array) -> jax.Array:
        """``x @ W`` for a few rows through the native CPU kernel (``methods.vptq.kernel``)."""
        from jaxquant.methods.vptq import kernel  # noqa: PLC0415 (builds native code: only when asked)

        return kernel.matmul(x, self)

    @property
    def storage_bits(self) -> int:
        """Codes at their nominal bits, every other array at its dtype."""
        codes = int(np.prod(self.codes.shape))
        continuous = (self.codebook, self.residual_codebook, self.outlier_codebook, self.outlier_columns,
                      self.column_scales)
        return codes * (self.codebook_bits + self.residual_bits) + sum(array_bits(a) for a in continuous)

    @property
    def resident_bytes(self) -> int:
        fields = (self.codes, self.codebook, self.residual_codes, self.residual_codebook, self.outlier_codebook,
                  self.outlier_columns, self.column_scales)
        return sum(array_bits(a) for a in fields) // 8

    @property
    def code_widths(self) -> dict[str, int]:
        return {"codes": self.codebook_bits, "residual_codes": self.residual_bits}

    @property
    def scheme(self) -> str:
        residual = f" + residual {self.residual_bits}-bit" if self.residual_codebook is not None else ""
        outliers = "" if self.outlier_columns is None else f", {self.outlier_columns.shape[0]} outlier columns"
        return f"vptq v{self.vector_size} {self.codebook_bits}-bit{residual}{outliers}"
