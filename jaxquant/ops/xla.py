"""XLA implementations of ``x @ W`` for quantized ``W``: the CPU decode path and the oracle.

Three implementations, all taking ``x`` as ``[rows, d_in]`` and returning float32
``[rows, d_out]``:

- ``lut_matmul``: for ``AdditiveQuantized`` with ``2**B ≤ 256`` and ``out_group_size
  == 1`` (2×8, 1×8, 4×8 …). Per input group it computes the products of ``x`` with
  every codeword (one einsum, a table of ``n_in_groups × M × 2**B`` floats per row of
  ``x``), then gathers from that table by the codes and sums. The dense weight is
  never materialised: the codes (1 byte per ``in_group_size`` weights per codebook)
  are the only weight bytes read.
- ``decode_matmul``: any quantized array. Decodes the weight one tile of output rows
  at a time and multiplies it densely; the tile is sized to stay in cache, so the dense
  weight never exists whole. This is the generic path (1×16, ScalarQuantized, ``og >
  1``) and the large-batch path (where decoding once per tile is amortised over rows).
- ``reference_matmul``: decode the whole weight, then one product. The simple oracle.

Why the tiling. XLA on CPU does not fuse a gather into the reduction that consumes it:
the gathered values are written to memory and read back. Gathering for all codes at
once materialises ``d_out × n_in_groups × M`` floats (45 MB for an 11008×4096 2×8
layer, more than the dense weight) and runs several times slower than the dense
product. ``lut_matmul`` therefore walks the input groups in tiles inside a
``fori_loop`` and accumulates a ``d_out`` vector, so every gathered tile is small
enough to stay in cache and the codes are streamed exactly once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.ops import cpu_ffi
from jaxquant.qarray import AdditiveQuantized, is_quantized

# Gathered floats per loop step of the LUT kernel (per row of x): 64 codes per output
# row is one 64-byte cache line of uint8 codes; times d_out rows it stays in L2.
_LUT_CODES_PER_STEP = 64
# Decoded floats per tile of decode_matmul: 1 Mi floats = 4 MiB.
_DECODE_TILE_FLOATS = 1 << 20


def lut_eligible(w: Any) -> bool:
    """True when ``lut_matmul`` can run ``w`` (AQ, ``2**B ≤ 256``, ``og == 1``)."""
    return (
        isinstance(w, AdditiveQuantized)
        and w.codebooks.shape[1] <= 256
        and w.out_group_size == 1
    )


def _check_x(x: jax.Array, w: Any) -> None:
    if x.ndim != 2 or x.shape[1] != w.d_in:
        raise ValueError(f"x must be [rows, d_in={w.d_in}], got shape {x.shape}")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    for d in range(limit, 0, -1):
        if n % d == 0:
            return d
    return 1


def lut_matmul(x: jax.Array, w: AdditiveQuantized, *, codes_per_step: int | None = None) -> jax.Array:
    """Lookup-table GEMV/GEMM for additive quantization with small codebooks.

    ``y[r, o] = scale[o] · Σ_{j,m} T[r, j, m, codes[o, j, m]]`` with
    ``T[r, j, m, k] = x[r, j·ig:(j+1)·ig] · codebooks[m, k, 0, :]``.

    Args:
        x: ``[rows, d_in]`` activations (any float dtype; computed in float32).
        w: ``AdditiveQuantized`` with ``2**B ≤ 256`` and ``out_group_size == 1``.
        codes_per_step: codes per output row gathered per loop step (a divisor of
            ``n_in_groups · M`` is chosen at most this large); defaults to 64.

    Returns:
        ``[rows, d_out]`` float32.

    Raises:
        NotImplementedError: when ``w`` is not eligible (see ``lut_eligible``).
    """
    if not lut_eligible(w):
        raise NotImplementedError(f"lut_matmul needs AdditiveQuantized with 2**B <= 256 and og == 1, got {w!r}")
    _check_x(x, w)
    n_out, n_in_groups, m = w.codes.shape
    _, k, _, ig = w.codebooks.shape
    rows = x.shape[0]
    n_codes = n_in_groups * m
    step = _largest_divisor_at_most(n_codes, codes_per_step or _LUT_CODES_PER_STEP)
    n_steps = n_codes // step

    # Table of partial products: [rows, n_in_groups, M, K] -> flat [rows * n_codes * K].
    xg = x.astype(jnp.float32).reshape(rows, n_in_groups, ig)
    cb = w.codebooks[:, :, 0, :].astype(jnp.float32)  # [M, K, ig]
    table = jnp.einsum("rjg,mkg->rjmk", xg, cb, precision=lax.Precision.HIGHEST)
    table = table.reshape(rows * n_codes * k)

    codes = w.codes.reshape(n_out, n_codes)
    # Offset of code column c of row r in the flat table; int32 before any arithmetic
    # because uint8 + int32 is an error under strict promotion.
    col_offsets = jnp.arange(n_codes, dtype=jnp.int32) * jnp.int32(k)
    row_offsets = jnp.arange(rows, dtype=jnp.int32) * jnp.int32(n_codes * k)

    def body(i: jax.Array, acc: jax.Array) -> jax.Array:
        tile = lax.dynamic_slice_in_dim(codes, i * step, step, axis=1).astype(jnp.int32)
        offs = lax.dynamic_slice_in_dim(col_offsets, i * step, step, axis=0)
        idx = row_offsets[:, None, None] + (tile + offs[None, :])[None]  # [rows, n_out, step]
        return acc + jnp.take(table, idx, mode="clip").sum(axis=-1)

    acc = lax.fori_loop(0, n_steps, body, jnp.zeros((rows, n_out), jnp.float32))
    return acc * w.scales.reshape(1, n_out).astype(jnp.float32)


def _decode_rows_out_in(w: Any, start: jax.Array, n_rows: int, native: bool = False) -> jax.Array:
    """Decode ``n_rows`` output rows of ``w`` from ``start`` (a multiple of ``w.row_group``)."""
    if native:
        try:
            return cpu_ffi.decode_rows_ffi(w, start // w.row_group, n_rows // w.row_group)
        except NotImplementedError:
            pass  # no native decoder for this array, no compiler, or not CPU: decode in XLA
    return w.decode_rows(start, n_rows)


def decode_matmul(
    x: jax.Array, w: Any, *, tile_rows: int | None = None, native: bool | None = None
) -> jax.Array:
    """Decode ``w`` one tile of output rows at a time and multiply densely.

    Args:
        x: ``[rows, d_in]`` activations.
        w: any quantized array.
        tile_rows: output rows decoded per step (rounded to a divisor of ``d_out`` that
            is a multiple of the out group); by default about 4 MiB of float32.
        native: decode additive tiles with the native CPU kernel (``cpu_ffi``) when it
            is available. XLA:CPU gathers codeword rows at several ns per element (about
            100 ms for a 4096×4096 2×8 weight), the native loop at memory speed. The
            native call has no derivative, and fine-tuning differentiates through this
            path, so the default (``None`` or ``False``) is the differentiable pure-XLA
            decode; pass ``True`` for inference-only speed.

    Returns:
        ``[rows, d_out]`` float32.
    """
    if not is_quantized(w):
        raise NotImplementedError(f"decode_matmul needs a quantized array, got {type(w).__name__}")
    _check_x(x, w)
    og = w.row_group
    n_out_groups = w.d_out // og
    want = tile_rows or max(og, _DECODE_TILE_FLOATS // w.d_in)
    groups_per_tile = _largest_divisor_at_most(n_out_groups, max(1, want // og))
    tile = groups_per_tile * og
    n_tiles = w.d_out // tile
    xf = x.astype(jnp.float32)
    use_native = bool(native) and jax.default_backend() == "cpu"

    def one_tile(i: jax.Array) -> jax.Array:
        wt = _decode_rows_out_in(w, i * tile, tile, use_native)  # [tile, d_in]
        return lax.dot_general(xf, wt, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)

    if n_tiles == 1:
        return one_tile(jnp.int32(0))
    out = lax.map(one_tile, jnp.arange(n_tiles, dtype=jnp.int32))  # [n_tiles, rows, tile]
    return out.transpose(1, 0, 2).reshape(x.shape[0], w.d_out)


def reference_matmul(x: jax.Array, w: Any) -> jax.Array:
    """The oracle: decode the whole weight to float32, then one dense product."""
    if not is_quantized(w):
        raise NotImplementedError(f"reference_matmul needs a quantized array, got {type(w).__name__}")
    _check_x(x, w)
    w_out_in = w.decode_out_in(jnp.float32)
    return lax.dot_general(
        x.astype(jnp.float32), w_out_in, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST
    )


def lut_table_bytes(w: AdditiveQuantized, rows: int) -> int:
    """Bytes of the lookup table ``lut_matmul`` builds for ``rows`` rows of ``x``."""
    n_in_groups = w.d_in // w.in_group_size
    return rows * n_in_groups * w.num_codebooks * w.codebooks.shape[1] * 4


__all__ = [
    "decode_matmul",
    "lut_eligible",
    "lut_matmul",
    "lut_table_bytes",
    "reference_matmul",
]
