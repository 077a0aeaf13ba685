"""``PVQQuantized``: groups of output rows as pyramid-lattice directions times amplitudes.

``W[g·d : (g+1)·d, i] = grid[amplitude_codes[g, i]] · s_i · √d · y / ‖y‖`` with ``y =
pulses[g·d : (g+1)·d, i]`` a point of the pyramid ``Σ|y| = K``, ``s_i`` the column scale
and ``d`` the group size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.methods.pvq.lattice import index_bits
from jaxquant.qarray import Layout, QuantizedArray, array_bits, static_field


def decode_groups(pulses: jax.Array, amplitudes: jax.Array, group_size: int) -> jax.Array:
    """``pulses [rows, d_in]`` (whole groups of rows) as unit directions times ``amplitudes
    [rows / d, d_in]``, float32."""
    rows, d_in = pulses.shape
    y = pulses.astype(jnp.float32).reshape(rows // group_size, group_size, d_in)
    unit = y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, axis=1, keepdims=True), 1.0))
    return (unit * amplitudes.astype(jnp.float32)[:, None, :]).reshape(rows, d_in)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)  # repr: QuantizedArray's one-line summary
class PVQQuantized(QuantizedArray):
    """PVQ storage (see the module docstring).

    Attributes:
        pulses: ``int8 [d_out, d_in]``, each group's lattice point (the honest count charges
            its enumeration index, ``ceil(log2 |P(d, K)|)`` bits per group).
        amplitude_codes: ``[d_out / d, d_in]`` indices into ``amplitude_grid``.
        amplitude_grid: ``[2**amplitude_bits]`` amplitudes in units of ``s_i · √d``.
        column_scales: ``[d_in]`` per-column scale ``s_i``.
        group_size: ``d``, output rows per group.
        pulses_per_group: ``K``.
        amplitude_bits: bits per amplitude code.
        shape: shape of the dense leaf this array stands for.
        layout: ``"out_in"`` or ``"in_out"``.
    """

    pulses: jax.Array
    amplitude_codes: jax.Array
    amplitude_grid: jax.Array
    column_scales: jax.Array
    group_size: int = static_field()
    pulses_per_group: int = static_field()
    amplitude_bits: int = static_field()
    shape: tuple[int, int] = static_field()
    layout: Layout = static_field("out_in")

    @property
    def row_group(self) -> int:
        return self.group_size

    def amplitudes(self, codes: jax.Array) -> jax.Array:
        """Amplitudes of groups from their codes ``[groups, d_in]``, float32."""
        unit = self.column_scales.astype(jnp.float32) * jnp.sqrt(jnp.float32(self.group_size))
        return self.amplitude_grid.astype(jnp.float32)[codes.astype(jnp.int32)] * unit

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"pulses": (self.d_out, self.d_in), "amplitude_codes": (self.d_out // self.group_size, self.d_in),
                "amplitude_grid": (2**self.amplitude_bits,), "column_scales": (self.d_in,)}

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        d = self.group_size
        pulses = jax.lax.dynamic_slice_in_dim(self.pulses, start, n_rows, axis=0)
        codes = jax.lax.dynamic_slice_in_dim(self.amplitude_codes, start // d, n_rows // d, axis=0)
        return decode_groups(pulses, self.amplitudes(codes), d)

    @property
    def storage_bits(self) -> int:
        """Per group the lattice point's index and the amplitude code; the grid and column scales."""
        groups = (self.d_out // self.group_size) * self.d_in
        per_group = index_bits(self.group_size, self.pulses_per_group) + self.amplitude_bits
        return groups * per_group + array_bits(self.amplitude_grid) + array_bits(self.column_scales)

    @property
    def resident_bytes(self) -> int:
        return sum(array_bits(x) for x in (self.pulses, self.amplitude_codes, self.amplitude_grid,
                                           self.column_scales)) // 8

    @property
    def code_widths(self) -> dict[str, int]:
        # The pulses are stored as signed counts, not as their enumeration index.
        return {"amplitude_codes": self.amplitude_bits}

    @property
    def scheme(self) -> str:
        return f"pvq d{self.group_size} K{self.pulses_per_group} a{self.amplitude_bits}"
