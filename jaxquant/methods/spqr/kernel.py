"""The native CPU product of a few activation rows with an SpQR weight (XLA FFI custom call).

Why native code. XLA:CPU can only decode the weight tile by tile and multiply (it cannot
fuse the per-group grids and the sparse outliers into the product), which reads and writes
the dense weight. The kernel (``ops/_native/spqr_gemv.cc``) reads each uint8 code once: per
row and group it takes the codes' dot product with the activations and applies the group's
scale and zero point to the sum, ``s · (Σ c·x − z · Σ x)``, then adds the row's outliers. The
activations are permuted once to the codes' column order.

Built at first use like every native kernel (``jaxquant.native_build``); off the CPU backend,
for more than ``MAX_ROWS`` rows, or where it cannot be built, ``matmul`` raises
``NotImplementedError`` and ``ops.matmul`` falls through to its tile-wise decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.native_build import NativeLibrary, require_few_rows_kernel

TARGET_NAME = "jaxquant_spqr_gemv_f32"
LIBRARY = NativeLibrary("spqr_gemv", "spqr_gemv.cc", {TARGET_NAME: "JaxquantSpqrGemvF32"})
MAX_ROWS = 4  # beyond this, decoding once and a dense product win
BLOCK_ROWS = 64


def matmul(x: jax.Array, w: object) -> jax.Array:
    """``x @ W`` for ``x: [rows, d_in]`` and an ``SpQRQuantized`` ``w``: float32 ``[rows, d_out]``.

    Raises:
        NotImplementedError: not on the CPU backend, more than ``MAX_ROWS`` rows, or the
            kernel could not be built.
    """
    require_few_rows_kernel(LIBRARY, "spqr kernel", x.shape[0], MAX_ROWS)
    xp = x.astype(jnp.float32)
    if w.column_positions is not None:  # input column i is stored at position positions[i]
        xp = xp[:, jnp.argsort(w.column_positions.astype(jnp.int32))]
    as_i32 = lambda a: a.astype(jnp.int32)  # noqa: E731
    out_type = jax.ShapeDtypeStruct((x.shape[0], w.d_out), jnp.float32)
    return jax.ffi.ffi_call(TARGET_NAME, out_type)(
        xp, w.codes, w.scale_codes, w.zero_codes, w.scale_stats.astype(jnp.float32),
        w.zero_stats.astype(jnp.float32), w.outlier_values.astype(jnp.float32), as_i32(w.outlier_columns),
        as_i32(w.outlier_row_starts), group_size=np.int64(w.group_size), stat_group=np.int64(w.stat_group),
        block_rows=np.int64(BLOCK_ROWS),
    )
