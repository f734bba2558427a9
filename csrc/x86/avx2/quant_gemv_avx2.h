// Exact-mode (fp32 x) int8 / int4 GEMV for small batches, AVX2 + FMA: the loop nest shared by
// int8_gemv_avx2.cpp and int4_gemv_avx2.cpp (each supplies a decoder, `Fmt`).
//
// Weight rows in blocks of 4, lanes along K: each chunk of codes is decoded in registers once and
// feeds the FMAs of every batch row of the pass (1 batch row x 4 weight rows, or 2-3 x 2); more
// batch rows re-decode per pass of 3, which beats a memory round trip only for small batches (the
// dispatch table's limits). Per scale group, sum x * (code - zero) in fp32, then one FMA by the
// scale. Group starts / ends off the chunk grid (odd groups, K tails) go through a masked partial
// chunk, so any group length and K work and nothing past a row or past K is read.
//
// Fmt: kStep (codes per main step, a multiple of 8), and per row r of the pass
//   void begin_group(r, g)                       zero point of group g
//   void step(r, k, __m256* w)                   kStep / 8 vectors of codes k.. (k + kStep <= K; may need k even)
//   bool aligned(k)                              whether step() can start at k
//   float code(r, k)                             one code minus its zero point (partial chunks)
//   const float* step_x(a, m)                    row m of x as step()'s lanes expect it (main steps only)
#pragma once

#include "avx2_common.h"
#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace avx2 {

constexpr int kGemvRows = 4;   // weight rows per pass
constexpr int kGemvBatch = 3;  // batch rows per pass: 3 x 2 accumulators + decoded codes

inline __m256i lane_mask(int cnt) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Rows r0 .. r0 + R - 1 of the decoder's (weight rows n + r0 ..) x batch rows m0 .. m0 + MB - 1.
template <int MB, int R, class Fmt>
void gemv_pass(const GemmArgs& a, const QuantView& q, Fmt& f, int64_t n, int r0, int64_t m0) {
  constexpr int V = Fmt::kStep / 8;
  const float* x[MB];   // partial chunks
  const float* xs[MB];  // main steps
  for (int i = 0; i < MB; ++i) x[i] = a.x + (m0 + i) * a.stride_xm, xs[i] = f.step_x(a, m0 + i);
  const float* scale[R];
  for (int r = 0; r < R; ++r) scale[r] = q.scale + (n + r0 + r) * q.n_groups;
  __m256 acc[MB][R];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
    const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
    for (int r = 0; r < R; ++r) f.begin_group(r0 + r, g);
    __m256 gacc[MB][R];
    for (int i = 0; i < MB; ++i)
      for (int r = 0; r < R; ++r) gacc[i][r] = _mm256_setzero_ps();
    int64_t k = k0;
    // Partial chunk [k, k + cnt), cnt <= 8: codes through a small buffer, x through a masked load.
    auto partial = [&](int cnt) {
      const __m256i mask = lane_mask(cnt);
      __m256 xv[MB];
      for (int i = 0; i < MB; ++i) xv[i] = _mm256_maskload_ps(x[i] + k, mask);
      for (int r = 0; r < R; ++r) {
        alignas(32) float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < cnt; ++j) t[j] = f.code(r0 + r, k + j);
        const __m256 w = _mm256_load_ps(t);
        for (int i = 0; i < MB; ++i) gacc[i][r] = _mm256_fmadd_ps(xv[i], w, gacc[i][r]);
      }
      k += cnt;
    };
    if (!f.aligned(k) && k < k1) partial(1);  // int4 group starting mid-byte
    for (; k + Fmt::kStep <= k1; k += Fmt::kStep) {
      for (int r = 0; r < R; ++r) {
        __m256 w[V];
        f.step(r0 + r, k, w);
        for (int v = 0; v < V; ++v)
          for (int i = 0; i < MB; ++i) gacc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[i] + k + 8 * v), w[v], gacc[i][r]);
      }
    }
    while (k < k1) partial(k1 - k < 8 ? int(k1 - k) : 8);
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(scale[r][g]);
      for (int i = 0; i < MB; ++i) acc[i][r] = _mm256_fmadd_ps(gacc[i][r], s, acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) store_output(a, m0 + i, n + r0 + r, hsum(acc[i][r]));
}

// One batch row streams all R rows at once (more independent loads and FMA chains); 2-3 batch rows
// take the rows in pairs, which keeps their 4-6 accumulators and the decoded codes in registers.
template <int MB, int R, class Fmt>
void gemv_rows_mb(const GemmArgs& a, const QuantView& q, Fmt& f, int64_t n, int64_t m0) {
  if (MB == 1 || R < 2) {
    gemv_pass<MB, R>(a, q, f, n, 0, m0);
  } else {
    int r0 = 0;
    for (; r0 + 2 <= R; r0 += 2) gemv_pass<MB, 2>(a, q, f, n, r0, m0);
    if (r0 < R) gemv_pass<MB, 1>(a, q, f, n, r0, m0);
  }
}

template <int R, class Fmt>
void gemv_rows(const GemmArgs& a, const QuantView& q, Fmt& f, int64_t n) {
  int64_t m0 = 0;
  for (; m0 + kGemvBatch <= a.M; m0 += kGemvBatch) gemv_rows_mb<kGemvBatch, R>(a, q, f, n, m0);
  if (a.M - m0 == 2) gemv_rows_mb<2, R>(a, q, f, n, m0);
  if (a.M - m0 == 1) gemv_rows_mb<1, R>(a, q, f, n, m0);
}

// Fmt(q, n, rows, ctx): a decoder for weight rows n .. n + rows - 1 (rows <= kGemvRows); ctx is
// handed through (per-call data of the format, e.g. a reordered x).
template <class Fmt, class Ctx>
Status gemv(const GemmArgs& a, const QuantView& q, int64_t n_begin, int64_t n_end, const Ctx& ctx) {
  int64_t n = n_begin;
  for (; n + kGemvRows <= n_end; n += kGemvRows) {
    Fmt f(q, n, kGemvRows, ctx);
    gemv_rows<kGemvRows>(a, q, f, n);
  }
  for (; n < n_end; ++n) {
    Fmt f(q, n, 1, ctx);
    gemv_rows<1>(a, q, f, n);
  }
  return Status::ok;
}

}  // namespace avx2
}  // namespace
}  // namespace sparseinfer
