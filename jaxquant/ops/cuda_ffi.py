"""CUDA GEMV kernels for additive quantization, as XLA FFI custom calls.

Why not Pallas alone. On an H200 the Pallas Triton kernels (``pallas_kernels``) gather
each codeword, or each lookup-table entry, from global memory through L1, and a random
gather costs about one L1 wavefront per access whatever its size: at batch 1 the best of
them took 23.6 µs for a 4096×4096 2×8 layer against 11.1 µs for dense bfloat16
(``benchmarks/results/gpu_kernels_h200_b1_first_defaults.json``). Triton (through
Pallas) cannot gather from shared memory, where 32 banks serve a warp's random 4-byte
reads in a few cycles; these kernels do.

Three kernels, one source; ``matmul_cuda`` (the dispatcher's ``cuda_ffi``) picks by
measurement (``benchmarks/results/gpu_kernels_h200_cuda2.json``, H200, batch 1, 4096×4096):

1. ``lut_matmul_cuda``, the table kernel. The grid is (chunks of ``GC`` input groups) ×
   (blocks of output rows). Each block (1) stages its ``x`` slice in shared memory, (2)
   tabulates ``T[r, g, m, k] = x[r, g] · codebook[m, k]`` for its groups, one codeword
   per thread (``rows × GC × M × K`` floats, 32 or 64 KiB by default), (3) for each of its
   output rows reads the ``GC × M`` codes once (16-byte loads where aligned) and sums
   ``M`` table entries per group, then (4) adds ``scale · partial sum`` into the output
   with ``atomicAdd``; the output is zeroed first in the same stream. 10.5 µs for 2×8
   (1.0× dense bfloat16). Used for 2 to 4 rows.
2. ``lut_prefetch_matmul_cuda``: the same table, but each thread's codes, scales and
   codewords are loaded into registers before step (1), so the loads' latencies overlap
   one another and the table build. 7.1 µs for 2×8 (1.5×), 5.7 µs for 1×8 (1.9×). Used
   for one row.
3. ``decode_warp_matmul_cuda``: one warp per output row sums its codewords, read through
   the caches, and dots them with ``x``; no table, so it serves 1×16, whose 65536
   codewords fit no table in shared memory: 19.7 µs (0.55×), against 28.7 µs for the
   Pallas gather kernel.

The atomic float adds of the table kernels land in any order, so their results can differ
in the last bits from run to run (relative error against float64 stayed under 1e-6 on
the device); callers that need bit-for-bit repeatable output can force
``impl="pallas_gpu"``. The decode kernel is deterministic.

How it is built: ``nvcc`` at first use into the user cache directory, for the GPU's
compute capability (``jaxquant/native_build.py``). Without ``nvcc`` or a GPU,
``available()`` is False and every entry point raises ``NotImplementedError``, so the
dispatcher falls through to Pallas. ``JAXQUANT_NO_FFI=1`` disables it.

Eligibility: GPU backend, ``AdditiveQuantized`` with ``out_group_size == 1``, 1 to 4
rows of ``x``; uint8 codes (``2**B ≤ 256``) for the table kernels, uint8 or uint16 codes
with 1 or 2 codebooks and input groups of 8 for the decode kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.native_build import NativeLibrary
from jaxquant.ops import cpu_ffi
from jaxquant.qarray import AdditiveQuantized

TARGET_NAME = "jaxquant_aq_lut_cuda_f32"
MAX_ROWS = 4
# Shared-memory floats for the table per block, and output rows per block. Measured on an
# H200 (benchmarks/results/gpu_kernels_h200.json, 4096x4096): at one row 8192 floats and
# 512 rows (16 groups of 2x8 per block) took 10.6 us against 12.3 us for 16384 floats; at
# four rows 16384 floats took 22.1 us against 36.1 us for 8192 (the chunk shrinks with rows).
LUT_FLOATS_ONE_ROW = 8192
LUT_FLOATS = 16384
OUT_PER_BLOCK = 512

SOURCE_FILE = "aq_lut_cuda.cu"  # in jaxquant/ops/_native/

PREFETCH_TARGET = "jaxquant_aq_lut_prefetch_cuda_f32"
DECODE_TARGETS = {"uint8": "jaxquant_aq_decode_warp_cuda_u8", "uint16": "jaxquant_aq_decode_warp_cuda_u16"}
LIBRARY = NativeLibrary(
    "aq_lut_cuda",
    SOURCE_FILE,
    {TARGET_NAME: "JaxquantAqLutCudaF32", PREFETCH_TARGET: "JaxquantAqLutPrefetchCudaF32",
     DECODE_TARGETS["uint8"]: "JaxquantAqDecodeWarpCudaU8", DECODE_TARGETS["uint16"]: "JaxquantAqDecodeWarpCudaU16"},
    platform="CUDA",
)


def available() -> bool:
    """Build (once, with nvcc) and register the kernel; False without a GPU, nvcc or when disabled."""
    if jax.default_backend() != "gpu":
        return False
    return LIBRARY.available()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    if jax.default_backend() != "gpu":
        return "backend is not gpu"
    return LIBRARY.unavailable_reason()


def cuda_eligible(w: Any, rows: int) -> bool:
    """True when the kernel can run ``w`` on ``rows`` rows (ignoring backend and build)."""
    # The same weights as the CPU table kernel: uint8 codes, out groups of one.
    return cpu_ffi.ffi_eligible(w) and 1 <= rows <= MAX_ROWS


# Dynamic shared memory one block may take on Hopper (227 KiB); the table kernels refuse a
# chunk whose table and x slice would not fit rather than fail at launch.
MAX_SHARED_BYTES = 227 * 1024


def group_chunk(rows: int, num_codebooks: int, codebook_size: int, lut_floats: int = LUT_FLOATS) -> int:
    """Input groups per block: the largest power of two whose table fits ``lut_floats``."""
    per_group = rows * num_codebooks * codebook_size
    chunk = 1
    while chunk * 2 * per_group <= lut_floats:
        chunk *= 2
    return chunk


def _table_chunk(w: AdditiveQuantized, rows: int, lut_floats: int) -> int:
    """The table kernels' group chunk for ``w``: at most its group count, and within shared memory."""
    m, k, ig = w.codebooks.shape[0], w.codebooks.shape[1], w.codebooks.shape[3]
    chunk = min(group_chunk(rows, m, k, lut_floats), w.codes.shape[1])
    shared_bytes = 4 * rows * chunk * (m * k + ig)
    if shared_bytes > MAX_SHARED_BYTES:
        raise ValueError(f"lut_floats={lut_floats!r} gives a {shared_bytes}-byte table and x slice per block for "
                         f"{rows} rows of {w!r}; at most {MAX_SHARED_BYTES} bytes fit in shared memory")
    return chunk


def lut_matmul_cuda(
    x: jax.Array,
    w: AdditiveQuantized,
    *,
    lut_floats: int | None = None,
    out_per_block: int = OUT_PER_BLOCK,
) -> jax.Array:
    """``x @ W`` for ``x: [rows, d_in]`` through the CUDA LUT kernel; float32 ``[rows, d_out]``.

    Args:
        x: ``[rows, d_in]`` activations, 1 to ``MAX_ROWS`` rows.
        w: ``AdditiveQuantized`` with uint8 codes and ``out_group_size == 1``.
        lut_floats: shared-memory budget for the table, in floats (sets the group chunk);
            ``None``: ``LUT_FLOATS_ONE_ROW`` for one row, ``LUT_FLOATS`` for more.
        out_per_block: output rows per thread block.

    Raises:
        NotImplementedError: not on a GPU, ``w`` or the row count not eligible, or the
            kernel could not be built (no nvcc).
        ValueError: ``x`` is not ``[rows, d_in]``, or a block setting is below 1.
    """
    if out_per_block < 1 or (lut_floats is not None and lut_floats < 1):
        raise ValueError(f"out_per_block={out_per_block!r} and lut_floats={lut_floats!r} must be >= 1")
    rows = x.shape[0] if x.ndim == 2 else 0
    _check_call(x, w, cuda_eligible(w, rows), f"AdditiveQuantized with uint8 codes, og == 1 and 1..{MAX_ROWS} rows")
    if lut_floats is None:
        lut_floats = LUT_FLOATS_ONE_ROW if rows == 1 else LUT_FLOATS
    return _ffi_call(TARGET_NAME, x, w, group_chunk=_table_chunk(w, rows, lut_floats), out_per_block=out_per_block)


def _ffi_call(target: str, x: jax.Array, w: AdditiveQuantized, **attributes: int) -> jax.Array:
    """Call the kernel ``target`` on the operands every kernel here takes (float32 ``x``, the
    codes as stored, float32 codebooks and ``[d_out]`` scales), with int64 ``attributes``."""
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.d_out), jnp.float32))(
        x.astype(jnp.float32),
        w.codes,
        w.codebooks.astype(jnp.float32),
        w.scales.astype(jnp.float32).reshape(w.d_out),
        **{name: np.int64(value) for name, value in attributes.items()},
    )


def _check_call(x: jax.Array, w: Any, eligible: bool, needs: str) -> None:
    """The checks every kernel entry point shares: backend, eligibility, x's shape, the build."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError("cuda_ffi: backend is not gpu")
    if not eligible:
        raise NotImplementedError(f"cuda_ffi: needs {needs}, got {w!r} with x of shape {x.shape}")
    if x.shape[1] != w.d_in:
        raise ValueError(f"x must be [rows, d_in={w.d_in}], got shape {x.shape}")
    if not available():
        raise NotImplementedError(f"cuda_ffi: kernel unavailable ({unavailable_reason()})")


def lut_prefetch_matmul_cuda(
    x: jax.Array,
    w: AdditiveQuantized,
    *,
    lut_floats: int | None = None,
    threads: int | None = None,
    rows_per_thread: int = 2,
) -> jax.Array:
    """``x @ W`` through the table kernel that issues its global loads first; float32 ``[rows, d_out]``.

    The same table, group split and atomic adds as ``lut_matmul_cuda``; each thread's
    codes (up to 64 per row and chunk), scales and codewords are loaded into registers
    before the table is built, so their memory latencies overlap.

    Args:
        x: ``[rows, d_in]`` activations, 1 to ``MAX_ROWS`` rows.
        w: ``AdditiveQuantized`` with uint8 codes and ``out_group_size == 1``.
        lut_floats: table budget in floats, as for ``lut_matmul_cuda``.
        threads: threads per block, a multiple of 32 from 32 to 512; ``None``:
            ``prefetch_threads(num_codebooks)``.
        rows_per_thread: output rows per thread, 1, 2 or 4; a block covers
            ``threads * rows_per_thread`` rows.

    Raises:
        NotImplementedError: as ``lut_matmul_cuda``.
        ValueError: a block setting out of range, or ``x`` not ``[rows, d_in]``.
    """
    if threads is None:
        threads = prefetch_threads(w.codebooks.shape[0]) if isinstance(w, AdditiveQuantized) else 256
    if threads % 32 or not 32 <= threads <= 512 or rows_per_thread not in (1, 2, 4) or (
            lut_floats is not None and lut_floats < 1):
        raise ValueError(f"threads={threads!r} (multiple of 32 in 32..512), rows_per_thread={rows_per_thread!r} "
                         f"(1, 2 or 4) and lut_floats={lut_floats!r} (>= 1) out of range")
    rows = x.shape[0] if x.ndim == 2 else 0
    _check_call(x, w, prefetch_eligible(w, rows),
                f"AdditiveQuantized with uint8 codes, at least 4 codewords per codebook (the x slice after the "
                f"table must stay 16-byte aligned), og == 1 and 1..{MAX_ROWS} rows")
    if lut_floats is None:
        lut_floats = LUT_FLOATS_ONE_ROW if rows == 1 else LUT_FLOATS
    return _ffi_call(PREFETCH_TARGET, x, w, group_chunk=_table_chunk(w, rows, lut_floats), threads=threads,
                     rows_per_thread=rows_per_thread)


def prefetch_eligible(w: Any, rows: int) -> bool:
    """True when the table kernel with its loads first can run ``w`` on ``rows`` rows: the
    table kernel's weights, with at least 4 codewords per codebook (its x slice, placed after
    the table in shared memory, must stay 16-byte aligned)."""
    return cuda_eligible(w, rows) and w.codebooks.shape[1] >= 4


def prefetch_threads(num_codebooks: int) -> int:
    """Default threads per block of the table kernel with its loads first (two rows each).

    Measured on an H200 at batch 1 (``benchmarks/results/gpu_kernels_h200_cuda2.json``):
    with two codebooks 512 threads (1024 rows per block) took 7.1 µs at 4096×4096 against
    7.8 µs for 256, and 17.4/17.6 against 18.5 µs at the 11008-wide shapes; with one
    codebook, whose chunks hold twice the groups, 256 threads took 5.8 µs against 6.8 µs
    for 512 (fewer, larger blocks left SMs idle).
    """
    return 512 if num_codebooks >= 2 else 256


def matmul_cuda(x: jax.Array, w: AdditiveQuantized) -> jax.Array:
    """``x @ W`` through the fastest CUDA kernel measured for the call; float32 ``[rows, d_out]``.

    The dispatcher's ``cuda_ffi`` implementation. On an H200
    (``benchmarks/results/gpu_kernels_h200_cuda2.json``): one row of uint8 codes goes to
    the table kernel that issues its loads first (1.2–1.5× faster than the other table
    kernel at the three Llama-2-7B shapes); 2 to 4 rows to ``lut_matmul_cuda`` (at 4 rows
    the other one, whose 4-row builds spill registers, took 13–24% longer); uint16 codes
    (1×16) to the warp-per-row decode, 1.1–2.5× faster than the Pallas gather kernel at 1
    and 4 rows.

    Raises:
        NotImplementedError: not on a GPU, no build, more than ``MAX_ROWS`` rows, or a
            weight none of the kernels accepts.
        ValueError: ``x`` is not ``[rows, d_in]``.
    """
    rows = x.shape[0] if x.ndim == 2 else 0
    if rows == 1 and prefetch_eligible(w, rows):
        return lut_prefetch_matmul_cuda(x, w)
    if cuda_eligible(w, rows):
        return lut_matmul_cuda(x, w)
    if decode_eligible(w, rows):
        return decode_warp_matmul_cuda(x, w)
    raise NotImplementedError(
        f"cuda_ffi: needs AdditiveQuantized with og == 1 and 1..{MAX_ROWS} rows, and uint8 codes or uint16 codes "
        f"with 1 or 2 codebooks and groups of 8; got {w!r} with x of shape {x.shape}")


def decode_eligible(w: Any, rows: int) -> bool:
    """True when the warp-per-row decode kernel can run ``w`` on ``rows`` rows."""
    return (
        isinstance(w, AdditiveQuantized)
        and w.out_group_size == 1
        and w.in_group_size == 8
        and w.num_codebooks in (1, 2)
        and np.dtype(w.codes.dtype).name in DECODE_TARGETS
        and 1 <= rows <= MAX_ROWS
    )


def decode_warp_matmul_cuda(x: jax.Array, w: AdditiveQuantized, *, warps_per_block: int = 8,
                            unroll: int = 4) -> jax.Array:
    """``x @ W`` with one warp per output row decoding codewords from global memory; float32.

    No table, no atomics, no memset, so the result is the same on every run. The
    codebooks are read through the caches; suited to 2^16 codebooks (1×16), too large for
    a table in shared memory.

    Args:
        x: ``[rows, d_in]`` activations, 1 to ``MAX_ROWS`` rows.
        w: ``AdditiveQuantized`` with uint8 or uint16 codes, 1 or 2 codebooks, input
            groups of 8 and ``out_group_size == 1``.
        warps_per_block: output rows per block, 1 to 8.
        unroll: groups per lane whose loads are issued together, 4 or 8.

    Raises:
        NotImplementedError: not on a GPU, ``w`` or the row count not eligible, or no build.
        ValueError: a block setting out of range, or ``x`` not ``[rows, d_in]``.
    """
    if not 1 <= warps_per_block <= 8 or unroll not in (4, 8):
        raise ValueError(f"warps_per_block={warps_per_block!r} (1..8) and unroll={unroll!r} (4 or 8) out of range")
    rows = x.shape[0] if x.ndim == 2 else 0
    _check_call(x, w, decode_eligible(w, rows),
                f"AdditiveQuantized with uint8/uint16 codes, 1 or 2 codebooks, groups of 8, og == 1, 1..{MAX_ROWS} rows")
    target = DECODE_TARGETS[np.dtype(w.codes.dtype).name]
    return _ffi_call(target, x, w, warps_per_block=warps_per_block, unroll=unroll)


__all__ = [
    "DECODE_TARGETS", "LUT_FLOATS", "LUT_FLOATS_ONE_ROW", "MAX_ROWS", "OUT_PER_BLOCK", "PREFETCH_TARGET", "TARGET_NAME",
    "available", "cuda_eligible", "decode_eligible", "decode_warp_matmul_cuda", "group_chunk", "lut_matmul_cuda",
    "lut_prefetch_matmul_cuda", "matmul_cuda", "prefetch_eligible", "prefetch_threads", "unavailable_reason",
]
