"""AQLM decode GEMV/GEMM on GPU through the Pallas Triton backend.

One program per (row of ``x``, block of ``BO`` output rows). It walks the input groups
in blocks of ``BG``, loads the ``BO × BG`` codes of each codebook with a strided load
(codes stay in their ``[d_out, n_in_groups, M]`` storage order, no transposition per
call), gathers the codewords from the flattened codebooks by indexing the ref with an
integer array (a Triton gather load), sums the ``M`` codewords, multiplies by the
matching slice of ``x`` and accumulates. Weight bytes read are the codes only; the
codebooks (64 KiB for 2×8 g8, 2 MiB for 1×16 g8) stay in L2.

Triton needs power-of-two block shapes, hence the eligibility rules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def _pow2_divisor(n: int, limit: int) -> int:
    d = 1
    while d * 2 <= limit and n % (d * 2) == 0:
        d *= 2
    return d


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def gpu_eligible(codes_shape: tuple[int, ...], codebooks_shape: tuple[int, ...]) -> bool:
    """Whether ``aqlm_matmul_gpu`` supports these shapes (og 1, pow2 ig, d_out % 16 == 0)."""
    d_out, n_in_groups, _ = codes_shape
    _, k, og, ig = codebooks_shape
    return og == 1 and _is_pow2(ig) and d_out % 16 == 0 and k <= 65536 and n_in_groups >= 1


def _kernel(x_ref, codes_ref, cb_ref, scales_ref, o_ref, *, bo, bg, m, k, ig, n_steps):
    # x_ref: [rows, G, ig]; codes_ref: [d_out, G * M]; cb_ref: [M * K * ig]; o_ref: [1, bo]
    r = pl.program_id(0)
    ob = pl.program_id(1)
    o0 = ob * bo
    lane = lax.broadcasted_iota(jnp.int32, (1, 1, ig), 2)

    def step(s, acc):
        g0 = s * bg
        xv = x_ref[r, pl.ds(g0, bg), :].astype(jnp.float32)  # [bg, ig]
        w = jnp.zeros((bo, bg, ig), jnp.float32)
        for j in range(m):  # M is small and static
            c = codes_ref[pl.ds(o0, bo), pl.ds(g0 * m + j, bg, stride=m)].astype(jnp.int32)
            idx = (c[:, :, None] + jnp.int32(j * k)) * jnp.int32(ig) + lane
            w = w + cb_ref[idx].astype(jnp.float32)
        return acc + jnp.sum(w * xv[None, :, :], axis=(1, 2))

    acc = lax.fori_loop(0, n_steps, step, jnp.zeros((bo,), jnp.float32))
    scales = scales_ref[pl.ds(o0, bo)].astype(jnp.float32)
    o_ref[0, :] = acc * scales


def aqlm_matmul_gpu(
    x: jax.Array,
    codes: jax.Array,
    codebooks: jax.Array,
    scales: jax.Array,
    *,
    block_out: int = 64,
    block_groups: int = 32,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """``[rows, d_in] × AQLM(d_out, d_in) -> [rows, d_out]`` float32 on the Triton backend.

    Args:
        x: ``[rows, d_in]`` activations.
        codes: ``[d_out, n_in_groups, M]`` uint8/uint16/int32 codes.
        codebooks: ``[M, K, 1, ig]``.
        scales: ``[d_out, 1, 1, 1]``.
        block_out: output rows per program (a power of two dividing ``d_out`` is used).
        block_groups: input groups per loop step (a power of two dividing the group count).
        num_warps: Triton warps per program.
        interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
        ``[rows, d_out]`` float32.
    """
    if not gpu_eligible(codes.shape, codebooks.shape):
        raise NotImplementedError(
            f"aqlm_matmul_gpu: unsupported codes {codes.shape} / codebooks {codebooks.shape}"
        )
    d_out, n_in_groups, m = codes.shape
    _, k, _, ig = codebooks.shape
    rows, d_in = x.shape
    if d_in != n_in_groups * ig:
        raise ValueError(f"x has d_in={d_in}, codes expect {n_in_groups} groups of {ig}")
    bo = _pow2_divisor(d_out, block_out)
    bg = _pow2_divisor(n_in_groups, block_groups)
    kernel = functools.partial(
        _kernel, bo=bo, bg=bg, m=m, k=k, ig=ig, n_steps=n_in_groups // bg
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, d_out), jnp.float32),
        grid=(rows, d_out // bo),
        # Whole arrays: the kernel slices them itself with power-of-two pl.ds loads.
        in_specs=[pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((1, bo), lambda r, ob: (r, ob)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="aqlm_matmul_gpu",
    )(
        x.reshape(rows, n_in_groups, ig),
        codes.reshape(d_out, n_in_groups * m),
        codebooks.reshape(m * k * ig),
        scales.reshape(d_out),
    )
