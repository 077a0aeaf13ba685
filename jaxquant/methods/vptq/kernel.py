"""The native CPU product of a few activation rows with a VPTQ weight (XLA FFI custom call).

Why native code. ``y[r, g·v + t] = Σ_i x[r, i] s_i C[codes[g, i], t]`` is one codeword load
and ``v`` multiply-adds per code. XLA:CPU cannot fuse the codeword gather into the sum, so
its best is to decode the weight tile by tile and multiply, which reads and writes the
dense weight; the kernel (``ops/_native/vptq_gemv.cc``) reads only the codes (a byte per
``v`` weights for 256-entry codebooks) and keeps the codebooks in L1. It runs on XLA's
intra-op thread pool, blocks of ``BLOCK_GROUPS`` vectors of rows per task.

Built at first use like every native kernel (``jaxquant.native_build``); where it cannot
be built, or off the CPU backend, or for more than ``MAX_ROWS`` rows, ``matmul`` raises
``NotImplementedError`` and ``ops.matmul`` falls through to its tile-wise decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.native_build import NativeLibrary, require_few_rows_kernel

TARGET_NAME = "jaxquant_vptq_gemv_f32"
LIBRARY = NativeLibrary("vptq_gemv", "vptq_gemv.cc", {TARGET_NAME: "JaxquantVptqGemvF32"})
MAX_ROWS = 4  # beyond this, decoding once and a dense product win (as for AQLM)
BLOCK_GROUPS = 64


def matmul(x: jax.Array, w: object) -> jax.Array:
    """``x @ W`` for ``x: [rows, d_in]`` and a ``VPTQQuantized`` ``w``: float32 ``[rows, d_out]``.

    Raises:
        NotImplementedError: not on the CPU backend, more than ``MAX_ROWS`` rows, codes
            wider than 16 bits, or the kernel could not be built.
    """
    if np.dtype(w.codes.dtype).itemsize > 2:
        raise NotImplementedError(f"vptq kernel: codes of {w.codebook_bits} bits (uint8/uint16 only)")
    require_few_rows_kernel(LIBRARY, "vptq kernel", x.shape[0], MAX_ROWS)
    xs = x.astype(jnp.float32)
    if w.column_scales is not None:
        xs = xs * w.column_scales.astype(jnp.float32)[None, :]
    book = w.codebook.astype(jnp.float32)
    offsets = jnp.zeros((1,), jnp.int32)
    if w.outlier_codebook is not None:  # stacked after the main codebook; outlier columns start there
        book = jnp.concatenate([book, w.outlier_codebook.astype(jnp.float32)])
        offsets = jnp.where(w.outlier_mask(), jnp.int32(w.codebook.shape[0]), jnp.int32(0))
    if w.residual_codes is None:
        res_codes, res_book = jnp.zeros((0, 0), jnp.uint8), jnp.zeros((0, w.vector_size), jnp.float32)
    else:
        res_codes, res_book = w.residual_codes, w.residual_codebook.astype(jnp.float32)
    out_type = jax.ShapeDtypeStruct((x.shape[0], w.d_out), jnp.float32)
    return jax.ffi.ffi_call(TARGET_NAME, out_type)(
        xs, w.codes, book, offsets, res_codes, res_book, block_groups=np.int64(BLOCK_GROUPS)
    )
