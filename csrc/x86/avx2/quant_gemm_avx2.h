// Exact-mode (fp32 x) int8 / int4 GEMM for larger batches, AVX2 + FMA: the loop nest and the FMA
// micro-kernel shared by int8_gemm_avx2.cpp and int4_gemm_avx2.cpp (each supplies the panel decoder).
//
// Per thread column range: 16 output rows (a panel, 2 ymm of lanes along N) x 256 K are dequantized
// once into an fp32 L1 buffer laid out [k][16] -- exactly the values to_dense() gives, so the product
// differs from the reference only in summation order -- and every batch row of the chunk runs over
// it in 6 x 16 register tiles (12 accumulators, x broadcast per k). Lanes run along N, so K needs no
// tail handling. Both buffers live on the stack: no allocation per call.
#pragma once

#include "avx2_common.h"
#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace avx2 {

constexpr int kPanelN = 16;   // output rows per panel: two ymm of lanes
constexpr int kPanelK = 256;  // K per panel: 16 KB of fp32, stays in L1 next to 6 rows of x
constexpr int kTileM = 6;     // batch rows per register tile: 12 accumulators + 2 W + 1 x = 15 ymm
constexpr int kChunkM = 120;  // batch rows that share one decoded panel (accumulators: 7.5 KB)

// In-place 16 x 16 byte transpose (v[j] byte i <- v[i] byte j): four rounds of the perfect shuffle,
// each a rotation of the 8-bit (vector, byte) index by one bit.
inline void transpose16x16_epi8(__m128i* v) {
  for (int round = 0; round < 4; ++round) {
    __m128i t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm_unpacklo_epi8(v[i], v[i + 8]);
      t[2 * i + 1] = _mm_unpackhi_epi8(v[i], v[i + 8]);
    }
    for (int i = 0; i < 16; ++i) v[i] = t[i];
  }
}

// 16 bytes at p, of which only the first `avail` (may be < 16 at the end of a row) are read.
inline __m128i load16_partial(const uint8_t* p, int64_t avail) {
  if (avail >= 16) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint8_t t[16] = {};
  for (int64_t i = 0; i < avail; ++i) t[i] = p[i];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
}

// base[j * stride] for the panel's rows j < nr (0 beyond), as two ymm (rows 0-7, 8-15).
inline void load_col16(const float* base, int64_t stride, int nr, __m256* lo, __m256* hi) {
  alignas(32) float t[16];
  for (int j = 0; j < 16; ++j) t[j] = j < nr ? base[j * stride] : 0.f;
  *lo = _mm256_load_ps(t), *hi = _mm256_load_ps(t + 8);
}

// One batch-row tile over one panel: c[i][0..15] (+)= sum_k x_i[k] * wp[k][0..15].
template <int MR>
inline void micro_tile(const float* x, int64_t sx, const float* wp, int kb, float* c, bool accumulate) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = accumulate ? _mm256_load_ps(c + i * kPanelN) : _mm256_setzero_ps();
    acc[i][1] = accumulate ? _mm256_load_ps(c + i * kPanelN + 8) : _mm256_setzero_ps();
  }
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + i * sx;
  for (int k = 0; k < kb; ++k) {
    const __m256 w0 = _mm256_load_ps(wp + k * kPanelN), w1 = _mm256_load_ps(wp + k * kPanelN + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_broadcast_ss(xr[i] + k);
      acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(c + i * kPanelN, acc[i][0]);
    _mm256_store_ps(c + i * kPanelN + 8, acc[i][1]);
  }
}

// decode(n0, nr, k0, kb, wp): wp[kk * 16 + j] = W[n0 + j, k0 + kk] for kk < kb, j < nr, and a finite
// value (never stored) for j >= nr.
template <class Decode>
Status gemm_panels(const GemmArgs& a, int64_t n_begin, int64_t n_end, Decode decode) {
  alignas(32) float wp[kPanelK * kPanelN];
  alignas(32) float c[kChunkM * kPanelN];
  const int64_t sx = a.stride_xm;
  // Batch chunks outside: a chunk of x stays in cache while the thread's panels go by (the codes,
  // 4-8x smaller than fp32, are what gets re-read, and re-decoded, once per 120 batch rows).
  for (int64_t m0 = 0; m0 < a.M; m0 += kChunkM) {
    const int mc = int(a.M - m0 < kChunkM ? a.M - m0 : kChunkM);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelN) {
      const int nr = int(n_end - n0 < kPanelN ? n_end - n0 : kPanelN);
      for (int64_t k0 = 0; k0 < a.K; k0 += kPanelK) {
        const int kb = int(a.K - k0 < kPanelK ? a.K - k0 : kPanelK);
        decode(n0, nr, k0, kb, wp);
        const float* x = a.x + m0 * sx + k0;
        const bool acc = k0 > 0;
        int i = 0;
        for (; i + kTileM <= mc; i += kTileM) micro_tile<kTileM>(x + i * sx, sx, wp, kb, c + i * kPanelN, acc);
        switch (mc - i) {
          case 5: micro_tile<5>(x + i * sx, sx, wp, kb, c + i * kPanelN, acc); break;
          case 4: micro_tile<4>(x + i * sx, sx, wp, kb, c + i * kPanelN, acc); break;
          case 3: micro_tile<3>(x + i * sx, sx, wp, kb, c + i * kPanelN, acc); break;
          case 2: micro_tile<2>(x + i * sx, sx, wp, kb, c + i * kPanelN, acc); break;
          case 1: micro_tile<1>(x + i * sx, sx, wp, kb, c + i * kPanelN, acc); break;
          default: break;
        }
      }
      for (int i = 0; i < mc; ++i)
        for (int j = 0; j < nr; ++j) store_output(a, m0 + i, n0 + j, c[i * kPanelN + j]);
    }
  }
  return Status::ok;
}

}  // namespace avx2
}  // namespace
}  // namespace sparseinfer
