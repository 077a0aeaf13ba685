"""A CUDA lookup-table GEMV for additive quantization, as an XLA FFI custom call.

Why not Pallas alone. On an H200 the Pallas Triton kernels (``pallas_kernels``) gather
each codeword, or each lookup-table entry, from global memory through L1, and a random
gather costs about one L1 wavefront per access whatever its size: at batch 1 the best of
them took 23.6 µs for a 4096×4096 2×8 layer against 11.1 µs for dense bfloat16
(``benchmarks/results/gpu_kernels_h200_b1_first_defaults.json``). Triton (through
Pallas) cannot gather from shared memory, where 32 banks serve a warp's random 4-byte
reads in a few cycles; this kernel does. Measured there: 10.6 µs for that layer (1.02×
dense bfloat16), 7.4 µs for 1×8 (1.46×); ``benchmarks/results/gpu_kernels_h200.json``.

Design. The grid is (chunks of ``GC`` input groups) × (blocks of output rows). Each block
(1) stages its ``x`` slice in shared memory, (2) tabulates ``T[r, g, m, k] = x[r, g] ·
codebook[m, k]`` for its groups, one codeword per thread, into shared memory
(``rows × GC × M × K`` floats, 32 or 64 KiB by default), (3) for each of its output
rows reads the ``GC × M`` codes once (16-byte loads where aligned) and sums ``M`` table entries per
group, then (4) adds ``scale · partial sum`` into the output with ``atomicAdd``; the
output is zeroed first in the same stream. Only the codes stream from HBM. The atomic
float adds land in any order, so results can differ in the last bits from run to run
(relative error against float64 stayed under 1e-6 on the device); callers that need
bit-for-bit repeatable output can force ``impl="pallas_gpu"``.

How it is built: ``nvcc`` at first use into the user cache directory, for the GPU's
compute capability (``jaxquant/native_build.py``). Without ``nvcc`` or a GPU,
``available()`` is False and ``lut_matmul_cuda`` raises ``NotImplementedError``, so the
dispatcher falls through to Pallas. ``JAXQUANT_NO_FFI=1`` disables it.

Eligibility: GPU backend, ``AdditiveQuantized`` with ``out_group_size == 1``, uint8
codes (``2**B ≤ 256``), 1 to 4 rows of ``x``.
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

_SOURCE = r"""
#include <cstdint>
#include <string>
#include <cuda_runtime.h>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;

template <int R>
__global__ void __launch_bounds__(kThreads)
AqLutGemv(const float* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ cb,
          const float* __restrict__ scales, float* __restrict__ out, int d_in, int d_out, int G, int M,
          int K, int ig, int GC, int out_per_block) {
  extern __shared__ float smem[];
  float* lut = smem;                       // [R][GC][M][K]
  float* xs = smem + R * GC * M * K;       // [R][GC * ig]
  const int g0 = blockIdx.x * GC;
  const int gc = min(GC, G - g0);
  const int o0 = blockIdx.y * out_per_block;
  const int o1 = min(o0 + out_per_block, d_out);

  for (int i = threadIdx.x; i < R * gc * ig; i += kThreads) {
    const int r = i / (gc * ig), e = i % (gc * ig);
    xs[r * GC * ig + e] = x[(int64_t)r * d_in + (int64_t)g0 * ig + e];
  }
  __syncthreads();

  // One codeword (m, k) per thread, held in registers while it is dotted with every
  // group's x slice; the table row it writes is contiguous across threads (no bank conflicts).
  for (int mk = threadIdx.x; mk < M * K; mk += kThreads) {
    const float* w = cb + (int64_t)mk * ig;
    if (ig == 8) {
      const float4 w0 = __ldg(reinterpret_cast<const float4*>(w));
      const float4 w1 = __ldg(reinterpret_cast<const float4*>(w) + 1);
      for (int r = 0; r < R; ++r)
        for (int gl = 0; gl < gc; ++gl) {
          const float* xv = xs + r * GC * 8 + gl * 8;
          float s = w0.x * xv[0] + w0.y * xv[1] + w0.z * xv[2] + w0.w * xv[3];
          s += w1.x * xv[4] + w1.y * xv[5] + w1.z * xv[6] + w1.w * xv[7];
          lut[(r * GC + gl) * M * K + mk] = s;
        }
    } else {
      for (int r = 0; r < R; ++r)
        for (int gl = 0; gl < gc; ++gl) {
          const float* xv = xs + r * GC * ig + gl * ig;
          float s = 0.f;
          for (int i = 0; i < ig; ++i) s += __ldg(w + i) * xv[i];
          lut[(r * GC + gl) * M * K + mk] = s;
        }
    }
  }
  __syncthreads();

  const int n_codes = gc * M;  // codes of one output row in this chunk, contiguous in memory
  for (int o = o0 + threadIdx.x; o < o1; o += kThreads) {
    const uint8_t* c = codes + ((int64_t)o * G + g0) * M;
    float acc[R];
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    int p = 0;
    if ((reinterpret_cast<uintptr_t>(c) & 15) == 0) {
      for (; p + 16 <= n_codes; p += 16) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(c + p));
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 16; ++q) {
          const int code = (words[q >> 2] >> (8 * (q & 3))) & 0xff;
          for (int r = 0; r < R; ++r) acc[r] += lut[(r * GC * M + p + q) * K + code];
        }
      }
    }
    for (; p < n_codes; ++p) {
      const int code = __ldg(c + p);
      for (int r = 0; r < R; ++r) acc[r] += lut[(r * GC * M + p) * K + code];
    }
    const float s = __ldg(scales + o);
    for (int r = 0; r < R; ++r) atomicAdd(out + (int64_t)r * d_out + o, acc[r] * s);
  }
}

template <int R>
cudaError_t Launch(cudaStream_t stream, const float* x, const uint8_t* codes, const float* cb,
                   const float* scales, float* out, int d_in, int d_out, int G, int M, int K, int ig,
                   int GC, int out_per_block) {
  const size_t smem = sizeof(float) * ((size_t)R * GC * M * K + (size_t)R * GC * ig);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(AqLutGemv<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((G + GC - 1) / GC, (d_out + out_per_block - 1) / out_per_block);
  AqLutGemv<R><<<grid, kThreads, smem, stream>>>(x, codes, cb, scales, out, d_in, d_out, G, M, K, ig, GC,
                                                 out_per_block);
  return cudaGetLastError();
}

ffi::Error AqLutCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                         ffi::Buffer<ffi::F32> codebooks, ffi::Buffer<ffi::F32> scales,
                         ffi::ResultBuffer<ffi::F32> out, int64_t group_chunk, int64_t out_per_block) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), bd = codebooks.dimensions();
  if (xd.size() != 2 || cd.size() != 3 || bd.size() != 4)
    return ffi::Error::InvalidArgument("aq_lut_cuda: x, codes, codebooks must have ranks 2, 3, 4");
  const int64_t R = xd[0], d_in = xd[1], d_out = cd[0], G = cd[1], M = cd[2], K = bd[1], ig = bd[3];
  if (bd[0] != M || bd[2] != 1 || G * ig != d_in || K > 256 || scales.element_count() != d_out)
    return ffi::Error::InvalidArgument("aq_lut_cuda: inconsistent shapes");
  if (R < 1 || R > 4 || group_chunk < 1 || out_per_block < 1)
    return ffi::Error::InvalidArgument("aq_lut_cuda: rows must be 1..4, group_chunk and out_per_block >= 1");
  cudaError_t e = cudaMemsetAsync(out->typed_data(), 0, sizeof(float) * R * d_out, stream);
  if (e == cudaSuccess) {
    const float *xp = x.typed_data(), *cbp = codebooks.typed_data(), *sp = scales.typed_data();
    const uint8_t* cp = codes.typed_data();
    float* op = out->typed_data();
    const int a = d_in, b = d_out, g = G, m = M, k = K, i = ig, gc = group_chunk, ob = out_per_block;
    switch (R) {
      case 1: e = Launch<1>(stream, xp, cp, cbp, sp, op, a, b, g, m, k, i, gc, ob); break;
      case 2: e = Launch<2>(stream, xp, cp, cbp, sp, op, a, b, g, m, k, i, gc, ob); break;
      case 3: e = Launch<3>(stream, xp, cp, cbp, sp, op, a, b, g, m, k, i, gc, ob); break;
      default: e = Launch<4>(stream, xp, cp, cbp, sp, op, a, b, g, m, k, i, gc, ob); break;
    }
  }
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("aq_lut_cuda: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqLutCudaF32, AqLutCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group_chunk")
                                  .Attr<int64_t>("out_per_block"));
"""

LIBRARY = NativeLibrary("aq_lut_cuda", _SOURCE, {TARGET_NAME: "JaxquantAqLutCudaF32"}, platform="CUDA")


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


def group_chunk(rows: int, num_codebooks: int, codebook_size: int, lut_floats: int = LUT_FLOATS) -> int:
    """Input groups per block: the largest power of two whose table fits ``lut_floats``."""
    per_group = rows * num_codebooks * codebook_size
    chunk = 1
    while chunk * 2 * per_group <= lut_floats:
        chunk *= 2
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
    if jax.default_backend() != "gpu":
        raise NotImplementedError("cuda_ffi: backend is not gpu")
    if not cuda_eligible(w, x.shape[0] if x.ndim == 2 else 0):
        raise NotImplementedError(
            f"cuda_ffi: needs AdditiveQuantized with uint8 codes, og == 1 and 1..{MAX_ROWS} rows, "
            f"got {w!r} with x of shape {x.shape}"
        )
    if x.shape[1] != w.d_in:
        raise ValueError(f"x must be [rows, d_in={w.d_in}], got shape {x.shape}")
    if not available():
        raise NotImplementedError(f"cuda_ffi: kernel unavailable ({unavailable_reason()})")
    rows, d_out = x.shape[0], w.codes.shape[0]
    m, k = w.codebooks.shape[0], w.codebooks.shape[1]
    if lut_floats is None:
        lut_floats = LUT_FLOATS_ONE_ROW if rows == 1 else LUT_FLOATS
    return jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((rows, d_out), jnp.float32))(
        x.astype(jnp.float32),
        w.codes,
        w.codebooks.astype(jnp.float32),
        w.scales.astype(jnp.float32).reshape(d_out),
        group_chunk=np.int64(group_chunk(rows, m, k, lut_floats)),
        out_per_block=np.int64(out_per_block),
    )


__all__ = ["LUT_FLOATS", "LUT_FLOATS_ONE_ROW", "MAX_ROWS", "OUT_PER_BLOCK", "TARGET_NAME", "available", "cuda_eligible", "group_chunk", "lut_matmul_cuda", "unavailable_reason"]
