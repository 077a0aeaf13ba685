// CPU product of a few activation rows with an SpQR weight (jaxquant.methods.spqr.kernel).
//
// With xp the activations in the codes' column order, each row's group g contributes
//   s[o,g] * (sum_k codes[o,k] * xp[k] - z[o,g] * sum_k xp[k])   (k over the group's columns)
// where s and z are decoded from their 3-bit codes and the second-level statistics of the
// row's block of stat_group rows; the row's outliers then add value * xp[column]. The
// weight is read as its uint8 codes (a byte per weight against four for float32).
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "jaxquant_ffi.h"

namespace {

using jaxquant::ParallelBlocks;

constexpr float kMinScale = 1e-9f;  // decoded scales are kept above it (spqr.array.MIN_SCALE)

#if defined(__AVX2__) && defined(__FMA__)
// sum_k codes[k] * x[k] over n codes, as 8 lane sums (the first n - n % 8 codes) plus a
// scalar sum of the rest: the caller scales the lanes and reduces them once per row.
inline __m256 CodeDot(const uint8_t* __restrict codes, const float* __restrict x, int64_t n, float* tail) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k));
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), _mm256_loadu_ps(x + k + 8), a1);
  }
  for (; k + 8 <= n; k += 8) {
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k));
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), _mm256_loadu_ps(x + k), a0);
  }
  float t = 0.f;
  for (; k < n; ++k) t += static_cast<float>(codes[k]) * x[k];
  *tail = t;
  return _mm256_add_ps(a0, a1);
}

inline float Sum(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += t[l];
  return s;
}
#endif

struct Problem {
  const float* xp;           // [rows, d_in], columns in the codes' order
  const float* xsum;         // [rows, groups]: each group's sum of xp
  const uint8_t* codes;      // [d_out, d_in]
  const uint8_t* s_codes;    // [d_out, groups]
  const uint8_t* z_codes;    // [d_out, groups]
  const float* s_stats;      // [d_out / stat_group, groups, 2]: step, zero point
  const float* z_stats;      // [d_out / stat_group, groups, 2]
  const float* values;       // [nnz]
  const int32_t* columns;    // [nnz], in the codes' order
  const int32_t* row_starts; // [d_out + 1]
  float* y;                  // [rows, d_out]
  int64_t rows, d_in, d_out, groups, group_size, stat_group;
};

void RunRows(const Problem& p, int64_t o0, int64_t o1) {
  std::vector<float> scale(p.groups), zero(p.groups);
  for (int64_t o = o0; o < o1; ++o) {
    // The row's grids, decoded once for every row of x (a loop the compiler vectorises).
    const float* ss = p.s_stats + o / p.stat_group * p.groups * 2;
    const float* zs = p.z_stats + o / p.stat_group * p.groups * 2;
    const uint8_t* sc = p.s_codes + o * p.groups;
    const uint8_t* zc = p.z_codes + o * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) {
      scale[g] = std::max((sc[g] - ss[2 * g + 1]) * ss[2 * g], kMinScale);
      zero[g] = (zc[g] - zs[2 * g + 1]) * zs[2 * g];
    }
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* x = p.xp + r * p.d_in;
      const float* xsum = p.xsum + r * p.groups;
      float acc = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
      __m256 lanes = _mm256_setzero_ps();
#endif
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t k0 = g * p.group_size;
        const uint8_t* c = p.codes + o * p.d_in + k0;
        const float s = scale[g];
#if defined(__AVX2__) && defined(__FMA__)
        float tail;
        lanes = _mm256_fmadd_ps(_mm256_set1_ps(s), CodeDot(c, x + k0, p.group_size, &tail), lanes);
        acc += s * (tail - zero[g] * xsum[g]);
#else
        float dot = 0.f;
        for (int64_t k = 0; k < p.group_size; ++k) dot += static_cast<float>(c[k]) * x[k0 + k];
        acc += s * (dot - zero[g] * xsum[g]);
#endif
      }
#if defined(__AVX2__) && defined(__FMA__)
      acc += Sum(lanes);
#endif
      for (int32_t e = p.row_starts[o]; e < p.row_starts[o + 1]; ++e) acc += p.values[e] * x[p.columns[e]];
      p.y[r * p.d_out + o] = acc;
    }
  }
}

ffi::Error SpqrGemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::U8> codes,
                        ffi::Buffer<ffi::U8> s_codes, ffi::Buffer<ffi::U8> z_codes, ffi::Buffer<ffi::F32> s_stats,
                        ffi::Buffer<ffi::F32> z_stats, ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> columns,
                        ffi::Buffer<ffi::S32> row_starts, ffi::ResultBuffer<ffi::F32> y, int64_t group_size,
                        int64_t stat_group, int64_t block_rows) {
  const auto xd = xp.dimensions(), cd = codes.dimensions(), gd = s_codes.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || gd.size() != 2) return ffi::Error::InvalidArgument("spqr_gemv: bad ranks");
  const int64_t rows = xd[0], d_in = xd[1], d_out = cd[0], groups = gd[1];
  const int64_t nnz = values.element_count();
  if (cd[1] != d_in || gd[0] != d_out || group_size * groups != d_in || stat_group <= 0 || d_out % stat_group ||
      z_codes.element_count() != d_out * groups || s_stats.element_count() != d_out / stat_group * groups * 2 ||
      z_stats.element_count() != s_stats.element_count() || columns.element_count() != nnz ||
      row_starts.element_count() != d_out + 1 || y->element_count() != rows * d_out)
    return ffi::Error::InvalidArgument("spqr_gemv: inconsistent shapes");
  const int32_t* starts = row_starts.typed_data();
  if (starts[0] != 0 || starts[d_out] != nnz) return ffi::Error::InvalidArgument("spqr_gemv: bad row starts");
  for (int64_t e = 0; e < nnz; ++e)
    if (columns.typed_data()[e] < 0 || columns.typed_data()[e] >= d_in)
      return ffi::Error::InvalidArgument("spqr_gemv: outlier column out of range");
  // Each group's sum of activations, once per call (a per-thread buffer reused across calls).
  thread_local std::vector<float> xsum;
  xsum.assign(rows * groups, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < d_in; ++k) xsum[r * groups + k / group_size] += xp.typed_data()[r * d_in + k];
  const Problem p{xp.typed_data(), xsum.data(), codes.typed_data(), s_codes.typed_data(), z_codes.typed_data(),
                  s_stats.typed_data(), z_stats.typed_data(), values.typed_data(), columns.typed_data(), starts,
                  y->typed_data(), rows, d_in, d_out, groups, group_size, stat_group};
  const int64_t step = std::max<int64_t>(1, block_rows);
  ParallelBlocks(pool, (d_out + step - 1) / step,
                 [&](int64_t b) { RunRows(p, b * step, std::min(d_out, (b + 1) * step)); });
  return ffi::Error::Success();
}

}  // namespace

namespace bind = jaxquant::bind;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantSpqrGemvF32, SpqrGemvImpl, bind::Pooled().Arg<bind::F32>().Arg<bind::U8>()
                              .Arg<bind::U8>().Arg<bind::U8>().Arg<bind::F32>().Arg<bind::F32>().Arg<bind::F32>()
                              .Arg<bind::S32>().Arg<bind::S32>().Ret<bind::F32>().Attr<int64_t>("group_size")
                              .Attr<int64_t>("stat_group").Attr<int64_t>("block_rows"));
