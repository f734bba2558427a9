// int8 x fp32 activations (ActMode::fp32, the exact mode), AVX2 + FMA, batches past the GEMV rows:
// W[n, k] = code * scale[n, k / g]. Loop nest and micro-kernel: quant_gemm_avx2.h.
//
// Panel decode: 16 rows x 16 codes are loaded row-wise and transposed as bytes (16 x 16), so each
// k gives the 16 rows' codes in one register: widened, converted and multiplied by the rows' group
// scales (the same fp32 product as to_dense()), stored as one [k][16] line of the panel.
#include "quant_gemm_avx2.h"

namespace sparseinfer {

namespace {

void decode_panel_int8(const QuantView& q, int64_t n0, int nr, int64_t k0, int kb, float* wp) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + n0 * q.kp;
  const float* scale = q.scale + n0 * q.n_groups;
  int64_t g = k0 / q.group, gnext = (g + 1) * q.group;
  __m256 s_lo, s_hi;
  avx2::load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
  for (int kk = 0; kk < kb; kk += 16) {
    const int64_t k = k0 + kk;
    alignas(16) __m128i v[16];
    for (int j = 0; j < 16; ++j)
      v[j] = j < nr ? avx2::load16_partial(reinterpret_cast<const uint8_t*>(codes + j * q.kp + k), q.kp - k)
                    : _mm_setzero_si128();
    avx2::transpose16x16_epi8(v);
    const int cnt = kb - kk < 16 ? kb - kk : 16;
    for (int t = 0; t < cnt; ++t) {
      if (k + t == gnext) {  // a group boundary inside the panel (any group length)
        ++g, gnext += q.group;
        avx2::load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
      }
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v[t]));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v[t], v[t])));
      _mm256_store_ps(wp + (kk + t) * avx2::kPanelN, _mm256_mul_ps(lo, s_lo));
      _mm256_store_ps(wp + (kk + t) * avx2::kPanelN + 8, _mm256_mul_ps(hi, s_hi));
    }
  }
}

}  // namespace

Status int8_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  return avx2::gemm_panels(a, n_begin, n_end, [&q](int64_t n0, int nr, int64_t k0, int kb, float* wp) {
    decode_panel_int8(q, n0, nr, k0, kb, wp);
  });
}

}  // namespace sparseinfer
