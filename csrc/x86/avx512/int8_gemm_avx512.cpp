// int8 x fp32 activations (ActMode::fp32, the exact mode), AVX-512, every batch size, on the
// canonical layout: W[n, k] = code * scale[n, k / g].
//
// Per weight row, batch rows go in chunks of 4: each 16 codes are widened to fp32 once and feed
// one FMA per batch row, into four accumulators per row; a group's sums are scaled once. Group and
// K tails use masked loads, so no element past K is read and any group length works. The row (Kp bytes) stays in L1 across
// the chunks. This mode is exact, not fast: the int8-activation kernels (int8_q8_gemm_vnni_avx512)
// are the roofline path.
#include "avx512_common.h"

namespace sparseinfer {

namespace {

constexpr int kRows = 4;  // batch rows per pass over a weight row
constexpr int kPrefetchBytes = 1024;  // codes fetched ahead of the row being read

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int MR>
void row_pass(const GemmArgs& a, const QuantView& q, int64_t n, int64_t m0) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + n * q.kp;
  const float* scale = q.scale + n * q.n_groups;
  const float* x[MR];
  for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * a.stride_xm;
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
    const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
    // whole 64-code blocks into four accumulators per batch row, the row's codes prefetched ahead
    // (one FMA chain and no prefetch held batch 1 to 0.30 of the bandwidth roofline on 4096x4096)
    __m512 part[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) part[i][j] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
      __builtin_prefetch(codes + k + kPrefetchBytes, 0, 3);
      for (int j = 0; j < 4; ++j) {
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k + 16 * j));
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
        for (int i = 0; i < MR; ++i) part[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x[i] + k + 16 * j), w, part[i][j]);
      }
    }
    __m512 gacc[MR];
    for (int i = 0; i < MR; ++i)
      gacc[i] = _mm512_add_ps(_mm512_add_ps(part[i][0], part[i][1]), _mm512_add_ps(part[i][2], part[i][3]));
    for (; k < k1; k += 16) {
      const int64_t left = k1 - k;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, codes + k)));
      for (int i = 0; i < MR; ++i) gacc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x[i] + k), w, gacc[i]);
    }
    const __m512 s = _mm512_set1_ps(scale[g]);
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(gacc[i], s, acc[i]);
  }
  for (int i = 0; i < MR; ++i) store_output(a, m0 + i, n, hsum(acc[i]));
}

}  // namespace

Status int8_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  for (int64_t n = n_begin; n < n_end; ++n) {
    int64_t m0 = 0;
    for (; m0 + kRows <= a.M; m0 += kRows) row_pass<kRows>(a, q, n, m0);
    switch (a.M - m0) {
      case 3: row_pass<3>(a, q, n, m0); break;
      case 2: row_pass<2>(a, q, n, m0); break;
      case 1: row_pass<1>(a, q, n, m0); break;
      default: break;
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
