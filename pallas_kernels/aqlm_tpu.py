"""AQLM decode GEMV/GEMM on TPU (Mosaic) for codebooks of at most 256 entries.

Mosaic TPU has no general gather, so the lookup is a one-hot product: per block of
``BO`` output rows and ``BG`` input groups and per codebook ``m``, the MXU computes the
transposed table ``T = codebook_m · x_blockᵀ`` (``[K, BG]``: the product of every
codeword with every input group of ``x``), and the VPU selects ``T[codes[o, j], j]``
with a one-hot compare against an iota and sums over ``K`` and ``BG``. The output
block stays resident across the input-group grid axis (the TPU grid runs
sequentially), so it accumulates there.

Codes are passed as ``[M, d_out, n_in_groups]`` so that a block is a plain 2-D tile
per codebook (TPU tiles want the input groups on the lane axis).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def tpu_eligible(codes_shape: tuple[int, ...], codebooks_shape: tuple[int, ...]) -> bool:
    """Whether ``aqlm_matmul_tpu`` supports these shapes (og 1, K ≤ 256, d_out % 8 == 0)."""
    d_out, _, _ = codes_shape
    _, k, og, _ = codebooks_shape
    return og == 1 and k <= 256 and d_out % 8 == 0


def _kernel(x_ref, codes_ref, cb_ref, scales_ref, o_ref, *, rows, m, k, bo, bg):
    # x_ref: [rows, bg, ig]; codes_ref: [M, bo, bg]; cb_ref: [M, K, ig];
    # scales_ref: [bo, 1]; o_ref: [bo, rows] (accumulated over grid axis 1).
    @pl.when(pl.program_id(1) == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    iota_k = lax.broadcasted_iota(jnp.int32, (bo, k, bg), 1)
    cols = []
    for r in range(rows):  # decode batches are small and static
        xr = x_ref[r].astype(jnp.float32)  # [bg, ig]
        part = jnp.zeros((bo, bg), jnp.float32)
        for j in range(m):
            cb = cb_ref[j].astype(jnp.float32)  # [K, ig]
            table = lax.dot_general(cb, xr, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            codes = codes_ref[j].astype(jnp.int32)  # [bo, bg]
            hit = codes[:, None, :] == iota_k  # [bo, K, bg]
            part = part + jnp.sum(jnp.where(hit, table[None, :, :], jnp.float32(0)), axis=1)
        cols.append(jnp.sum(part, axis=1, keepdims=True))  # [bo, 1]
    block = cols[0] if rows == 1 else jnp.concatenate(cols, axis=1)
    o_ref[...] += block * scales_ref[...].astype(jnp.float32)


def aqlm_matmul_tpu(
    x: jax.Array,
    codes: jax.Array,
    codebooks: jax.Array,
    scales: jax.Array,
    *,
    block_out: int = 8,
    interpret: bool = False,
) -> jax.Array:
    """``[rows, d_in] × AQLM(d_out, d_in) -> [rows, d_out]`` float32 with Mosaic TPU.

    Args:
        x: ``[rows, d_in]`` activations (``rows`` small: it is unrolled).
        codes: ``[d_out, n_in_groups, M]`` codes.
        codebooks: ``[M, K, 1, ig]`` with ``K ≤ 256``.
        scales: ``[d_out, 1, 1, 1]``.
        block_out: output rows per block (a multiple of 8 dividing ``d_out``).
        interpret: run in the Pallas interpreter (CPU tests).

    Returns:
        ``[rows, d_out]`` float32.
    """
    if not tpu_eligible(codes.shape, codebooks.shape):
        raise NotImplementedError(
            f"aqlm_matmul_tpu: unsupported codes {codes.shape} / codebooks {codebooks.shape}"
        )
    d_out, n_in_groups, m = codes.shape
    _, k, _, ig = codebooks.shape
    rows, d_in = x.shape
    if d_in != n_in_groups * ig:
        raise ValueError(f"x has d_in={d_in}, codes expect {n_in_groups} groups of {ig}")
    bo = block_out if d_out % block_out == 0 and block_out % 8 == 0 else 8
    # Lane-axis blocks must be multiples of 128 or the whole axis.
    bg = 128 if n_in_groups % 128 == 0 else n_in_groups
    kernel = functools.partial(_kernel, rows=rows, m=m, k=k, bo=bo, bg=bg)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((d_out, rows), jnp.float32),
        grid=(d_out // bo, n_in_groups // bg),
        in_specs=[
            pl.BlockSpec((rows, bg, ig), lambda o, g: (0, g, 0)),
            pl.BlockSpec((m, bo, bg), lambda o, g: (0, o, g)),
            pl.BlockSpec((m, k, ig), lambda o, g: (0, 0, 0)),
            pl.BlockSpec((bo, 1), lambda o, g: (o, 0)),
        ],
        out_specs=pl.BlockSpec((bo, rows), lambda o, g: (o, 0)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=64 * 1024 * 1024
        ),
        interpret=interpret,
        name="aqlm_matmul_tpu",
    )(
        x.reshape(rows, n_in_groups, ig),
        codes.transpose(2, 0, 1),
        codebooks.reshape(m, k, ig),
        scales.reshape(d_out, 1),
    )
    return out.T
