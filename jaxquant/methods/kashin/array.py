"""``KashinQuantized``: a weight as two factors in an overdetermined basis.

``W[o] = û[o] + Qᵀ v̂[o]`` for each row ``o``, with ``û[o, i] = u_scales[o] ·
u_grid[u_codes[o, i]]``, ``v̂`` likewise, and ``Q`` the orthogonal transform ``transform``
with random ``signs`` of ``jaxquant.rotations`` (``Qᵀ r`` is ``rotations.unrotate``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant import rotations
from jaxquant.qarray import Layout, QuantizedArray, array_bits, static_field


def decode_factor(codes: jax.Array, grid: jax.Array, scales: jax.Array) -> jax.Array:
    """Rows of a factor: ``scales[o] · grid[codes[o, i]]`` in float32."""
    return grid.astype(jnp.float32)[codes.astype(jnp.int32)] * scales.astype(jnp.float32)[:, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)  # repr: QuantizedArray's one-line summary
class KashinQuantized(QuantizedArray):
    """Kashin storage (see the module docstring).

    Attributes:
        u_codes: ``[d_out, d_in]`` indices into ``u_grid``.
        u_grid: ``[2**u_bits]`` increasing grid of ``u``'s row-normalised values.
        u_scales: ``[d_out]`` per-row scale of ``u``.
        v_codes: ``[d_out, d_in]`` indices into ``v_grid``.
        v_grid: ``[2**v_bits]`` grid of ``v``.
        v_scales: ``[d_out]`` per-row scale of ``v``.
        signs: ``int8 [d_in]`` ±1, the random signs of ``Q``.
        u_bits: bits per ``u`` code.
        v_bits: bits per ``v`` code.
        transform: ``Q``'s fixed transform (``jaxquant.rotations``).
        shape: shape of the dense leaf this array stands for.
        layout: ``"out_in"`` or ``"in_out"``.
    """

    u_codes: jax.Array
    u_grid: jax.Array
    u_scales: jax.Array
    v_codes: jax.Array
    v_grid: jax.Array
    v_scales: jax.Array
    signs: jax.Array
    u_bits: int = static_field()
    v_bits: int = static_field()
    transform: str = static_field()
    shape: tuple[int, int] = static_field()
    layout: Layout = static_field("out_in")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        codes = (self.d_out, self.d_in)
        return {"u_codes": codes, "u_grid": (2**self.u_bits,), "u_scales": (self.d_out,), "v_codes": codes,
                "v_grid": (2**self.v_bits,), "v_scales": (self.d_out,), "signs": (self.d_in,)}

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        def rows(x: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice_in_dim(x, start, n_rows, axis=0)

        u = decode_factor(rows(self.u_codes), self.u_grid, rows(self.u_scales))
        v = decode_factor(rows(self.v_codes), self.v_grid, rows(self.v_scales))
        return u + rotations.unrotate(v, self.signs, self.transform)

    @property
    def storage_bits(self) -> int:
        """Codes of both factors at their widths, grids and scales at their dtype, one bit per sign."""
        codes = self.d_out * self.d_in * (self.u_bits + self.v_bits)
        continuous = sum(array_bits(x) for x in (self.u_grid, self.u_scales, self.v_grid, self.v_scales))
        return codes + continuous + self.d_in

    @property
    def resident_bytes(self) -> int:
        arrays = (self.u_codes, self.u_grid, self.u_scales, self.v_codes, self.v_grid, self.v_scales, self.signs)
        return sum(array_bits(x) for x in arrays) // 8  # codes one byte each

    @property
    def code_widths(self) -> dict[str, int]:
        return {"u_codes": self.u_bits, "v_codes": self.v_bits}

    @property
    def scheme(self) -> str:
        return f"kashin {self.u_bits}+{self.v_bits} {self.transform}"
