"""AQLM decode GEMV/GEMM on GPU through the Pallas Triton backend.

One program per (row of ``x``, block of ``BO`` output rows). It walks the input groups
in blocks of ``BG``, loads the ``BO × BG`` codes of each codebook with a strided load
(codes stay in their ``[d_out, n_in_groups, M]`` storage order, no transposition per
call), gathers the codewords from the flattened codebooks by indexing the ref with an
integer array (a Triton gather load), sums the ``M`` codewords, multiplies by the
matching slice of ``x`` and accumulates. Weight bytes read are the codes only; the
codebooks (64 KiB for 2×8 g8, 2 MiB for 1×16 g8) stay in L2.

Triton needs power-of-two block shapes, hence the eligibility rules.

``aqlm_matmul_gpu_lut`` is the lookup-table variant (gather ``M`` table entries per
output and group instead of ``M × ig`` codeword elements). On an H200 both are bound by
random gathers through L1, about one wavefront per access whatever its size, so the
``ig``-fold cut in gathered bytes did not pay: the table variant was slower at every
measured shape (``benchmarks/results/gpu_kernels_h200.json``) and the dispatcher does
not use it. On GPUs the dispatcher prefers ``jaxquant.ops.cuda_ffi``: shared-memory tables
for 2^8 codebooks and, for 1×16, a warp-per-row decode that was 1.1–2.5× faster than this
kernel (``benchmarks/results/gpu_kernels_h200_cuda2.json``). This kernel serves machines
without nvcc.
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


def _shapes(name: str, eligible: bool, x: jax.Array, codes: jax.Array, codebooks: jax.Array):
    """(d_out, groups, M, K, ig, rows) after checking the call; raises as both kernels do."""
    if not eligible:
        raise NotImplementedError(f"{name}: unsupported codes {codes.shape} / codebooks {codebooks.shape}")
    d_out, n_in_groups, m = codes.shape
    _, k, _, ig = codebooks.shape
    rows, d_in = x.shape
    if d_in != n_in_groups * ig:
        raise ValueError(f"x has d_in={d_in}, codes expect {n_in_groups} groups of {ig}")
    return d_out, n_in_groups, m, k, ig, rows


def _call(kernel, name: str, rows: int, d_out: int, bo: int, n_inputs: int, num_warps: int, interpret: bool):
    """The ``pallas_call`` both kernels make: one program per (row, block of ``bo`` outputs)."""
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, d_out), jnp.float32),
        grid=(rows, d_out // bo),
        # Whole arrays: the kernels slice them themselves with power-of-two pl.ds loads.
        in_specs=[pl.no_block_spec] * n_inputs,
        out_specs=pl.BlockSpec((1, bo), lambda r, ob: (r, ob)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )


def _code_block(codes_ref, o0, bo: int, g0, bg: int, m: int, j: int) -> jax.Array:
    """int32 ``[bo, bg]`` codes of codebook ``j`` for outputs ``o0:o0+bo`` and groups ``g0:g0+bg``.

    A strided load straight from the ``[d_out, G * M]`` storage order.
    """
    return codes_ref[pl.ds(o0, bo), pl.ds(g0 * m + j, bg, stride=m)].astype(jnp.int32)


def _accumulate_and_store(step, n_steps: int, scales_ref, o_ref, o0, bo: int) -> None:
    """Sum ``step(s, acc)`` over the group blocks, scale by the ``bo`` rows' scales, store."""
    acc = lax.fori_loop(0, n_steps, step, jnp.zeros((bo,), jnp.float32))
    o_ref[0, :] = acc * scales_ref[pl.ds(o0, bo)].astype(jnp.float32)


def _kernel(x_ref, codes_ref, cb_ref, scales_ref, o_ref, *, bo, bg, m, k, ig, n_steps):
    # x_ref: [rows, G, ig]; codes_ref: [d_out, G * M]; cb_ref: [M * K * ig]; o_ref: [1, bo]
    r = pl.program_id(0)
    o0 = pl.program_id(1) * bo
    lane = lax.broadcasted_iota(jnp.int32, (1, 1, ig), 2)

    def step(s, acc):
        g0 = s * bg
        xv = x_ref[r, pl.ds(g0, bg), :].astype(jnp.float32)  # [bg, ig]
        w = jnp.zeros((bo, bg, ig), jnp.float32)
        for j in range(m):  # M is small and static
            c = _code_block(codes_ref, o0, bo, g0, bg, m, j)
            idx = (c[:, :, None] + jnp.int32(j * k)) * jnp.int32(ig) + lane
            w = w + cb_ref[idx].astype(jnp.float32)
        return acc + jnp.sum(w * xv[None, :, :], axis=(1, 2))

    _accumulate_and_store(step, n_steps, scales_ref, o_ref, o0, bo)


def aqlm_matmul_gpu(
    x: jax.Array,
    codes: jax.Array,
    codebooks: jax.Array,
    scales: jax.Array,
    *,
    block_out: int = 16,
    block_groups: int | None = None,
    num_warps: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """``[rows, d_in] × AQLM(d_out, d_in) -> [rows, d_out]`` float32 on the Triton backend.

    The defaults were the fastest of a sweep on an H200 at batch 1, 4096×4096
    (``benchmarks/results/gpu_kernels_h200.json``): small output blocks give enough
    programs to fill the chip; one codebook takes longer steps (128 groups: 12.6 µs for
    1×8 and 24.4 µs for 1×16, against 21.2 and 29.1 at 64), two codebooks shorter ones
    (64 groups: 23.8 µs for 2×8, against 38.1 at 128).

    Args:
        x: ``[rows, d_in]`` activations.
        codes: ``[d_out, n_in_groups, M]`` uint8/uint16/int32 codes.
        codebooks: ``[M, K, 1, ig]``.
        scales: ``[d_out, 1, 1, 1]``.
        block_out: output rows per program (a power of two dividing ``d_out`` is used).
        block_groups: input groups per loop step (a power of two dividing the group count);
            ``None``: 128 for one codebook, 64 for more.
        num_warps: Triton warps per program.
        interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
        ``[rows, d_out]`` float32.
    """
    eligible = gpu_eligible(codes.shape, codebooks.shape)
    d_out, n_in_groups, m, k, ig, rows = _shapes("aqlm_matmul_gpu", eligible, x, codes, codebooks)
    if block_groups is None:
        block_groups = 128 if m == 1 else 64
    bo = _pow2_divisor(d_out, block_out)
    bg = _pow2_divisor(n_in_groups, block_groups)
    kernel = functools.partial(
        _kernel, bo=bo, bg=bg, m=m, k=k, ig=ig, n_steps=n_in_groups // bg
    )
    return _call(kernel, "aqlm_matmul_gpu", rows, d_out, bo, 4, num_warps, interpret)(
        x.reshape(rows, n_in_groups, ig),
        codes.reshape(d_out, n_in_groups * m),
        codebooks.reshape(m * k * ig),
        scales.reshape(d_out),
    )


def lut_eligible(codes_shape: tuple[int, ...], codebooks_shape: tuple[int, ...]) -> bool:
    """Whether ``aqlm_matmul_gpu_lut`` supports these shapes: ``gpu_eligible`` and K <= 256.

    The table holds ``rows × groups × M × K`` products; past 2^8 codewords it outgrows
    the cache (1×16 at d_in 4096: 128 MiB per row) and gathering codewords wins.
    """
    return gpu_eligible(codes_shape, codebooks_shape) and codebooks_shape[1] <= 256


def _lut_kernel(lut_ref, codes_ref, scales_ref, o_ref, *, bo, bg, m, k, n_groups, n_steps):
    # lut_ref: [rows * G * M * K] products x_g · codeword; codes_ref: [d_out, G * M]; o_ref: [1, bo]
    r = pl.program_id(0)
    o0 = pl.program_id(1) * bo
    group = lax.broadcasted_iota(jnp.int32, (1, bg), 1)
    row_base = r * jnp.int32(n_groups * m * k)

    def step(s, acc):
        g0 = s * bg
        total = jnp.zeros((bo, bg), jnp.float32)
        for j in range(m):
            c = _code_block(codes_ref, o0, bo, g0, bg, m, j)
            idx = row_base + ((g0 + group) * jnp.int32(m) + jnp.int32(j)) * jnp.int32(k) + c
            total = total + lut_ref[idx]
        return acc + jnp.sum(total, axis=1)

    _accumulate_and_store(step, n_steps, scales_ref, o_ref, o0, bo)


def aqlm_matmul_gpu_lut(
    x: jax.Array,
    codes: jax.Array,
    codebooks: jax.Array,
    scales: jax.Array,
    *,
    block_out: int = 16,
    block_groups: int = 128,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """Lookup-table variant of ``aqlm_matmul_gpu`` for codebooks of at most 2^8 codewords.

    A small dense product first tabulates ``x_g · c`` for every input group ``g`` and
    codeword ``c`` (``rows × G × M × K`` floats: 1 MiB for one row of 2×8 at d_in 4096,
    resident in L2); the kernel then gathers ``M`` table entries per output and group
    instead of ``M × ig`` codeword elements, an ``ig``-fold cut in gathers and
    multiply-adds. Same arguments and result as ``aqlm_matmul_gpu``.
    """
    eligible = lut_eligible(codes.shape, codebooks.shape)
    d_out, n_in_groups, m, k, ig, rows = _shapes("aqlm_matmul_gpu_lut", eligible, x, codes, codebooks)
    # HIGHEST: the default float32 dot on GPU may round operands to tf32 (~3e-4 relative).
    lut = jnp.einsum(
        "rgi,mki->rgmk",
        x.reshape(rows, n_in_groups, ig).astype(jnp.float32),
        codebooks[:, :, 0, :].astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    bo = _pow2_divisor(d_out, block_out)
    bg = _pow2_divisor(n_in_groups, block_groups)
    kernel = functools.partial(
        _lut_kernel, bo=bo, bg=bg, m=m, k=k, n_groups=n_in_groups, n_steps=n_in_groups // bg
    )
    return _call(kernel, "aqlm_matmul_gpu_lut", rows, d_out, bo, 3, num_warps, interpret)(
        lut.reshape(rows * n_in_groups * m * k),
        codes.reshape(d_out, n_in_groups * m),
        scales.reshape(d_out),
    )
