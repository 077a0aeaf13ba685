// AQLM beam search over codes, and k-means (nearest centroids, Lloyd steps), on CPU (jaxquant.methods.aqlm.native_kernels).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "jaxquant_ffi.h"

namespace {

using jaxquant::ParallelBlocks;

// Vectors scored per loop iteration (independent accumulators).
constexpr int kUnroll = 4;
// Candidates are scored kLanes codewords at a time; LaneMask says which of them score at or
// below the running threshold (almost never, once the beam has filled).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Lanes = __m512;
inline Lanes LoadLanes(const float* x) { return _mm512_loadu_ps(x); }
inline Lanes SplatLanes(float x) { return _mm512_set1_ps(x); }
inline Lanes FmaLanes(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
inline uint32_t LaneMask(Lanes a, float thr) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(thr), _CMP_LE_OQ); }
inline void StoreLanes(float* x, Lanes a) { _mm512_storeu_ps(x, a); }
using LaneInts = __m512i;
inline LaneInts LaneIota(int32_t start) {
  return _mm512_add_epi32(_mm512_set1_epi32(start), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
// Lane-wise running argmin: where a < best, take (a, idx). Ties keep the earlier index.
inline void KeepSmaller(Lanes a, LaneInts idx, Lanes& best, LaneInts& best_idx) {
  const __mmask16 lt = _mm512_cmp_ps_mask(a, best, _CMP_LT_OQ);
  best = _mm512_mask_blend_ps(lt, best, a);
  best_idx = _mm512_mask_blend_epi32(lt, best_idx, idx);
}
inline void StoreInts(int32_t* x, LaneInts a) { _mm512_storeu_si512(x, a); }
inline Lanes MinLanes(Lanes a, Lanes b) { return _mm512_min_ps(a, b); }
inline Lanes MaxLanes(Lanes a, Lanes b) { return _mm512_max_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
using Lanes = __m256;
inline Lanes LoadLanes(const float* x) { return _mm256_loadu_ps(x); }
inline Lanes SplatLanes(float x) { return _mm256_set1_ps(x); }
inline Lanes FmaLanes(Lanes a, Lanes b, Lanes c) { return _mm256_fmadd_ps(a, b, c); }
inline uint32_t LaneMask(Lanes a, float thr) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(thr), _CMP_LE_OQ));
}
inline void StoreLanes(float* x, Lanes a) { _mm256_storeu_ps(x, a); }
using LaneInts = __m256i;
inline LaneInts LaneIota(int32_t start) {
  return _mm256_add_epi32(_mm256_set1_epi32(start), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline void KeepSmaller(Lanes a, LaneInts idx, Lanes& best, LaneInts& best_idx) {
  const __m256 lt = _mm256_cmp_ps(a, best, _CMP_LT_OQ);
  best = _mm256_blendv_ps(best, a, lt);
  best_idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_idx), _mm256_castsi256_ps(idx), lt));
}
inline void StoreInts(int32_t* x, LaneInts a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), a); }
inline Lanes MinLanes(Lanes a, Lanes b) { return _mm256_min_ps(a, b); }
inline Lanes MaxLanes(Lanes a, Lanes b) { return _mm256_max_ps(a, b); }
#else
constexpr int64_t kLanes = 1;
using Lanes = float;
inline Lanes LoadLanes(const float* x) { return *x; }
inline Lanes SplatLanes(float x) { return x; }
inline Lanes FmaLanes(Lanes a, Lanes b, Lanes c) { return a * b + c; }
inline uint32_t LaneMask(Lanes a, float thr) { return a <= thr ? 1u : 0u; }
inline void StoreLanes(float* x, Lanes a) { *x = a; }
using LaneInts = int32_t;
inline LaneInts LaneIota(int32_t start) { return start; }
inline void KeepSmaller(Lanes a, LaneInts idx, Lanes& best, LaneInts& best_idx) {
  if (a < best) {
    best = a;
    best_idx = idx;
  }
}
inline void StoreInts(int32_t* x, LaneInts a) { *x = a; }
inline Lanes MinLanes(Lanes a, Lanes b) { return std::min(a, b); }
inline Lanes MaxLanes(Lanes a, Lanes b) { return std::max(a, b); }
#endif

struct Problem {
  const int32_t* codes;           // [R, n_ig, M] the beam's start
  const float* scales;            // [R]
  const float* books;             // [M, K, D] codewords, tile in (og, ig) order
  const float* books_t;           // [M, D, K] the same, codewords as columns
  const float* h;                 // [d_in, d_in] symmetric
  const float* hjj;               // [n_ig, ig, ig] diagonal blocks of h
  const float* g0;                // [R, og, d_in] (w_hat - w) H of the start
  const float* q;                 // [n_ig, M, K] a^T G_j a per codeword
  const int32_t* group_order;     // [n_ig]
  const int32_t* codebook_order;  // [n_ig, M]
  int32_t* out_codes;             // [R, n_ig, M]
  float* dloss;                   // [R]
  int64_t R, n_ig, M, K, og, ig, D, d_in, beam;
};

struct Candidate {
  float score;
  int32_t code, parent;
};

// The XLA path's order: by score, ties to the smaller candidate (code, then parent).
inline bool Before(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score < b.score;
  return a.code != b.code ? a.code < b.code : a.parent < b.parent;
}

inline float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = G_j x with G_j = H_jj (x) I_og, tiles in (og, ig) order; written as ig axpys over
// the (symmetric) columns of H_jj so that the inner loop vectorises.
inline void ApplyG(const float* hjj, const float* x, float* y, int64_t og, int64_t ig) {
  for (int64_t o = 0; o < og; ++o) {
    float* yo = y + o * ig;
    for (int64_t a = 0; a < ig; ++a) yo[a] = 0.f;
    for (int64_t b = 0; b < ig; ++b) {
      const float xb = x[o * ig + b];
      const float* col = hjj + b * ig;
      for (int64_t a = 0; a < ig; ++a) yo[a] += col[a] * xb;
    }
  }
}

// dst = src + sum_y coef[y] * hj[y, :], one pass over the row in 16-float blocks (the
// block's accumulator stays in a register across the ig rows of H).
inline void RankUpdate(const float* src, float* dst, const float* hj, const float* coef, int64_t ig, int64_t n) {
  int64_t x0 = 0;
  for (; x0 + 16 <= n; x0 += 16) {
    float acc[16];
    for (int xi = 0; xi < 16; ++xi) acc[xi] = src[x0 + xi];
    for (int64_t y = 0; y < ig; ++y) {
      const float cy = coef[y];
      const float* hr = hj + y * n + x0;
      for (int xi = 0; xi < 16; ++xi) acc[xi] += hr[xi] * cy;
    }
    for (int xi = 0; xi < 16; ++xi) dst[x0 + xi] = acc[xi];
  }
  for (; x0 < n; ++x0) {
    float acc = src[x0];
    for (int64_t y = 0; y < ig; ++y) acc += hj[y * n + x0] * coef[y];
    dst[x0] = acc;
  }
}

// One thread's working memory: the beam's state, double-buffered ([2] = current / next).
struct Scratch {
  std::vector<int32_t> codes[2], cur[2], root[2], old;
  std::vector<float> g[2], loss[2], t[2], gj[2];
  std::vector<float> t_start, v, v2, ga, base, sc, delta;
  std::vector<Candidate> top;
  explicit Scratch(const Problem& p) {
    const int64_t B = p.beam;
    for (int i = 0; i < 2; ++i) {
      codes[i].resize(B * p.n_ig * p.M);
      cur[i].resize(B * p.M);
      root[i].resize(B);
      g[i].resize(B * p.og * p.d_in);
      loss[i].resize(B);
      t[i].resize(B * p.D);
      gj[i].resize(B * p.D);
    }
    t_start.resize(B * p.D);
    old.resize(B);
    v.resize(B * p.D);
    v2.resize(p.D);
    ga.resize(p.D);
    base.resize(B);
    sc.resize(kLanes);
    delta.resize(std::max(p.D, p.ig));
    top.resize(B);
  }
};

void SearchRow(const Problem& p, Scratch& w, int64_t r) {
  const int64_t n_ig = p.n_ig, M = p.M, K = p.K, D = p.D, ig = p.ig, og = p.og, d_in = p.d_in;
  const int64_t G = og * d_in, C = n_ig * M;
  const int32_t* start = p.codes + r * C;
  std::memcpy(p.out_codes + r * C, start, C * sizeof(int32_t));
  p.dloss[r] = 0.f;
  const float s = p.scales[r];
  if (s == 0.f) return;  // a zero (padding) row: every candidate scores the same
  const float s2 = s * s, two_s = 2.f * s;
  constexpr float kInf = std::numeric_limits<float>::infinity();

  int cb = 0, ib = 0;  // current buffers of the row-level and the group-level state
  std::memcpy(w.codes[0].data(), start, C * sizeof(int32_t));
  std::memcpy(w.g[0].data(), p.g0 + r * G, G * sizeof(float));
  w.loss[0][0] = 0.f;  // losses are changes with respect to the start
  int64_t nh = 1;
  for (int64_t gi = 0; gi < n_ig; ++gi) {
    const int64_t j = p.group_order[gi];
    const float* hjj = p.hjj + j * ig * ig;
    for (int64_t b = 0; b < nh; ++b) {
      int32_t* cur = w.cur[ib].data() + b * M;
      std::memcpy(cur, w.codes[cb].data() + b * C + j * M, M * sizeof(int32_t));
      float* t = w.t[ib].data() + b * D;
      for (int64_t e = 0; e < D; ++e) t[e] = 0.f;
      for (int64_t m = 0; m < M; ++m) {
        const float* a = p.books + (m * K + cur[m]) * D;
        for (int64_t e = 0; e < D; ++e) t[e] += a[e];
      }
      std::memcpy(w.t_start.data() + b * D, t, D * sizeof(float));
      const float* gb = w.g[cb].data() + b * G;
      float* gj = w.gj[ib].data() + b * D;
      for (int64_t o = 0; o < og; ++o) std::memcpy(gj + o * ig, gb + o * d_in + j * ig, ig * sizeof(float));
      w.root[ib][b] = static_cast<int32_t>(b);
    }
    for (int64_t step = 0; step < M; ++step) {
      const int64_t m = p.codebook_order[j * M + step];
      const float* book = p.books + m * K * D;
      const float* book_t = p.books_t + m * D * K;
      const float* qm = p.q + (j * M + m) * K;
      for (int64_t b = 0; b < nh; ++b) {
        const int64_t code = w.cur[ib][b * M + m];
        const float* a = book + code * D;
        float* ga = w.ga.data();
        ApplyG(hjj, a, ga, og, ig);
        float* v = w.v.data() + b * D;
        const float* gj = w.gj[ib].data() + b * D;
        w.old[b] = static_cast<int32_t>(code);
        for (int64_t e = 0; e < D; ++e) v[e] = gj[e] - s * ga[e];
        w.base[b] = w.loss[ib][b] - two_s * Dot(a, gj, D) + s2 * qm[code];
      }
      // Score every (hypothesis, codeword) and keep the n_keep best by insertion.
      const int64_t n_keep = std::min<int64_t>(p.beam, nh * K);
      int64_t cnt = 0;
      float thr = kInf;
      for (int64_t b = 0; b < nh; ++b) {
        const float bb = w.base[b];
        const float* v = w.v.data() + b * D;
        for (int64_t e = 0; e < D; ++e) w.v2[e] = two_s * v[e];
        const Lanes s2v = SplatLanes(s2), bv = SplatLanes(bb);
        float* sc = w.sc.data();
        // Offer the lanes of `mask` (scores in sc, codewords k0 + lane) to the beam.
        auto offer = [&](uint32_t mask, int64_t k0) {
          for (; mask; mask &= mask - 1) {
            const int64_t l = __builtin_ctz(mask);
            if (!(sc[l] <= thr)) continue;  // the threshold moved within this block
            const Candidate c{sc[l], static_cast<int32_t>(k0 + l), static_cast<int32_t>(b)};
            if (cnt == n_keep && !Before(c, w.top[cnt - 1])) continue;
            int64_t i = cnt < n_keep ? cnt++ : cnt - 1;
            while (i > 0 && Before(c, w.top[i - 1])) {
              w.top[i] = w.top[i - 1];
              --i;
            }
            w.top[i] = c;
            if (cnt == n_keep) thr = w.top[cnt - 1].score;
          }
        };
        int64_t k0 = 0;
        // kUnroll vectors at a time: independent FMA chains hide the FMA latency.
        for (; k0 + kUnroll * kLanes <= K; k0 += kUnroll * kLanes) {
          Lanes acc[kUnroll];
          for (int u = 0; u < kUnroll; ++u) acc[u] = FmaLanes(s2v, LoadLanes(qm + k0 + u * kLanes), bv);
          for (int64_t e = 0; e < D; ++e) {
            const Lanes ve = SplatLanes(w.v2[e]);
            const float* col = book_t + e * K + k0;
            for (int u = 0; u < kUnroll; ++u) acc[u] = FmaLanes(LoadLanes(col + u * kLanes), ve, acc[u]);
          }
          for (int u = 0; u < kUnroll; ++u) {
            const uint32_t mask = LaneMask(acc[u], thr);
            if (mask == 0) continue;
            StoreLanes(sc, acc[u]);
            offer(mask, k0 + u * kLanes);
          }
        }
        for (; k0 + kLanes <= K; k0 += kLanes) {
          Lanes acc = FmaLanes(s2v, LoadLanes(qm + k0), bv);
          for (int64_t e = 0; e < D; ++e) acc = FmaLanes(LoadLanes(book_t + e * K + k0), SplatLanes(w.v2[e]), acc);
          const uint32_t mask = LaneMask(acc, thr);
          if (mask == 0) continue;
          StoreLanes(sc, acc);
          offer(mask, k0);
        }
        if (k0 < K) {  // a tail shorter than the vector (tiny codebooks)
          uint32_t mask = 0;
          for (int64_t k = k0; k < K; ++k) {
            float acc = s2 * qm[k] + bb;
            for (int64_t e = 0; e < D; ++e) acc += book_t[e * K + k] * w.v2[e];
            sc[k - k0] = acc;
            if (acc <= thr) mask |= 1u << (k - k0);
          }
          offer(mask, k0);
        }
      }
      // The survivors: each is its parent with codeword `code` in slot m.
      const int nb = 1 - ib;
      for (int64_t i = 0; i < n_keep; ++i) {
        const Candidate c = w.top[i];
        const int64_t b = c.parent;
        const float* a_new = book + static_cast<int64_t>(c.code) * D;
        const float* ao = book + static_cast<int64_t>(w.old[b]) * D;
        const float* v = w.v.data() + b * D;
        std::memcpy(w.cur[nb].data() + i * M, w.cur[ib].data() + b * M, M * sizeof(int32_t));
        w.cur[nb][i * M + m] = c.code;
        w.root[nb][i] = w.root[ib][b];
        // The exact loss (the score was only used to rank).
        w.loss[nb][i] = w.base[b] + s2 * qm[c.code] + two_s * Dot(a_new, v, D);
        float* d = w.delta.data();
        for (int64_t e = 0; e < D; ++e) d[e] = a_new[e] - ao[e];
        const float* tb = w.t[ib].data() + b * D;
        float* ti = w.t[nb].data() + i * D;
        for (int64_t e = 0; e < D; ++e) ti[e] = tb[e] + d[e];
        const float* gb = w.gj[ib].data() + b * D;
        float* gi_ = w.gj[nb].data() + i * D;
        ApplyG(hjj, d, w.ga.data(), og, ig);
        for (int64_t e = 0; e < D; ++e) gi_[e] = gb[e] + s * w.ga[e];  // + s G_j delta
      }
      ib = nb;
      nh = n_keep;
    }
    // The survivors' row state: their ancestors' codes and g plus this group's change
    // (g gets a rank-ig update from ig rows of H).
    const int nc = 1 - cb;
    for (int64_t i = 0; i < nh; ++i) {
      const int64_t rt = w.root[ib][i];
      int32_t* ci = w.codes[nc].data() + i * C;
      std::memcpy(ci, w.codes[cb].data() + rt * C, C * sizeof(int32_t));
      std::memcpy(ci + j * M, w.cur[ib].data() + i * M, M * sizeof(int32_t));
      const float* ti = w.t[ib].data() + i * D;
      const float* t0 = w.t_start.data() + rt * D;
      const float* hj = p.h + j * ig * d_in;  // rows j*ig .. j*ig+ig-1 of H (= its columns)
      for (int64_t o = 0; o < og; ++o) {
        float* coef = w.delta.data();
        bool moved = false;
        for (int64_t y = 0; y < ig; ++y) {
          coef[y] = (ti[o * ig + y] - t0[o * ig + y]) * s;
          moved |= coef[y] != 0.f;
        }
        const float* src = w.g[cb].data() + rt * G + o * d_in;
        float* dst = w.g[nc].data() + i * G + o * d_in;
        if (!moved) {
          std::memcpy(dst, src, d_in * sizeof(float));
        } else {
          RankUpdate(src, dst, hj, coef, ig, d_in);
        }
      }
    }
    cb = nc;
  }
  int64_t best = 0;
  for (int64_t i = 1; i < nh; ++i)
    if (w.loss[ib][i] < w.loss[ib][best]) best = i;
  if (w.loss[ib][best] < 0.f) {
    std::memcpy(p.out_codes + r * C, w.codes[cb].data() + best * C, C * sizeof(int32_t));
    p.dloss[r] = w.loss[ib][best];
  }
}

// Rows are claimed in blocks from an atomic counter by the caller and the pool tasks (a
// task the pool never starts costs nothing; the caller waits only for claimed blocks).
struct Shared {
  Problem p;
  int64_t block_rows, n_blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  void Work() {
    std::unique_ptr<Scratch> scratch;
    for (int64_t blk; (blk = next.fetch_add(1)) < n_blocks;) {
      if (!scratch) scratch = std::make_unique<Scratch>(p);
      const int64_t r1 = std::min(p.R, (blk + 1) * block_rows);
      for (int64_t r = blk * block_rows; r < r1; ++r) SearchRow(p, *scratch, r);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error BeamSearchImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> codes, ffi::Buffer<ffi::F32> scales,
                          ffi::Buffer<ffi::F32> books, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> g0,
                          ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> group_order,
                          ffi::Buffer<ffi::S32> codebook_order, ffi::ResultBuffer<ffi::S32> out_codes,
                          ffi::ResultBuffer<ffi::F32> dloss, int64_t beam_size, int64_t block_rows) {
  const auto cd = codes.dimensions(), bd = books.dimensions(), gd = g0.dimensions();
  if (cd.size() != 3 || bd.size() != 4 || gd.size() != 3) return ffi::Error::InvalidArgument("aqlm_beam: bad ranks");
  const int64_t R = cd[0], n_ig = cd[1], M = cd[2], K = bd[1], og = bd[2], ig = bd[3];
  const int64_t d_in = n_ig * ig, D = og * ig;
  if (bd[0] != M || gd[0] != R || gd[1] != og || gd[2] != d_in || scales.element_count() != R ||
      h.element_count() != d_in * d_in || q.element_count() != n_ig * M * K ||
      group_order.element_count() != n_ig || codebook_order.element_count() != n_ig * M || beam_size < 1)
    return ffi::Error::InvalidArgument("aqlm_beam: inconsistent shapes");
  // Indices address memory here: check them (the XLA path would clamp).
  const int32_t* c = codes.typed_data();
  for (int64_t i = 0; i < R * n_ig * M; ++i)
    if (c[i] < 0 || c[i] >= K) return ffi::Error::InvalidArgument("aqlm_beam: code out of range");
  for (int64_t i = 0; i < n_ig; ++i)
    if (group_order.typed_data()[i] < 0 || group_order.typed_data()[i] >= n_ig)
      return ffi::Error::InvalidArgument("aqlm_beam: group_order out of range");
  for (int64_t i = 0; i < n_ig * M; ++i)
    if (codebook_order.typed_data()[i] < 0 || codebook_order.typed_data()[i] >= M)
      return ffi::Error::InvalidArgument("aqlm_beam: codebook_order out of range");

  const float* bk = books.typed_data();
  std::vector<float> books_t(M * D * K), hjj(n_ig * ig * ig);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t e = 0; e < D; ++e) books_t[(m * D + e) * K + k] = bk[(m * K + k) * D + e];
  const float* hd = h.typed_data();
  for (int64_t j = 0; j < n_ig; ++j)
    for (int64_t a = 0; a < ig; ++a)
      for (int64_t b = 0; b < ig; ++b) hjj[(j * ig + a) * ig + b] = hd[(j * ig + a) * d_in + j * ig + b];
  if (R == 0) return ffi::Error::Success();

  auto sh = std::make_shared<Shared>();
  sh->p = Problem{c, scales.typed_data(), bk, books_t.data(), hd, hjj.data(), g0.typed_data(), q.typed_data(),
                  group_order.typed_data(), codebook_order.typed_data(), out_codes->typed_data(),
                  dloss->typed_data(), R, n_ig, M, K, og, ig, D, d_in, beam_size};
  sh->block_rows = std::max<int64_t>(1, block_rows);
  sh->n_blocks = (R + sh->block_rows - 1) / sh->block_rows;
  const int64_t n_tasks = std::min<int64_t>(pool.num_threads(), sh->n_blocks - 1);
  for (int64_t i = 0; i < n_tasks; ++i) pool.Schedule([sh] { sh->Work(); });
  sh->Work();
  // books_t and hjj live on this stack frame: every claimed block must finish first.
  while (sh->done.load(std::memory_order_acquire) < sh->n_blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

// Centroids laid out for scoring kLanes of them at a time: ct [d, kp] (transposed, zero
// padded to whole pairs of vectors) and cn [kp] squared norms, +inf on the padding so that
// it never wins.
struct CentroidTable {
  int64_t d = 0, k = 0, kp = 0;
  std::vector<float> ct, cn;
  void Build(const float* c, int64_t k_, int64_t d_) {
    d = d_;
    k = k_;
    kp = (k + 2 * kLanes - 1) / (2 * kLanes) * (2 * kLanes);
    ct.assign(d * kp, 0.f);
    cn.assign(kp, std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < k; ++j) {
      float norm = 0.f;
      for (int64_t e = 0; e < d; ++e) {
        ct[e * kp + j] = c[j * d + e];
        norm += c[j * d + e] * c[j * d + e];
      }
      cn[j] = norm;
    }
  }
};

struct Scan {
  int32_t idx;   // argmin of |c|^2 - 2 x.c, ties to the smaller index
  float best;    // its score
  float second;  // the second smallest score (kSecond only)
};

// Points scored together: every centroid vector loaded serves all of them, and the
// 2 x kPoints accumulators are independent FMA chains.
constexpr int kPoints = 4;

// Scores every centroid against kPoints points (m2x[p] = -2 x_p; repeat a pointer to fill
// a short group) in registers: each point's argmin and, with kSecond, its runner-up score
// (a lane-wise running top two, merged across lanes at the end).
template <bool kSecond>
inline void ScanCentroids(const float* const* m2x, const CentroidTable& t, Scan* out) {
  const int64_t d = t.d, kp = t.kp;
  const float* ct = t.ct.data();
  const float* cn = t.cn.data();
  Lanes best[kPoints], second[kPoints];
  LaneInts best_idx[kPoints];
  for (int p = 0; p < kPoints; ++p) {
    best[p] = second[p] = SplatLanes(std::numeric_limits<float>::infinity());
    best_idx[p] = LaneIota(0);
  }
  for (int64_t j0 = 0; j0 < kp; j0 += 2 * kLanes) {
    Lanes acc[2][kPoints];
    for (int v = 0; v < 2; ++v) {
      const Lanes norms = LoadLanes(cn + j0 + v * kLanes);
      for (int p = 0; p < kPoints; ++p) acc[v][p] = norms;
    }
    for (int64_t e = 0; e < d; ++e) {
      const Lanes c0 = LoadLanes(ct + e * kp + j0), c1 = LoadLanes(ct + e * kp + j0 + kLanes);
      for (int p = 0; p < kPoints; ++p) {
        const Lanes xe = SplatLanes(m2x[p][e]);
        acc[0][p] = FmaLanes(c0, xe, acc[0][p]);
        acc[1][p] = FmaLanes(c1, xe, acc[1][p]);
      }
    }
    for (int v = 0; v < 2; ++v) {  // in index order: ties keep the smaller index
      const LaneInts idx = LaneIota(static_cast<int32_t>(j0 + v * kLanes));
      for (int p = 0; p < kPoints; ++p) {
        if (kSecond) second[p] = MinLanes(second[p], MaxLanes(best[p], acc[v][p]));  // with the old best
        KeepSmaller(acc[v][p], idx, best[p], best_idx[p]);
      }
    }
  }
  for (int p = 0; p < kPoints; ++p) {
    float bv[kLanes], sv[kLanes];
    int32_t bi[kLanes];
    StoreLanes(bv, best[p]);
    StoreLanes(sv, second[p]);
    StoreInts(bi, best_idx[p]);
    int64_t w = 0;
    for (int64_t l = 1; l < kLanes; ++l)
      if (bv[l] < bv[w] || (bv[l] == bv[w] && bi[l] < bi[w])) w = l;
    out[p] = Scan{bi[w], bv[w], std::numeric_limits<float>::infinity()};
    if (kSecond)
      for (int64_t l = 0; l < kLanes; ++l) out[p].second = std::min(out[p].second, l == w ? sv[l] : std::min(sv[l], bv[l]));
  }
}

// Scans the listed points kPoints at a time: -2x of each into m2x [kPoints, d] (scratch),
// then done(point, scan) for each.
template <bool kSecond, typename Done>
void ScanPoints(const float* x, int64_t d, const int64_t* points, int64_t n, const CentroidTable& t,
                std::vector<float>& m2x, const Done& done) {
  m2x.resize(kPoints * d);
  const float* ptrs[kPoints];
  Scan scans[kPoints];
  for (int64_t i0 = 0; i0 < n; i0 += kPoints) {
    const int np = static_cast<int>(std::min<int64_t>(kPoints, n - i0));
    for (int p = 0; p < kPoints; ++p) {
      const int64_t i = points[i0 + std::min(p, np - 1)];
      for (int64_t e = 0; e < d; ++e) m2x[p * d + e] = -2.f * x[i * d + e];
      ptrs[p] = m2x.data() + p * d;
    }
    ScanCentroids<kSecond>(ptrs, t, scans);
    for (int p = 0; p < np; ++p) done(points[i0 + p], scans[p]);
  }
}

inline float Distance(const float* x, const float* c, int64_t d) {
  float s = 0.f;
  for (int64_t e = 0; e < d; ++e) s += (x[e] - c[e]) * (x[e] - c[e]);
  return std::sqrt(s);
}

bool ValidKmeansShapes(ffi::Span<const int64_t> pd, ffi::Span<const int64_t> cd) {
  return pd.size() == 2 && cd.size() == 2 && pd[1] == cd[1] && cd[0] >= 1 && cd[0] <= (int64_t{1} << 30);
}

// Nearest centroid of every point: argmin_k |c_k|^2 - 2 x.c_k (|x|^2 does not change the
// winner), exact in float32, ties to the smaller index.
ffi::Error NearestImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> points, ffi::Buffer<ffi::F32> centroids,
                       ffi::ResultBuffer<ffi::S32> nearest, int64_t block_rows) {
  if (!ValidKmeansShapes(points.dimensions(), centroids.dimensions()))
    return ffi::Error::InvalidArgument("kmeans_nearest: points [n, d] and centroids [k >= 1, d] expected");
  const int64_t n = points.dimensions()[0], d = points.dimensions()[1];
  CentroidTable table;
  table.Build(centroids.typed_data(), centroids.dimensions()[0], d);
  const float* x = points.typed_data();
  int32_t* out = nearest->typed_data();
  const int64_t rows = std::max<int64_t>(1, block_rows);
  ParallelBlocks(pool, (n + rows - 1) / rows, [&](int64_t b) {
    std::vector<int64_t> ids;
    std::vector<float> m2x;
    for (int64_t i = b * rows; i < std::min(n, (b + 1) * rows); ++i) ids.push_back(i);
    ScanPoints<false>(x, d, ids.data(), ids.size(), table, m2x, [&](int64_t i, const Scan& s) { out[i] = s.idx; });
  });
  return ffi::Error::Success();
}

// Above this many centroids the half-gap bound (k^2 d work per iteration) is not kept.
constexpr int64_t kMaxHalfGapCentroids = 2048;

// Lloyd's k-means, `iters` centroid updates from `init`, then the nearest centroid of every
// point: the same iterates as assigning every point exactly at every iteration, but with
// Hamerly's bounds (J. Hamerly, "Making k-means even faster", SDM 2010) most points skip
// the scan. Per point: u >= the distance to its centroid, l <= the distance to any other;
// per centroid: half the distance to its nearest other centroid. A point whose u is
// within max(l, half gap) cannot have a nearer centroid. After the centroids move, u grows
// by its centroid's move and l shrinks by the largest other move. The bounds carry small
// relative margins so that float rounding never skips a point that needs a scan (a near
// tie within rounding may still go either way, as it can in the exact scan). Centroid
// sums are float64 and updated for the points that moved, in point order, so results do
// not depend on the thread count. A centroid that loses all its points stays put.
ffi::Error LloydImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> points, ffi::Buffer<ffi::F32> init,
                     ffi::ResultBuffer<ffi::F32> centroids, ffi::ResultBuffer<ffi::S32> assignment, int64_t iters,
                     int64_t block_rows) {
  if (!ValidKmeansShapes(points.dimensions(), init.dimensions()) || iters < 0)
    return ffi::Error::InvalidArgument("kmeans_lloyd: points [n, d], init [k >= 1, d] and iters >= 0 expected");
  const int64_t n = points.dimensions()[0], d = points.dimensions()[1], k = init.dimensions()[0];
  const float* x = points.typed_data();
  float* c = centroids->typed_data();
  int32_t* a = assignment->typed_data();
  std::memcpy(c, init.typed_data(), k * d * sizeof(float));
  constexpr float kMargin = 1e-5f;  // relative slack on every bound (float32 rounding is ~1e-7)

  std::vector<float> xn(n), u(n), l(n), move(k), half_gap(k, 0.f), c_old(k * d);
  for (int64_t i = 0; i < n; ++i) {
    float s = 0.f;
    for (int64_t e = 0; e < d; ++e) s += x[i * d + e] * x[i * d + e];
    xn[i] = s;
  }
  CentroidTable table;
  float max_cn = 0.f;
  auto build = [&] {
    table.Build(c, k, d);
    max_cn = 0.f;
    for (int64_t j = 0; j < k; ++j) max_cn = std::max(max_cn, table.cn[j]);
  };
  // A full scan sets the point's centroid and both bounds. The runner-up score is only
  // approximately the second distance, so l gets an absolute slack at the scale of the norms.
  auto set_bounds = [&](int64_t i, const Scan& s) {
    a[i] = s.idx;
    u[i] = Distance(x + i * d, c + s.idx * d, d) * (1.f + kMargin);
    const float second_sq = xn[i] + s.second - kMargin * (xn[i] + max_cn);
    l[i] = second_sq > 0.f ? std::sqrt(second_sq) * (1.f - kMargin) : 0.f;
  };
  const int64_t rows = std::max<int64_t>(1, block_rows), n_blocks = (n + rows - 1) / rows;
  build();
  ParallelBlocks(pool, n_blocks, [&](int64_t b) {
    std::vector<int64_t> ids;
    std::vector<float> m2x;
    for (int64_t i = b * rows; i < std::min(n, (b + 1) * rows); ++i) ids.push_back(i);
    ScanPoints<true>(x, d, ids.data(), ids.size(), table, m2x, set_bounds);
  });
  std::vector<double> sums(k * d, 0.0);
  std::vector<int64_t> counts(k, 0);
  for (int64_t i = 0; i < n; ++i) {
    ++counts[a[i]];
    for (int64_t e = 0; e < d; ++e) sums[a[i] * d + e] += x[i * d + e];
  }
  std::vector<int32_t> prev(a, a + n);

  for (int64_t it = 0; it < iters; ++it) {
    std::memcpy(c_old.data(), c, k * d * sizeof(float));
    int64_t far = 0;  // the centroid that moved most, and the largest moves
    float max_move = 0.f, other_move = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      if (counts[j] > 0)
        for (int64_t e = 0; e < d; ++e) c[j * d + e] = static_cast<float>(sums[j * d + e] / counts[j]);
      move[j] = Distance(c + j * d, c_old.data() + j * d, d) * (1.f + kMargin);
      if (move[j] > max_move) {
        other_move = max_move;
        max_move = move[j];
        far = j;
      } else {
        other_move = std::max(other_move, move[j]);
      }
    }
    if (k <= kMaxHalfGapCentroids) {
      std::fill(half_gap.begin(), half_gap.end(), std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < k; ++j)
        for (int64_t j2 = j + 1; j2 < k; ++j2) {
          const float gap = Distance(c + j * d, c + j2 * d, d);
          half_gap[j] = std::min(half_gap[j], gap);
          half_gap[j2] = std::min(half_gap[j2], gap);
        }
      for (int64_t j = 0; j < k; ++j) half_gap[j] = k > 1 ? 0.5f * half_gap[j] * (1.f - kMargin) : 0.f;
    }
    build();
    ParallelBlocks(pool, n_blocks, [&](int64_t b) {
      std::vector<int64_t> ids;  // the block's points that the bounds cannot settle
      std::vector<float> m2x;
      for (int64_t i = b * rows; i < std::min(n, (b + 1) * rows); ++i) {
        const int32_t ai = a[i];
        u[i] += move[ai];
        l[i] = std::max(0.f, l[i] - (ai == far ? other_move : max_move));
        const float z = std::max(l[i], half_gap[ai]);
        if (u[i] <= z) continue;
        u[i] = Distance(x + i * d, c + ai * d, d) * (1.f + kMargin);
        if (u[i] > z) ids.push_back(i);
      }
      ScanPoints<true>(x, d, ids.data(), ids.size(), table, m2x, set_bounds);
    });
    bool moved = false;
    for (int64_t i = 0; i < n; ++i) {
      if (a[i] == prev[i]) continue;
      moved = true;
      --counts[prev[i]];
      ++counts[a[i]];
      for (int64_t e = 0; e < d; ++e) {
        sums[prev[i] * d + e] -= x[i * d + e];
        sums[a[i] * d + e] += x[i * d + e];
      }
      prev[i] = a[i];
    }
    // No point changed centroid, so every later iteration would reproduce these centroids.
    if (!moved) break;
  }
  return ffi::Error::Success();
}

}  // namespace

namespace bind = jaxquant::bind;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantKmeansNearestF32, NearestImpl, bind::Pooled().Arg<bind::F32>()
                              .Arg<bind::F32>().Ret<bind::S32>().Attr<int64_t>("block_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantKmeansLloydF32, LloydImpl, bind::Pooled().Arg<bind::F32>()
                              .Arg<bind::F32>().Ret<bind::F32>().Ret<bind::S32>().Attr<int64_t>("iters")
                              .Attr<int64_t>("block_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantAqlmBeamSearchF32, BeamSearchImpl, bind::Pooled().Arg<bind::S32>()
                              .Arg<bind::F32>().Arg<bind::F32>().Arg<bind::F32>().Arg<bind::F32>()
                              .Arg<bind::F32>().Arg<bind::S32>().Arg<bind::S32>().Ret<bind::S32>()
                              .Ret<bind::F32>().Attr<int64_t>("beam_size").Attr<int64_t>("block_rows"));
