"""A native CPU lookup-table GEMV for additive quantization, as an XLA FFI custom call.

Why native code. The LUT product is ``y[r, o] = scale[o] · Σ_c T[r, c, codes[o, c]]``: one
table lookup and one add per code. XLA:CPU cannot fuse a gather into the reduction that
consumes it, so every gathered float makes a round trip through memory (about 1 ns per
element), which leaves the pure-XLA kernel at or below the dense float32 product for large
layers. A few dozen lines of C++ do the lookup with AVX-512 gathers (16 lookups per
instruction, summed in registers), read the uint8 codes exactly once, and run on XLA's own
intra-op thread pool, so nothing is materialised but the table.

How it is built: see ``jaxquant/native_build.py`` (compiled at first use into the user
cache directory). When no compiler is found or the build fails, ``available()`` is False,
``lut_matmul_ffi`` raises ``NotImplementedError`` and the dispatcher falls through to the
XLA implementation. Set ``JAXQUANT_NO_FFI=1`` to disable it.

Eligibility: CPU backend, ``AdditiveQuantized`` with ``out_group_size == 1`` and
``2**B ≤ 256`` (uint8 codes), any ``M`` and ``in_group_size``, any number of rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.native_build import NativeLibrary
from jaxquant.qarray import AdditiveQuantized

TARGET_NAME = "jaxquant_aq_lut_f32"
DECODE_TARGET_NAME = "jaxquant_aq_decode_f32"

# Bytes of the lookup table gathered from per cache-blocking step (kept in L1), and output
# rows per unit of work handed to a thread (their codes stay in L2 across steps).
COL_BLOCK_BYTES = 32 * 1024
BLOCK_ROWS = 256
SOURCE_FILE = "aq_lut.cc"  # in jaxquant/ops/_native/

LIBRARY = NativeLibrary(
    "aq_lut", SOURCE_FILE, {TARGET_NAME: "JaxquantAqLutF32", DECODE_TARGET_NAME: "JaxquantAqDecodeF32"}
)


def available() -> bool:
    """Build (once) and register the kernel; False when disabled or it cannot be built."""
    return LIBRARY.available()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    return LIBRARY.unavailable_reason()


def ffi_eligible(w: Any) -> bool:
    """True when the native kernel can run ``w`` (ignoring backend and build)."""
    return (
        isinstance(w, AdditiveQuantized)
        and w.out_group_size == 1
        and w.codebooks.shape[1] <= 256
        and np.dtype(w.codes.dtype) == np.uint8
    )


def lut_matmul_ffi(
    x: jax.Array,
    w: AdditiveQuantized,
    *,
    col_block_bytes: int = COL_BLOCK_BYTES,
    block_rows: int = BLOCK_ROWS,
) -> jax.Array:
    """``x @ W`` for ``x: [rows, d_in]`` through the native LUT kernel; float32 ``[rows, d_out]``.

    Raises:
        NotImplementedError: not on the CPU backend, ``w`` not eligible (see
            ``ffi_eligible``), or the kernel could not be built.
        ValueError: ``x`` is not ``[rows, d_in]``.
    """
    if jax.default_backend() != "cpu":
        raise NotImplementedError("cpu_ffi: backend is not cpu")
    if not ffi_eligible(w):
        raise NotImplementedError(f"cpu_ffi: needs AdditiveQuantized with uint8 codes and og == 1, got {w!r}")
    if x.ndim != 2 or x.shape[1] != w.d_in:
        raise ValueError(f"x must be [rows, d_in={w.d_in}], got shape {x.shape}")
    if not available():
        raise NotImplementedError(f"cpu_ffi: kernel unavailable ({unavailable_reason()})")
    rows, d_out = x.shape[0], w.codes.shape[0]
    out_type = jax.ShapeDtypeStruct((rows, d_out), jnp.float32)
    return jax.ffi.ffi_call(TARGET_NAME, out_type)(
        x.astype(jnp.float32),
        w.codes,
        w.codebooks.astype(jnp.float32),
        w.scales.astype(jnp.float32).reshape(d_out),
        col_block_bytes=np.int64(col_block_bytes),
        block_rows=np.int64(block_rows),
    )


def decode_rows_ffi(w: AdditiveQuantized, start_group: jax.Array, n_groups: int) -> jax.Array:
    """Decode output groups ``[start_group, start_group + n_groups)`` of ``w`` natively.

    The XLA:CPU gather of codeword rows costs several ns per element (a 4096×4096 2×8
    weight took ~100 ms to decode); this is a plain loop over the codes instead.

    Args:
        w: ``AdditiveQuantized`` with uint8 or uint16 codes (any ``M``, ``og``, ``ig``).
        start_group: int32 scalar (may be traced), the first output group.
        n_groups: static number of output groups.

    Returns:
        float32 ``[n_groups · og, d_in]`` in storage order ``(d_out, d_in)``.

    Raises:
        NotImplementedError: not on the CPU backend, codes not uint8/uint16, or the kernel
            could not be built.
    """
    if jax.default_backend() != "cpu":
        raise NotImplementedError("cpu_ffi: backend is not cpu")
    if not isinstance(w, AdditiveQuantized) or np.dtype(w.codes.dtype) not in (np.uint8, np.uint16):
        raise NotImplementedError(f"cpu_ffi decode: needs AdditiveQuantized with uint8/uint16 codes, got {w!r}")
    if not available():
        raise NotImplementedError(f"cpu_ffi: kernel unavailable ({unavailable_reason()})")
    out_type = jax.ShapeDtypeStruct((n_groups * w.out_group_size, w.d_in), jnp.float32)
    return jax.ffi.ffi_call(DECODE_TARGET_NAME, out_type)(
        w.codes,
        w.codebooks.astype(jnp.float32),
        w.scales.astype(jnp.float32).reshape(w.codes.shape[0]),
        jnp.asarray(start_group, jnp.int32).reshape(1),
    )


__all__ = [
    "DECODE_TARGET_NAME",
    "TARGET_NAME",
    "available",
    "decode_rows_ffi",
    "ffi_eligible",
    "lut_matmul_ffi",
    "unavailable_reason",
]