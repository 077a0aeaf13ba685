// AQLM residuals and codebook gradients on CPU (jaxquant.methods.aqlm.native_grads).
#include <string>
#include <type_traits>
#include <vector>
#include "jaxquant_ffi.h"

namespace {

using jaxquant::ParallelBlocks;

// codes [R, n_ig, M], codebooks [M, K, og, ig], scales [R], rows [R, og, n_ig * ig].
struct Layout {
  int64_t R, n_ig, M, K, og, ig, cw, d_in;
};

// Reads the layout from codes [R, n_ig, M], codebooks [M, K, og, ig], the scales' count
// and rows [R, og, d_in], and checks that the shapes agree and that every code is in
// [0, K): codes index memory here (the XLA gather would clamp).
ffi::Error ReadLayout(const char* kernel, const ffi::Buffer<ffi::S32>& codes, ffi::Span<const int64_t> bd,
                      int64_t n_scales, ffi::Span<const int64_t> rd, Layout* l) {
  const ffi::Span<const int64_t> cd = codes.dimensions();
  if (cd.size() != 3 || bd.size() != 4 || rd.size() != 3)
    return ffi::Error::InvalidArgument(std::string(kernel) + ": codes, codebooks, rows must have ranks 3, 4, 3");
  *l = Layout{cd[0], cd[1], cd[2], bd[1], bd[2], bd[3], bd[2] * bd[3], cd[1] * bd[3]};
  if (bd[0] != l->M || n_scales != l->R || rd[0] != l->R || rd[1] != l->og || rd[2] != l->d_in)
    return ffi::Error::InvalidArgument(std::string(kernel) + ": inconsistent shapes");
  const int32_t* c = codes.typed_data();
  for (int64_t i = 0; i < l->R * l->n_ig * l->M; ++i)
    if (c[i] < 0 || c[i] >= l->K) return ffi::Error::InvalidArgument(std::string(kernel) + ": code out of range");
  return ffi::Error::Success();
}

// The kernels' work is a few passes over weight-sized arrays: below this many tile
// elements (R * n_ig * M * og * ig) one thread does it all, since waking the pool costs
// more than it saves (a 512 x 512 2x8 layer is 2^19). Above it, the rows are cut into a
// fixed number of blocks (not one per thread, so that results do not depend on the
// thread count).
constexpr int64_t kParallelWork = int64_t{1} << 21;
constexpr int64_t kRowBlocks = 8;

int64_t RowBlocks(const Layout& l) {
  return l.R * l.n_ig * l.M * l.cw < kParallelWork ? 1 : std::min<int64_t>(l.R, kRowBlocks);
}

// The tile shape (og, ig) as compile-time constants for the common shapes (so that the
// per-tile loops unroll and vectorise; a runtime loop over 8 elements does not), or
// (0, 0) for the runtime-sized fallback.
template <int OG, int IG>
struct Shape {
  int64_t og, ig, cw;
  explicit Shape(const Layout& l) : og(OG > 0 ? OG : l.og), ig(IG > 0 ? IG : l.ig), cw(og * ig) {}
};

// The unscaled tile of (row r, group g): sum_m books[m, codes[r, g, m]].
template <int OG, int IG>
struct Tile {
  static constexpr int kFixed = OG * IG;
  float t[kFixed > 0 ? kFixed : 1];
  std::vector<float> dyn;
  float* data;
  explicit Tile(int64_t cw) : dyn(kFixed > 0 ? 0 : cw), data(kFixed > 0 ? t : dyn.data()) {}
  void Decode(const Shape<OG, IG>& sh, const int32_t* c, const float* books, int64_t M, int64_t K) {
    const float* b0 = books + static_cast<int64_t>(c[0]) * sh.cw;
    for (int64_t e = 0; e < sh.cw; ++e) data[e] = b0[e];
    for (int64_t m = 1; m < M; ++m) {
      const float* bm = books + (m * K + c[m]) * sh.cw;
      for (int64_t e = 0; e < sh.cw; ++e) data[e] += bm[e];
    }
  }
};

// Rows [r0, r1): resid = s_r * tile - w, laid out as w.
template <int OG, int IG>
void ResidualRows(const Layout& l, const int32_t* c, const float* bk, const float* s, const float* x, float* out,
                  int64_t r0, int64_t r1) {
  const Shape<OG, IG> sh(l);
  Tile<OG, IG> t(sh.cw);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < l.n_ig; ++g) {
      t.Decode(sh, c + (r * l.n_ig + g) * l.M, bk, l.M, l.K);
      for (int64_t o = 0; o < sh.og; ++o) {
        const int64_t at = (r * sh.og + o) * l.d_in + g * sh.ig;
        const float* to = t.data + o * sh.ig;
        for (int64_t i = 0; i < sh.ig; ++i) out[at + i] = s[r] * to[i] - x[at + i];
      }
    }
}

// Rows [r0, r1) of both gradients in one pass over rh: g_scales[r] = 2 sum_g <rh[r, :,
// group g], tile(r, g)> into gs, and, into gb (zeroed here), g_books[e] = 2 sum, in row
// order, of s_r times rh's group for every (r, g, m) whose code is e.
template <int OG, int IG>
void GradRows(const Layout& l, const int32_t* c, const float* bk, const float* s, const float* g, float* gb,
              float* gs, int64_t r0, int64_t r1) {
  const Shape<OG, IG> sh(l);
  Tile<OG, IG> t(sh.cw);
  std::fill(gb, gb + l.M * l.K * sh.cw, 0.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float two_s = 2.f * s[r];
    float acc[IG > 0 ? IG : 1] = {};  // per-lane partial sums (one sum for the fallback)
    float acc1 = 0.f;
    for (int64_t j = 0; j < l.n_ig; ++j) {
      const int32_t* cj = c + (r * l.n_ig + j) * l.M;
      t.Decode(sh, cj, bk, l.M, l.K);
      for (int64_t o = 0; o < sh.og; ++o) {
        const float* src = g + (r * sh.og + o) * l.d_in + j * sh.ig;
        const float* to = t.data + o * sh.ig;
        if constexpr (IG > 0) {
          for (int i = 0; i < IG; ++i) acc[i] += src[i] * to[i];
        } else {
          for (int64_t i = 0; i < sh.ig; ++i) acc1 += src[i] * to[i];
        }
        for (int64_t m = 0; m < l.M; ++m) {
          float* d = gb + (m * l.K + cj[m]) * sh.cw + o * sh.ig;
          for (int64_t i = 0; i < sh.ig; ++i) d[i] += two_s * src[i];
        }
      }
    }
    for (int i = 0; i < (IG > 0 ? IG : 0); ++i) acc1 += acc[i];
    gs[r] = 2.f * acc1;
  }
}

// Calls fn(std::integral_constant<int, OG>, std::integral_constant<int, IG>) with the
// tile shape fixed at compile time for the common shapes.
template <typename Fn>
void WithTileShape(const Layout& l, const Fn& fn) {
  using std::integral_constant;
  if (l.og == 1 && l.ig == 8) return fn(integral_constant<int, 1>(), integral_constant<int, 8>());
  if (l.og == 1 && l.ig == 4) return fn(integral_constant<int, 1>(), integral_constant<int, 4>());
  if (l.og == 1 && l.ig == 16) return fn(integral_constant<int, 1>(), integral_constant<int, 16>());
  fn(integral_constant<int, 0>(), integral_constant<int, 0>());
}

ffi::Error ResidualImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> codes, ffi::Buffer<ffi::F32> books,
                        ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> resid) {
  Layout l;
  if (ffi::Error err = ReadLayout("aqlm_residual", codes, books.dimensions(), scales.element_count(), w.dimensions(), &l);
      err.failure())
    return err;
  const int32_t* c = codes.typed_data();
  const float *bk = books.typed_data(), *s = scales.typed_data(), *x = w.typed_data();
  float* out = resid->typed_data();
  const int64_t n_blocks = RowBlocks(l);
  WithTileShape(l, [&](auto og, auto ig) {
    ParallelBlocks(pool, n_blocks, [&](int64_t b) {
      ResidualRows<og.value, ig.value>(l, c, bk, s, x, out, l.R * b / n_blocks, l.R * (b + 1) / n_blocks);
    });
  });
  return ffi::Error::Success();
}

ffi::Error GradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> rh, ffi::Buffer<ffi::S32> codes,
                     ffi::Buffer<ffi::F32> books, ffi::Buffer<ffi::F32> scales,
                     ffi::ResultBuffer<ffi::F32> g_books, ffi::ResultBuffer<ffi::F32> g_scales) {
  Layout l;
  if (ffi::Error err =
          ReadLayout("aqlm_codebook_grads", codes, books.dimensions(), scales.element_count(), rh.dimensions(), &l);
      err.failure())
    return err;
  const int32_t* c = codes.typed_data();
  const float *g = rh.typed_data(), *bk = books.typed_data(), *s = scales.typed_data();
  float *gb = g_books->typed_data(), *gs = g_scales->typed_data();
  // Each row block sums its codebook gradient into its own buffer (the first block into
  // the output); the buffers are then added in block order.
  const int64_t n_blocks = RowBlocks(l), n_book = l.M * l.K * l.cw;
  std::vector<float> partial((n_blocks - 1) * n_book);
  WithTileShape(l, [&](auto og, auto ig) {
    ParallelBlocks(pool, n_blocks, [&](int64_t b) {
      float* dst = b == 0 ? gb : partial.data() + (b - 1) * n_book;
      GradRows<og.value, ig.value>(l, c, bk, s, g, dst, gs, l.R * b / n_blocks, l.R * (b + 1) / n_blocks);
    });
  });
  for (int64_t b = 1; b < n_blocks; ++b)
    for (int64_t e = 0; e < n_book; ++e) gb[e] += partial[(b - 1) * n_book + e];
  return ffi::Error::Success();
}

}  // namespace

namespace bind = jaxquant::bind;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqlmResidualF32, ResidualImpl, bind::Pooled().Arg<bind::S32>()
                              .Arg<bind::F32>().Arg<bind::F32>().Arg<bind::F32>().Ret<bind::F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqlmCodebookGradsF32, GradsImpl, bind::Pooled().Arg<bind::F32>()
                              .Arg<bind::S32>().Arg<bind::F32>().Arg<bind::F32>().Ret<bind::F32>()
                              .Ret<bind::F32>());
