// int4 x fp32 activations (ActMode::fp32, the exact mode), AVX-512, every batch size, on the
// canonical layout: W[n, k] = (code - zero) * scale per group, low nibble = even k.
//
// Per weight row, batch rows go in chunks of 4: 16 codes (8 bytes) are split into nibbles in
// order, the zero point is subtracted in integers (exact), the result widened to fp32 once feeds
// 4 FMAs; a group's sums are scaled once. Group and K tails use masked loads, so nothing past K
// (in x) or past the group's bytes (in the codes) is read. The exact mode, not the fast one: see
// int4_q8_gemm_vnni_avx512 for the roofline path.
#include "avx512_common.h"

namespace sparseinfer {

namespace {

constexpr int kRows = 4;  // batch rows per pass over a weight row

// 16 consecutive codes from `bytes` (element 2j = low nibble of byte j), the bytes beyond
// ceil(count / 2) not read.
inline __m512i load_u4x16(const uint8_t* bytes, int64_t count) {
  const int64_t nb = count >= 16 ? 8 : (count + 1) / 2;
  const __m128i b = _mm_maskz_loadu_epi8(__mmask16((1u << nb) - 1), bytes);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  // b0 b0 b1 b1 ...
  const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  return _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(0xF));
}

template <int MR>
void row_pass(const GemmArgs& a, const QuantView& q, int64_t n, int64_t m0) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2);
  const float* scale = q.scale + n * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + n * q.n_groups : nullptr;
  const float* x[MR];
  for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * a.stride_xm;
  __m512 acc[MR];
  float tail[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps(), tail[i] = 0.f;
  for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
    const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
    const int z = zero ? zero[g] : 8;
    __m512 gacc[MR];
    float gtail[MR];
    for (int i = 0; i < MR; ++i) gacc[i] = _mm512_setzero_ps(), gtail[i] = 0.f;
    int64_t k = k0;
    if ((k & 1) && k < k1) {  // an odd group length leaves a group starting mid-byte
      const float wv = float(((bytes[k >> 1] >> 4) & 0xF) - z);
      for (int i = 0; i < MR; ++i) gtail[i] += x[i][k] * wv;
      ++k;
    }
    const __m512i vz = _mm512_set1_epi32(z);
    for (; k < k1; k += 16) {
      const int64_t left = k1 - k;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_sub_epi32(load_u4x16(bytes + (k >> 1), left), vz));
      for (int i = 0; i < MR; ++i) gacc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x[i] + k), w, gacc[i]);
    }
    const __m512 s = _mm512_set1_ps(scale[g]);
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(gacc[i], s, acc[i]), tail[i] += gtail[i] * scale[g];
  }
  for (int i = 0; i < MR; ++i) store_output(a, m0 + i, n, _mm512_reduce_add_ps(acc[i]) + tail[i]);
}

}  // namespace

Status int4_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || (q.kp & 1) || q.n_groups * q.group != q.kp) return Status::invalid_argument;
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
