// CPU product of a few activation rows with a VPTQ weight (jaxquant.methods.vptq.kernel).
//
// y[r, g*V + t] = sum_i xs[r, i] * (book[off[i] + codes[g, i], t] + res_book[res_codes[g, i], t])
// where xs is x times the column scales and off[i] selects the outlier codebook (stacked
// after the main one) for outlier columns. Every code is one V-float load from a codebook
// that stays in L1 and V multiply-adds, so the weight is read as its codes only: 1-2 bytes
// per V weights, against 4 bytes per weight for a dense float32 product.
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "jaxquant_ffi.h"

namespace {

using jaxquant::ParallelBlocks;

constexpr int kLanes = 4;  // independent accumulators per row: hide the multiply-add latency

// Adds the contribution of codes [G0, G1) x [0, d_in) to acc ([rows][kLanes][V] per group).
// V and R as template constants let the compiler keep the accumulators in registers; V == 0
// is the runtime-sized fallback.
template <typename C, int V, int R>
void AddCodes(const C* __restrict codes, const float* __restrict book, const int32_t* __restrict off,
              const float* __restrict xs, float* __restrict y, int64_t g0, int64_t g1, int64_t d_in,
              int64_t d_out, int64_t v_runtime, bool accumulate) {
  const int64_t v = V > 0 ? V : v_runtime;
  std::vector<float> acc(static_cast<size_t>(R) * kLanes * v);
  for (int64_t g = g0; g < g1; ++g) {
    std::fill(acc.begin(), acc.end(), 0.f);
    float* __restrict a = acc.data();
    const C* cg = codes + g * d_in;
    int64_t i = 0;
    for (; i + kLanes <= d_in; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float* w = book + (static_cast<int64_t>(off ? off[i + l] : 0) + cg[i + l]) * v;
        for (int r = 0; r < R; ++r) {
          const float xv = xs[r * d_in + i + l];
          float* al = a + (r * kLanes + l) * v;
          for (int64_t t = 0; t < v; ++t) al[t] += xv * w[t];
        }
      }
    for (; i < d_in; ++i) {
      const float* w = book + (static_cast<int64_t>(off ? off[i] : 0) + cg[i]) * v;
      for (int r = 0; r < R; ++r) {
        const float xv = xs[r * d_in + i];
        for (int64_t t = 0; t < v; ++t) a[r * kLanes * v + t] += xv * w[t];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t t = 0; t < v; ++t) {
        float s = 0.f;
        for (int l = 0; l < kLanes; ++l) s += a[(r * kLanes + l) * v + t];
        float& out = y[r * d_out + g * v + t];
        out = accumulate ? out + s : s;
      }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// V == 4 and V == 8 with AVX2: a V == 8 codeword is one register, two V == 4 codewords are
// one, multiplied by their two columns' activations from xs4 (each activation 4 times).
// Four accumulators per row of x: a multiply-add's latency is four of its issue slots.
template <typename C, int V, int R, bool kOffsets>
void AddCodesAvx2(const C* __restrict codes, const float* __restrict book, const int32_t* __restrict off,
                  const float* __restrict xs, const float* __restrict xs4, float* __restrict y, int64_t g0,
                  int64_t g1, int64_t d_in, int64_t d_out, bool accumulate) {
  static_assert(V == 4 || V == 8, "AVX2 path: V is 4 or 8");
  constexpr int kPer = 8 / V;          // codewords per register
  constexpr int kStep = 4 * kPer;      // codes per loop turn: four registers' worth
  auto word = [&](const C* cg, int64_t i) {
    return book + (static_cast<int64_t>(kOffsets ? off[i] : 0) + cg[i]) * V;
  };
  for (int64_t g = g0; g < g1; ++g) {
    const C* cg = codes + g * d_in;
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < 4; ++a) acc[r][a] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + kStep <= d_in; i += kStep) {
      __m256 w[4];
      for (int a = 0; a < 4; ++a) {
        const int64_t j = i + a * kPer;
        if constexpr (V == 4) w[a] = _mm256_loadu2_m128(word(cg, j + 1), word(cg, j));
        else w[a] = _mm256_loadu_ps(word(cg, j));
      }
      for (int r = 0; r < R; ++r)
        for (int a = 0; a < 4; ++a) {
          const int64_t j = i + a * kPer;
          const __m256 x = V == 4 ? _mm256_loadu_ps(xs4 + (r * d_in + j) * 4) : _mm256_broadcast_ss(xs + r * d_in + j);
          acc[r][a] = _mm256_fmadd_ps(x, w[a], acc[r][a]);
        }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float t[8];
      _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
      float s[V];
      for (int k = 0; k < V; ++k) s[k] = V == 4 ? t[k] + t[k + 4] : t[k];
      for (int64_t j = i; j < d_in; ++j) {  // the columns left over
        const float* w = word(cg, j);
        for (int k = 0; k < V; ++k) s[k] += xs[r * d_in + j] * w[k];
      }
      float* out = y + r * d_out + g * V;
      for (int k = 0; k < V; ++k) out[k] = accumulate ? out[k] + s[k] : s[k];
    }
  }
}
#endif

template <typename C, int R>
void AddCodesV(const C* codes, const float* book, const int32_t* off, const float* xs, const float* xs4, float* y,
               int64_t g0, int64_t g1, int64_t d_in, int64_t d_out, int64_t v, bool accumulate) {
  switch (v) {
    case 2: return AddCodes<C, 2, R>(codes, book, off, xs, y, g0, g1, d_in, d_out, v, accumulate);
#if defined(__AVX2__) && defined(__FMA__)
    // With and without per-column codebooks: the common case loads no offsets.
    case 4: return off ? AddCodesAvx2<C, 4, R, true>(codes, book, off, xs, xs4, y, g0, g1, d_in, d_out, accumulate)
                       : AddCodesAvx2<C, 4, R, false>(codes, book, off, xs, xs4, y, g0, g1, d_in, d_out, accumulate);
    case 8: return off ? AddCodesAvx2<C, 8, R, true>(codes, book, off, xs, xs4, y, g0, g1, d_in, d_out, accumulate)
                       : AddCodesAvx2<C, 8, R, false>(codes, book, off, xs, xs4, y, g0, g1, d_in, d_out, accumulate);
#else
    case 4: return AddCodes<C, 4, R>(codes, book, off, xs, y, g0, g1, d_in, d_out, v, accumulate);
    case 8: return AddCodes<C, 8, R>(codes, book, off, xs, y, g0, g1, d_in, d_out, v, accumulate);
#endif
    case 16: return AddCodes<C, 16, R>(codes, book, off, xs, y, g0, g1, d_in, d_out, v, accumulate);
    default: return AddCodes<C, 0, R>(codes, book, off, xs, y, g0, g1, d_in, d_out, v, accumulate);
  }
}

// The activations: xs [rows, d_in], and xs4 [rows, d_in, 4], each activation four times.
struct Activations {
  const float* xs;
  const float* xs4;
};

template <typename C>
void AddAll(const C* codes, const float* book, const int32_t* off, Activations x, float* y, int64_t g0,
            int64_t g1, int64_t d_in, int64_t d_out, int64_t v, int64_t rows, bool accumulate) {
  // Rows of x one to four at a time: the codes are read once per group of rows.
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    AddCodesV<C, 4>(codes, book, off, x.xs + r * d_in, x.xs4 + r * d_in * 4, y + r * d_out, g0, g1, d_in, d_out,
                    v, accumulate);
  for (; r < rows; ++r)
    AddCodesV<C, 1>(codes, book, off, x.xs + r * d_in, x.xs4 + r * d_in * 4, y + r * d_out, g0, g1, d_in, d_out,
                    v, accumulate);
}

void AddAny(const ffi::AnyBuffer& codes, const float* book, const int32_t* off, Activations x, float* y,
            int64_t g0, int64_t g1, int64_t d_in, int64_t d_out, int64_t v, int64_t rows, bool accumulate) {
  if (codes.element_type() == ffi::DataType::U8)
    AddAll(codes.typed_data<uint8_t>(), book, off, x, y, g0, g1, d_in, d_out, v, rows, accumulate);
  else
    AddAll(codes.typed_data<uint16_t>(), book, off, x, y, g0, g1, d_in, d_out, v, rows, accumulate);
}

bool IsCode(const ffi::AnyBuffer& codes) {
  return codes.element_type() == ffi::DataType::U8 || codes.element_type() == ffi::DataType::U16;
}

// xs: [rows, d_in] activations times column scales. codes: [G, d_in] uint8/uint16. book:
// [K_total, V] (main codebook, then the outlier one). offsets: [d_in] int32, the row of book
// where each column's codebook starts (or [0]: every column uses the main one).
// res_codes, res_book: the residual ([G, d_in], [K2, V]), or zero-size when there is none.
ffi::Error VptqGemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::AnyBuffer codes,
                        ffi::Buffer<ffi::F32> book, ffi::Buffer<ffi::S32> offsets, ffi::AnyBuffer res_codes,
                        ffi::Buffer<ffi::F32> res_book, ffi::ResultBuffer<ffi::F32> y, int64_t block_groups) {
  const auto xd = xs.dimensions(), cd = codes.dimensions(), bd = book.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || bd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("vptq_gemv: bad ranks");
  const int64_t rows = xd[0], d_in = xd[1], groups = cd[0], v = bd[1], d_out = yd[1];
  const bool residual = res_codes.element_count() > 0;
  const bool per_column = offsets.element_count() == d_in;
  if (cd[1] != d_in || yd[0] != rows || groups * v != d_out || !IsCode(codes) || (residual && !IsCode(res_codes)) ||
      (residual && (res_codes.element_count() != groups * d_in || res_book.dimensions()[1] != v)) ||
      (!per_column && offsets.element_count() != 1))
    return ffi::Error::InvalidArgument("vptq_gemv: inconsistent shapes or code types");
  const int32_t* off = per_column ? offsets.typed_data() : nullptr;
  float* out = y->typed_data();
  // A per-thread buffer reused across calls (an XLA output buffer would be mapped anew).
  thread_local std::vector<float> expanded;
  if (v == 4) {
    expanded.resize(rows * d_in * 4);
    for (int64_t e = 0; e < rows * d_in; ++e)
      for (int k = 0; k < 4; ++k) expanded[e * 4 + k] = xs.typed_data()[e];
  }
  const Activations x{xs.typed_data(), expanded.data()};
  const int64_t step = std::max<int64_t>(1, block_groups);
  ParallelBlocks(pool, (groups + step - 1) / step, [&](int64_t b) {
    const int64_t g0 = b * step, g1 = std::min(groups, g0 + step);
    AddAny(codes, book.typed_data(), off, x, out, g0, g1, d_in, d_out, v, rows, false);
    if (residual) AddAny(res_codes, res_book.typed_data(), nullptr, x, out, g0, g1, d_in, d_out, v, rows, true);
  });
  return ffi::Error::Success();
}

}  // namespace

namespace bind = jaxquant::bind;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantVptqGemvF32, VptqGemvImpl, bind::Pooled().Arg<bind::F32>().Arg<bind::Any>()
                              .Arg<bind::F32>().Arg<bind::S32>().Arg<bind::Any>().Arg<bind::F32>()
                              .Ret<bind::F32>().Attr<int64_t>("block_groups"));
