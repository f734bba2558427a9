// int4 x fp32 GEMV-sized batches (M <= 16), AVX2 + FMA: W = (code - zero) * scale per group.
//
// Codes are decoded 8 at a time from 4 bytes (variable shifts, see load_u4x8), the zero point is
// subtracted in integers (exact), and each group's sum of x * (code - zero) is scaled once.
#include "avx2_common.h"
#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {

Status int4_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || (q.kp & 1) || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2);
    const float* scale = q.scale + n * q.n_groups;
    const uint8_t* zero = q.zero ? q.zero + n * q.n_groups : nullptr;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.stride_xm;
      __m256 acc = _mm256_setzero_ps();
      float acc_tail = 0.f;
      for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
        const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
        const int z = zero ? zero[g] : 8;
        const __m256i vz = _mm256_set1_epi32(z);
        __m256 gacc = _mm256_setzero_ps();
        float tail = 0.f;
        int64_t k = k0;
        // Odd group starts (odd group lengths) are legal: one scalar element to reach a byte boundary.
        if ((k & 1) && k < k1) tail += x[k] * float(((bytes[k >> 1] >> 4) & 0xF) - z), ++k;
        for (; k + 8 <= k1; k += 8) {
          const __m256 wv = _mm256_cvtepi32_ps(_mm256_sub_epi32(avx2::load_u4x8(bytes + (k >> 1)), vz));
          gacc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), wv, gacc);
        }
        for (; k < k1; ++k) tail += x[k] * float(((bytes[k >> 1] >> ((k & 1) * 4)) & 0xF) - z);
        acc = _mm256_fmadd_ps(gacc, _mm256_set1_ps(scale[g]), acc);
        acc_tail += tail * scale[g];
      }
      store_output(a, m, n, avx2::hsum(acc) + acc_tail);
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
