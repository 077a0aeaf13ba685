// CUDA lookup-table products and warp decoding of additive-quantized weights (jaxquant.ops.cuda_ffi).
#include <cstdint>
#include <string>
#include <type_traits>
#include <cuda_runtime.h>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;

// One call's operands as the kernels take them: device pointers and int sizes. x is
// [R, d_in] with R in 1..4, codes [d_out, G, M], codebooks [M, K, 1, ig], scales [d_out],
// out [R, d_out].
template <typename CodeT>
struct AqCall {
  cudaStream_t stream;
  const float* x;
  const CodeT* codes;
  const float* cb;
  const float* scales;
  float* out;
  int R, d_in, d_out, G, M, K, ig;
};

// Reads the operands every kernel here binds into c, after checking their shapes.
template <ffi::DataType CodeDT, typename CodeT>
ffi::Error ReadCall(const char* kernel, cudaStream_t stream, ffi::Buffer<ffi::F32>& x, ffi::Buffer<CodeDT>& codes,
                    ffi::Buffer<ffi::F32>& codebooks, ffi::Buffer<ffi::F32>& scales, ffi::ResultBuffer<ffi::F32>& out,
                    AqCall<CodeT>& c) {
  const ffi::Span<const int64_t> xd = x.dimensions(), cd = codes.dimensions(), bd = codebooks.dimensions();
  if (xd.size() != 2 || cd.size() != 3 || bd.size() != 4)
    return ffi::Error::InvalidArgument(std::string(kernel) + ": x, codes, codebooks must have ranks 2, 3, 4");
  const int64_t R = xd[0], d_in = xd[1], d_out = cd[0], G = cd[1], M = cd[2], K = bd[1], ig = bd[3];
  if (bd[0] != M || bd[2] != 1 || G * ig != d_in || (int64_t)scales.element_count() != d_out)
    return ffi::Error::InvalidArgument(std::string(kernel) + ": inconsistent shapes");
  if (R < 1 || R > 4) return ffi::Error::InvalidArgument(std::string(kernel) + ": x must have 1 to 4 rows");
  c = AqCall<CodeT>{stream, x.typed_data(), reinterpret_cast<const CodeT*>(codes.untyped_data()),
                    codebooks.typed_data(), scales.typed_data(), out->typed_data(),
                    (int)R, (int)d_in, (int)d_out, (int)G, (int)M, (int)K, (int)ig};
  return ffi::Error::Success();
}

// ReadCall plus what both table kernels need: at most 256 codewords per codebook (the
// table is indexed by a uint8 code) and a group chunk from 1 to the group count.
ffi::Error ReadTableCall(const char* kernel, cudaStream_t stream, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::U8>& codes,
                         ffi::Buffer<ffi::F32>& codebooks, ffi::Buffer<ffi::F32>& scales,
                         ffi::ResultBuffer<ffi::F32>& out, int64_t group_chunk, AqCall<uint8_t>& c) {
  if (ffi::Error err = ReadCall(kernel, stream, x, codes, codebooks, scales, out, c); err.failure()) return err;
  if (c.K > 256) return ffi::Error::InvalidArgument(std::string(kernel) + ": more than 256 codewords per codebook");
  if (group_chunk < 1 || group_chunk > c.G)
    return ffi::Error::InvalidArgument(std::string(kernel) + ": group_chunk must be in 1..group count");
  return ffi::Error::Success();
}

// Calls fn(std::integral_constant<int, R>) with the row count fixed at compile time.
template <typename Fn>
cudaError_t WithRows(int R, const Fn& fn) {
  switch (R) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    default: return fn(std::integral_constant<int, 4>());
  }
}

// The table kernels add into out with atomics: zero it, then launch.
template <typename Fn>
cudaError_t ZeroThenLaunch(const AqCall<uint8_t>& c, const Fn& launch) {
  const cudaError_t e = cudaMemsetAsync(c.out, 0, sizeof(float) * c.R * c.d_out, c.stream);
  return e == cudaSuccess ? launch() : e;
}

ffi::Error Finish(const char* kernel, cudaError_t e) {
  if (e != cudaSuccess) return ffi::Error::Internal(std::string(kernel) + ": " + cudaGetErrorString(e));
  return ffi::Error::Success();
}

// The four operands and the result every kernel here binds; each handler adds its attributes.
template <ffi::DataType CodeDT>
auto AqBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<CodeDT>>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // the binding's type depends on CodeDT from here on
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

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
cudaError_t Launch(const AqCall<uint8_t>& c, int GC, int out_per_block) {
  const size_t smem = sizeof(float) * ((size_t)R * GC * c.M * c.K + (size_t)R * GC * c.ig);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(AqLutGemv<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((c.G + GC - 1) / GC, (c.d_out + out_per_block - 1) / out_per_block);
  AqLutGemv<R><<<grid, kThreads, smem, c.stream>>>(c.x, c.codes, c.cb, c.scales, c.out, c.d_in, c.d_out, c.G, c.M,
                                                   c.K, c.ig, GC, out_per_block);
  return cudaGetLastError();
}

ffi::Error AqLutCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                         ffi::Buffer<ffi::F32> codebooks, ffi::Buffer<ffi::F32> scales,
                         ffi::ResultBuffer<ffi::F32> out, int64_t group_chunk, int64_t out_per_block) {
  const char* kernel = "aq_lut_cuda";
  AqCall<uint8_t> c;
  if (ffi::Error err = ReadTableCall(kernel, stream, x, codes, codebooks, scales, out, group_chunk, c); err.failure())
    return err;
  if (out_per_block < 1) return ffi::Error::InvalidArgument("aq_lut_cuda: out_per_block must be >= 1");
  return Finish(kernel, ZeroThenLaunch(c, [&] {
    return WithRows(c.R, [&](auto rows) { return Launch<decltype(rows)::value>(c, group_chunk, out_per_block); });
  }));
}

// ---- The table kernel with its global loads issued first ------------------------------
// Same table, split and atomics as AqLutGemv, but every global load a thread needs (its
// rows' codes and scales, its codewords) is issued before the x slice is staged, so their
// latencies overlap each other and the table build instead of following one another.

template <int R>
__device__ __forceinline__ void TabulateCodeword8(float4 w0, float4 w1, int mk, const float* xs, float* lut,
                                                  int gc, int GC, int MK) {
  for (int r = 0; r < R; ++r)
    for (int gl = 0; gl < gc; ++gl) {
      const float4* xv = reinterpret_cast<const float4*>(xs + (r * GC + gl) * 8);
      const float4 a = xv[0], b = xv[1];  // the same address across the warp: a broadcast
      float s = w0.x * a.x + w0.y * a.y + w0.z * a.z + w0.w * a.w;
      s += w1.x * b.x + w1.y * b.y + w1.z * b.z + w1.w * b.w;
      lut[(r * GC + gl) * MK + mk] = s;
    }
}

constexpr int kMaxCodeVecs = 4;  // up to 64 codes of one row per chunk held in registers

template <int R, int RPT>
__global__ void __launch_bounds__(512)
AqLutGemvPrefetch(const float* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ cb,
                  const float* __restrict__ scales, float* __restrict__ out, int d_in, int d_out, int G, int M,
                  int K, int ig, int GC) {
  extern __shared__ float smem[];
  float* lut = smem;                  // [R][GC][M][K]
  float* xs = smem + R * GC * M * K;  // [R][GC * ig]
  const int tid = threadIdx.x, nthr = blockDim.x, MK = M * K;
  const int g0 = blockIdx.x * GC;
  const int gc = min(GC, G - g0);
  const int n_codes = gc * M;
  const int64_t o_base = (int64_t)blockIdx.y * RPT * nthr + tid;
  // Block-uniform: the chunk's codes of every row are whole, aligned 16-byte vectors.
  const bool vec = n_codes % 16 == 0 && n_codes <= 16 * kMaxCodeVecs && (G * M) % 16 == 0 &&
                   (g0 * M) % 16 == 0 && (reinterpret_cast<uintptr_t>(codes) & 15) == 0;

  uint4 cv[RPT][kMaxCodeVecs];
  float s[RPT];
#pragma unroll
  for (int j = 0; j < RPT; ++j) {
    const int64_t o = o_base + (int64_t)j * nthr;
    s[j] = o < d_out ? __ldg(scales + o) : 0.f;
#pragma unroll
    for (int v = 0; v < kMaxCodeVecs; ++v) {
      cv[j][v] = make_uint4(0, 0, 0, 0);
      if (vec && o < d_out && v * 16 < n_codes)
        cv[j][v] = __ldg(reinterpret_cast<const uint4*>(codes + (o * G + g0) * M) + v);
    }
  }
  float4 w[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int mk = tid + i * nthr;
    w[i][0] = w[i][1] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ig == 8 && mk < MK) {
      w[i][0] = __ldg(reinterpret_cast<const float4*>(cb + (int64_t)mk * 8));
      w[i][1] = __ldg(reinterpret_cast<const float4*>(cb + (int64_t)mk * 8) + 1);
    }
  }

  for (int i = tid; i < R * gc * ig; i += nthr) {
    const int r = i / (gc * ig), e = i % (gc * ig);
    xs[r * GC * ig + e] = x[(int64_t)r * d_in + (int64_t)g0 * ig + e];
  }
  __syncthreads();

  if (ig == 8) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (tid + i * nthr < MK) TabulateCodeword8<R>(w[i][0], w[i][1], tid + i * nthr, xs, lut, gc, GC, MK);
    for (int mk = tid + 2 * nthr; mk < MK; mk += nthr) {
      const float4* p = reinterpret_cast<const float4*>(cb + (int64_t)mk * 8);
      TabulateCodeword8<R>(__ldg(p), __ldg(p + 1), mk, xs, lut, gc, GC, MK);
    }
  } else {
    for (int mk = tid; mk < MK; mk += nthr)
      for (int r = 0; r < R; ++r)
        for (int gl = 0; gl < gc; ++gl) {
          const float* xv = xs + r * GC * ig + gl * ig;
          float acc = 0.f;
          for (int i = 0; i < ig; ++i) acc += __ldg(cb + (int64_t)mk * ig + i) * xv[i];
          lut[(r * GC + gl) * MK + mk] = acc;
        }
  }
  __syncthreads();

#pragma unroll
  for (int j = 0; j < RPT; ++j) {
    const int64_t o = o_base + (int64_t)j * nthr;
    if (o >= d_out) continue;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    if (vec) {
#pragma unroll
      for (int v = 0; v < kMaxCodeVecs; ++v) {
        if (v * 16 >= n_codes) break;
        const uint32_t words[4] = {cv[j][v].x, cv[j][v].y, cv[j][v].z, cv[j][v].w};
#pragma unroll
        for (int q = 0; q < 16; ++q) {
          const int code = (words[q >> 2] >> (8 * (q & 3))) & 0xff;
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] += lut[(r * GC * M + v * 16 + q) * K + code];
        }
      }
    } else {
      const uint8_t* c = codes + (o * G + g0) * M;
      for (int p = 0; p < n_codes; ++p) {
        const int code = __ldg(c + p);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += lut[(r * GC * M + p) * K + code];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) atomicAdd(out + (int64_t)r * d_out + o, acc[r] * s[j]);
  }
}

template <int R, int RPT>
cudaError_t LaunchPrefetch(const AqCall<uint8_t>& c, int GC, int threads) {
  const size_t smem = sizeof(float) * ((size_t)R * GC * c.M * c.K + (size_t)R * GC * c.ig);
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(AqLutGemvPrefetch<R, RPT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const int64_t rows_per_block = (int64_t)RPT * threads;
  const dim3 grid((c.G + GC - 1) / GC, (unsigned)((c.d_out + rows_per_block - 1) / rows_per_block));
  AqLutGemvPrefetch<R, RPT><<<grid, threads, smem, c.stream>>>(c.x, c.codes, c.cb, c.scales, c.out, c.d_in, c.d_out,
                                                                c.G, c.M, c.K, c.ig, GC);
  return cudaGetLastError();
}

template <int R>
cudaError_t LaunchPrefetchRpt(int rpt, const AqCall<uint8_t>& c, int GC, int threads) {
  switch (rpt) {
    case 1: return LaunchPrefetch<R, 1>(c, GC, threads);
    case 2: return LaunchPrefetch<R, 2>(c, GC, threads);
    default: return LaunchPrefetch<R, 4>(c, GC, threads);
  }
}

ffi::Error AqLutPrefetchCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                                 ffi::Buffer<ffi::F32> codebooks, ffi::Buffer<ffi::F32> scales,
                                 ffi::ResultBuffer<ffi::F32> out, int64_t group_chunk, int64_t threads,
                                 int64_t rows_per_thread) {
  const char* kernel = "aq_lut_prefetch_cuda";
  AqCall<uint8_t> c;
  if (ffi::Error err = ReadTableCall(kernel, stream, x, codes, codebooks, scales, out, group_chunk, c); err.failure())
    return err;
  if (threads < 32 || threads > 512 || threads % 32 != 0 ||
      (rows_per_thread != 1 && rows_per_thread != 2 && rows_per_thread != 4))
    return ffi::Error::InvalidArgument(
        "aq_lut_prefetch_cuda: threads must be a multiple of 32 in 32..512, rows_per_thread 1, 2 or 4");
  return Finish(kernel, ZeroThenLaunch(c, [&] {
    return WithRows(c.R, [&](auto rows) {
      return LaunchPrefetchRpt<decltype(rows)::value>((int)rows_per_thread, c, group_chunk, threads);
    });
  }));
}

// ---- Decode and dot, one warp per output row ------------------------------------------
// No table, no split over groups, no atomics, no memset: lane l of the warp for row o
// takes groups l, l + 32, ..., gathers each group's M codewords (two 16-byte loads each)
// from the codebooks in global memory (the L1/L2 caches hold them: 16 KiB for 2x8, 2 MiB
// for 1x16), sums them, dots them with x and the warp reduces by shuffles. UNROLL groups
// per lane load their codes, then their codewords, before any arithmetic, to keep many
// independent loads in flight. For 1x16, whose 65536 codewords fit no table in shared memory.

template <int R, int M, int UNROLL, typename CodeT>
__global__ void __launch_bounds__(256)
AqDecodeWarpGemv(const float* __restrict__ x, const CodeT* __restrict__ codes, const float* __restrict__ cb,
                 const float* __restrict__ scales, float* __restrict__ out, int d_in, int d_out, int G, int K) {
  const int lane = threadIdx.x & 31;
  const int64_t o = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= d_out) return;  // whole warps leave together; nothing below synchronises the block
  const CodeT* c = codes + o * G * M;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int base = lane; base < G; base += 32 * UNROLL) {
    int code[UNROLL][M];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int g = base + 32 * u;
#pragma unroll
      for (int m = 0; m < M; ++m) code[u][m] = g < G ? (int)__ldg(c + (int64_t)g * M + m) : 0;
    }
    float4 wv[UNROLL][M][2];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4* p = reinterpret_cast<const float4*>(cb + ((int64_t)m * K + code[u][m]) * 8);
        wv[u][m][0] = __ldg(p);
        wv[u][m][1] = __ldg(p + 1);
      }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int g = base + 32 * u;
      if (g >= G) break;
      float4 a = wv[u][0][0], b = wv[u][0][1];
#pragma unroll
      for (int m = 1; m < M; ++m) {
        a.x += wv[u][m][0].x; a.y += wv[u][m][0].y; a.z += wv[u][m][0].z; a.w += wv[u][m][0].w;
        b.x += wv[u][m][1].x; b.y += wv[u][m][1].y; b.z += wv[u][m][1].z; b.w += wv[u][m][1].w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4* xv = reinterpret_cast<const float4*>(x + (int64_t)r * d_in + (int64_t)g * 8);
        const float4 xa = __ldg(xv), xb = __ldg(xv + 1);
        acc[r] += a.x * xa.x + a.y * xa.y + a.z * xa.z + a.w * xa.w + b.x * xb.x + b.y * xb.y + b.z * xb.z +
                  b.w * xb.w;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  if (lane == 0) {
    const float s = __ldg(scales + o);
#pragma unroll
    for (int r = 0; r < R; ++r) out[(int64_t)r * d_out + o] = acc[r] * s;
  }
}

template <int R, int M, typename CodeT>
cudaError_t LaunchDecodeUnroll(int unroll, const AqCall<CodeT>& c, int warps) {
  const dim3 grid((unsigned)((c.d_out + warps - 1) / warps));
  if (unroll == 8)
    AqDecodeWarpGemv<R, M, 8, CodeT><<<grid, warps * 32, 0, c.stream>>>(c.x, c.codes, c.cb, c.scales, c.out, c.d_in,
                                                                          c.d_out, c.G, c.K);
  else
    AqDecodeWarpGemv<R, M, 4, CodeT><<<grid, warps * 32, 0, c.stream>>>(c.x, c.codes, c.cb, c.scales, c.out, c.d_in,
                                                                          c.d_out, c.G, c.K);
  return cudaGetLastError();
}

template <ffi::DataType CodeDT, typename CodeT>
ffi::Error AqDecodeWarpCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<CodeDT> codes,
                                ffi::Buffer<ffi::F32> codebooks, ffi::Buffer<ffi::F32> scales,
                                ffi::ResultBuffer<ffi::F32> out, int64_t warps_per_block, int64_t unroll) {
  const char* kernel = "aq_decode_warp_cuda";
  AqCall<CodeT> c;
  if (ffi::Error err = ReadCall(kernel, stream, x, codes, codebooks, scales, out, c); err.failure()) return err;
  if (c.ig != 8) return ffi::Error::InvalidArgument("aq_decode_warp_cuda: in_group_size must be 8");
  if ((c.M != 1 && c.M != 2) || warps_per_block < 1 || warps_per_block > 8 || (unroll != 4 && unroll != 8))
    return ffi::Error::InvalidArgument(
        "aq_decode_warp_cuda: 1 or 2 codebooks, warps_per_block 1..8 and unroll 4 or 8 are supported");
  const int warps = (int)warps_per_block, u = (int)unroll;
  return Finish(kernel, WithRows(c.R, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    return c.M == 2 ? LaunchDecodeUnroll<R, 2, CodeT>(u, c, warps) : LaunchDecodeUnroll<R, 1, CodeT>(u, c, warps);
  }));
}

ffi::Error AqDecodeWarpCudaU8(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                              ffi::Buffer<ffi::F32> codebooks, ffi::Buffer<ffi::F32> scales,
                              ffi::ResultBuffer<ffi::F32> out, int64_t warps_per_block, int64_t unroll) {
  return AqDecodeWarpCudaImpl<ffi::U8, uint8_t>(stream, x, codes, codebooks, scales, out, warps_per_block, unroll);
}

ffi::Error AqDecodeWarpCudaU16(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U16> codes,
                               ffi::Buffer<ffi::F32> codebooks, ffi::Buffer<ffi::F32> scales,
                               ffi::ResultBuffer<ffi::F32> out, int64_t warps_per_block, int64_t unroll) {
  return AqDecodeWarpCudaImpl<ffi::U16, uint16_t>(stream, x, codes, codebooks, scales, out, warps_per_block, unroll);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqLutCudaF32, AqLutCudaImpl,
                              AqBinding<ffi::U8>().Attr<int64_t>("group_chunk").Attr<int64_t>("out_per_block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqLutPrefetchCudaF32, AqLutPrefetchCudaImpl,
                              AqBinding<ffi::U8>()
                                  .Attr<int64_t>("group_chunk")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("rows_per_thread"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqDecodeWarpCudaU8, AqDecodeWarpCudaU8,
                              AqBinding<ffi::U8>().Attr<int64_t>("warps_per_block").Attr<int64_t>("unroll"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqDecodeWarpCudaU16, AqDecodeWarpCudaU16,
                              AqBinding<ffi::U16>().Attr<int64_t>("warps_per_block").Attr<int64_t>("unroll"));
