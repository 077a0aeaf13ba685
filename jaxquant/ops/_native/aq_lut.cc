// CPU lookup-table product and row decoding of additive-quantized weights (jaxquant.ops.cpu_ffi).
#include <cstring>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include "jaxquant_ffi.h"

namespace {

using jaxquant::ParallelBlocks;

// T layout: [n_codes][R][K] floats, T[c][r][k] = x[r, group(c)] . codebook[m(c)][k].
void BuildTable(const float* x, const float* cb, float* T, int64_t R, int64_t d_in,
                int64_t M, int64_t K, int64_t ig, int64_t c0, int64_t c1) {
  // cbT[m][g][k]: codeword element g of every codeword k, contiguous in k so the
  // inner loop is a K-wide vector FMA.
  std::vector<float> cbT(M * ig * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t g = 0; g < ig; ++g) cbT[(m * ig + g) * K + k] = cb[(m * K + k) * ig + g];
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j = c / M, m = c % M;
    for (int64_t r = 0; r < R; ++r) {
      float* t = T + (c * R + r) * K;
      const float* xr = x + r * d_in + j * ig;
      for (int64_t k = 0; k < K; ++k) t[k] = 0.f;
      for (int64_t g = 0; g < ig; ++g) {
        const float xv = xr[g];
        const float* w = cbT.data() + (m * ig + g) * K;
        for (int64_t k = 0; k < K; ++k) t[k] += xv * w[k];
      }
    }
  }
}

// Adds, for output rows [o0, o1), code columns [c0, c1) and the RB rows of x starting at
// r0, the looked-up T[c][r][codes[o][c]] into part. With AVX-512, part holds two vectors
// of 16 partial sums per (row, x row), one per accumulator, reduced once at the end; without,
// one sum. Column blocks start at multiples of 32, so every partial sum adds the same
// columns in the same order whatever the blocking (which depends on the number of x rows):
// a row's result does not depend on how the batch was split across devices.
constexpr int kParts =
#if defined(__AVX512F__)
    32;
#else
    1;
#endif

template <int RB>
void GatherRows(const uint8_t* codes, const float* T, float* part, int64_t o0, int64_t o1,
                int64_t c0, int64_t c1, int64_t n_codes, int64_t R, int64_t K, int64_t r0) {
  const int64_t stride = R * K;  // floats between consecutive code columns of T
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* cr = codes + o * n_codes;
    float* p = part + ((o - o0) * R + r0) * kParts;
    int64_t c = c0;
#if defined(__AVX512F__)
    const __m512i lane = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(stride)));
    __m512 acc[RB], acc2[RB];
    for (int i = 0; i < RB; ++i) {
      acc[i] = _mm512_loadu_ps(p + i * kParts);
      acc2[i] = _mm512_loadu_ps(p + i * kParts + 16);
    }
    // Two independent accumulators per row hide the add latency behind the gathers.
    for (; c + 32 <= c1; c += 32) {
      const __m512i ia = _mm512_add_epi32(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + c))), lane);
      const __m512i ib = _mm512_add_epi32(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + c + 16))), lane);
      const float* ta = T + c * stride + r0 * K;
      const float* tb = ta + 16 * stride;
      for (int i = 0; i < RB; ++i) {
        acc[i] = _mm512_add_ps(acc[i], _mm512_i32gather_ps(ia, ta + i * K, 4));
        acc2[i] = _mm512_add_ps(acc2[i], _mm512_i32gather_ps(ib, tb + i * K, 4));
      }
    }
    for (; c + 16 <= c1; c += 16) {
      const __m512i ia = _mm512_add_epi32(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + c))), lane);
      const float* ta = T + c * stride + r0 * K;
      for (int i = 0; i < RB; ++i) acc[i] = _mm512_add_ps(acc[i], _mm512_i32gather_ps(ia, ta + i * K, 4));
    }
    for (int i = 0; i < RB; ++i) {
      _mm512_storeu_ps(p + i * kParts, acc[i]);
      _mm512_storeu_ps(p + i * kParts + 16, acc2[i]);
    }
#endif
    for (; c < c1; ++c) {
      const float* t = T + c * stride + r0 * K + cr[c];
      for (int i = 0; i < RB; ++i) p[i * kParts] += t[i * K];
    }
  }
}

struct Problem {
  const uint8_t* codes;
  const float* T;
  const float* scales;
  float* y;
  int64_t d_out, n_codes, R, K, col_block;
};

// One block of output rows, cache-blocked over code columns so that the slice of T
// being gathered from stays in L1 while every row of the block uses it (the block's
// codes stay in L2 across column blocks).
void RunBlock(const Problem& p, int64_t o0, int64_t o1) {
  std::vector<float> part((o1 - o0) * p.R * kParts, 0.f);
  for (int64_t c0 = 0; c0 < p.n_codes; c0 += p.col_block) {
    const int64_t c1 = std::min(p.n_codes, c0 + p.col_block);
    int64_t r = 0;
    for (; r + 4 <= p.R; r += 4) GatherRows<4>(p.codes, p.T, part.data(), o0, o1, c0, c1, p.n_codes, p.R, p.K, r);
    for (; r < p.R; ++r) GatherRows<1>(p.codes, p.T, part.data(), o0, o1, c0, c1, p.n_codes, p.R, p.K, r);
  }
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t r = 0; r < p.R; ++r) {
      const float* q = part.data() + ((o - o0) * p.R + r) * kParts;
      float s = 0.f;
      for (int l = 0; l < kParts; ++l) s += q[l];
      p.y[r * p.d_out + o] = s * p.scales[o];
    }
}

ffi::Error AqLutImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                     ffi::Buffer<ffi::F32> codebooks, ffi::Buffer<ffi::F32> scales,
                     ffi::ResultBuffer<ffi::F32> y, int64_t col_block_bytes, int64_t block_rows) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), bd = codebooks.dimensions();
  if (xd.size() != 2 || cd.size() != 3 || bd.size() != 4 || bd[2] != 1)
    return ffi::Error::InvalidArgument("aq_lut: bad ranks");
  const int64_t R = xd[0], d_in = xd[1], d_out = cd[0], n_groups = cd[1], M = cd[2];
  const int64_t K = bd[1], ig = bd[3];
  if (bd[0] != M || n_groups * ig != d_in || K > 256 || scales.element_count() != d_out)
    return ffi::Error::InvalidArgument("aq_lut: inconsistent shapes");
  const int64_t n_codes = n_groups * M;
  // The table lives in a per-thread buffer reused across calls: an XLA output buffer
  // would be freshly mapped (page faults) on every call.
  thread_local std::vector<float> table;
  if (static_cast<int64_t>(table.size()) < n_codes * R * K) table.resize(n_codes * R * K);
  float* T = table.data();
  BuildTable(x.typed_data(), codebooks.typed_data(), T, R, d_in, M, K, ig, 0, n_codes);
  if (d_out == 0 || R == 0) return ffi::Error::Success();

  // Column block: as many code columns (a multiple of 32, see kParts) as fit in
  // col_block_bytes of T.
  const int64_t col_block = std::max<int64_t>(32, col_block_bytes / (R * K * 4) / 32 * 32);
  const Problem p{codes.typed_data(), T, scales.typed_data(), y->typed_data(), d_out, n_codes, R, K, col_block};
  const int64_t rows = std::max<int64_t>(1, block_rows);
  ParallelBlocks(pool, (d_out + rows - 1) / rows,
                 [&](int64_t b) { RunBlock(p, b * rows, std::min(d_out, (b + 1) * rows)); });
  return ffi::Error::Success();
}

// Decode output groups [g0, g0 + n) of an additive-quantized weight to float32
// [n * og, d_in]: W[g*og + a, j*ig + b] = scale[g] * sum_m codebooks[m, codes[g, j, m], a, b].
// CW (codeword size og*ig) as a template constant lets the compiler keep a codeword in
// registers and vectorise; CW == 0 is the runtime-sized fallback.
template <typename C, int CW>
void DecodeTile(const C* __restrict codes, const float* __restrict cb, const float* __restrict scales,
                float* __restrict out, int64_t g0, int64_t n, int64_t n_in, int64_t M, int64_t K,
                int64_t og, int64_t ig) {
  const int64_t d_in = n_in * ig, cw = CW > 0 ? CW : og * ig;
  float tmp[CW > 0 ? CW : 1];
  std::vector<float> dyn(CW > 0 ? 0 : cw);
  float* __restrict t = CW > 0 ? tmp : dyn.data();
  for (int64_t g = 0; g < n; ++g) {
    const C* cg = codes + (g0 + g) * n_in * M;
    const float s = scales[g0 + g];
    for (int64_t j = 0; j < n_in; ++j) {
      const float* w0 = cb + static_cast<int64_t>(cg[j * M]) * cw;
      for (int64_t e = 0; e < cw; ++e) t[e] = w0[e];
      for (int64_t m = 1; m < M; ++m) {
        const float* wm = cb + (m * K + static_cast<int64_t>(cg[j * M + m])) * cw;
        for (int64_t e = 0; e < cw; ++e) t[e] += wm[e];
      }
      for (int64_t a = 0; a < og; ++a) {
        float* o = out + (g * og + a) * d_in + j * ig;
        for (int64_t b = 0; b < ig; ++b) o[b] = t[a * ig + b] * s;
      }
    }
  }
}

#if defined(__AVX__)
// ig % 8 == 0: each 8-float slice of a codeword is one AVX register (7x faster than the
// scalar loop, which the compiler does not keep in registers).
template <typename C>
void DecodeTile8(const C* __restrict codes, const float* __restrict cb, const float* __restrict scales,
                 float* __restrict out, int64_t g0, int64_t n, int64_t n_in, int64_t M, int64_t K,
                 int64_t og, int64_t ig) {
  const int64_t d_in = n_in * ig, cw = og * ig;
  for (int64_t g = 0; g < n; ++g) {
    const C* cg = codes + (g0 + g) * n_in * M;
    const __m256 s = _mm256_set1_ps(scales[g0 + g]);
    for (int64_t j = 0; j < n_in; ++j)
      for (int64_t e = 0; e < cw; e += 8) {
        __m256 t = _mm256_loadu_ps(cb + static_cast<int64_t>(cg[j * M]) * cw + e);
        for (int64_t m = 1; m < M; ++m)
          t = _mm256_add_ps(t, _mm256_loadu_ps(cb + (m * K + static_cast<int64_t>(cg[j * M + m])) * cw + e));
        _mm256_storeu_ps(out + (g * og + e / ig) * d_in + j * ig + e % ig, _mm256_mul_ps(t, s));
      }
  }
}
#endif

template <typename C>
void Decode(const C* codes, const float* cb, const float* scales, float* out, int64_t g0, int64_t n,
            int64_t n_in, int64_t M, int64_t K, int64_t og, int64_t ig) {
#if defined(__AVX__)
  if (ig % 8 == 0) return DecodeTile8<C>(codes, cb, scales, out, g0, n, n_in, M, K, og, ig);
#endif
  return DecodeTile<C, 0>(codes, cb, scales, out, g0, n, n_in, M, K, og, ig);
}

ffi::Error AqDecodeImpl(ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> codebooks,
                        ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::S32> start,
                        ffi::ResultBuffer<ffi::F32> out) {
  const auto cd = codes.dimensions(), bd = codebooks.dimensions(), od = out->dimensions();
  if (cd.size() != 3 || bd.size() != 4 || od.size() != 2) return ffi::Error::InvalidArgument("aq_decode: bad ranks");
  const int64_t n_g = cd[0], n_in = cd[1], M = cd[2], K = bd[1], og = bd[2], ig = bd[3];
  const int64_t n = od[0] / og, g0 = start.typed_data()[0];
  if (bd[0] != M || od[1] != n_in * ig || od[0] % og != 0 || g0 < 0 || g0 + n > n_g)
    return ffi::Error::InvalidArgument("aq_decode: inconsistent shapes or start out of range");
  if (codes.element_type() == ffi::DataType::U8)
    Decode(codes.typed_data<uint8_t>(), codebooks.typed_data(), scales.typed_data(), out->typed_data(), g0, n, n_in, M, K, og, ig);
  else if (codes.element_type() == ffi::DataType::U16)
    Decode(codes.typed_data<uint16_t>(), codebooks.typed_data(), scales.typed_data(), out->typed_data(), g0, n, n_in, M, K, og, ig);
  else
    return ffi::Error::InvalidArgument("aq_decode: codes must be uint8 or uint16");
  return ffi::Error::Success();
}

}  // namespace

namespace bind = jaxquant::bind;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqLutF32, AqLutImpl, bind::Pooled().Arg<bind::F32>().Arg<bind::U8>()
                              .Arg<bind::F32>().Arg<bind::F32>().Ret<bind::F32>()
                              .Attr<int64_t>("col_block_bytes").Attr<int64_t>("block_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqDecodeF32, AqDecodeImpl, bind::Plain().Arg<bind::Any>().Arg<bind::F32>()
                              .Arg<bind::F32>().Arg<bind::S32>().Ret<bind::F32>());
