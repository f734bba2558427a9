// int4 x fp32 activations (ActMode::fp32, the exact mode), AVX2 + FMA, batches past the GEMV rows:
// W[n, k] = (code - zero) * scale per group, low nibble = even k. Loop nest and micro-kernel:
// quant_gemm_avx2.h.
//
// Panel decode: 16 rows x 16 bytes (32 codes) are loaded row-wise and transposed as bytes, so each
// byte column holds k (low nibbles) and k + 1 (high nibbles) of the 16 rows; the zero point is
// subtracted in int8 (exact, -15..15), then widened, converted and multiplied by the group scales --
// the same fp32 values as to_dense(). Group boundaries are checked per k: odd groups split a byte.
#include "quant_gemm_avx2.h"

namespace sparseinfer {

namespace {

inline __m128i load_zero16(const uint8_t* zero, int64_t stride, int nr) {
  if (!zero) return _mm_set1_epi8(8);
  alignas(16) uint8_t t[16] = {};
  for (int j = 0; j < nr; ++j) t[j] = zero[j * stride];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
}

void decode_panel_int4(const QuantView& q, int64_t n0, int nr, int64_t k0, int kb, float* wp) {
  const int64_t row_bytes = q.kp / 2;
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n0 * row_bytes;
  const float* scale = q.scale + n0 * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + n0 * q.n_groups : nullptr;
  int64_t g = k0 / q.group, gnext = (g + 1) * q.group;
  __m256 s_lo, s_hi;
  avx2::load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
  __m128i z = load_zero16(zero ? zero + g : nullptr, q.n_groups, nr);
  const __m128i mask = _mm_set1_epi8(0x0F);
  // k0 is a multiple of kPanelK, so every 32-code step starts on a byte boundary.
  for (int kk = 0; kk < kb; kk += 32) {
    const int64_t byte0 = (k0 + kk) / 2;
    alignas(16) __m128i v[16];
    for (int j = 0; j < 16; ++j)
      v[j] = j < nr ? avx2::load16_partial(bytes + j * row_bytes + byte0, row_bytes - byte0) : _mm_setzero_si128();
    avx2::transpose16x16_epi8(v);
    const int cnt = kb - kk < 32 ? kb - kk : 32;
    for (int t = 0; t < cnt; ++t) {
      const int64_t k = k0 + kk + t;
      if (k == gnext) {
        ++g, gnext += q.group;
        avx2::load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
        z = load_zero16(zero ? zero + g : nullptr, q.n_groups, nr);
      }
      const __m128i b = v[t >> 1];
      const __m128i nib = _mm_and_si128((t & 1) ? _mm_srli_epi16(b, 4) : b, mask);
      const __m128i c = _mm_sub_epi8(nib, z);
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c, c)));
      _mm256_store_ps(wp + (kk + t) * avx2::kPanelN, _mm256_mul_ps(lo, s_lo));
      _mm256_store_ps(wp + (kk + t) * avx2::kPanelN + 8, _mm256_mul_ps(hi, s_hi));
    }
  }
}

}  // namespace

Status int4_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || (q.kp & 1) || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  return avx2::gemm_panels(a, n_begin, n_end, [&q](int64_t n0, int nr, int64_t k0, int kb, float* wp) {
    decode_panel_int4(q, n0, nr, k0, kb, wp);
  });
}

}  // namespace sparseinfer
