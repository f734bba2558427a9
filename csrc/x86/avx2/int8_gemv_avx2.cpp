// int8 x fp32 GEMV-sized batches (M <= 16), AVX2 + FMA.
//
// First SIMD kernel, kept plain: per weight row and batch row, each scale group is a run of
// 8-wide FMAs on int8 codes widened to fp32, scaled once per group. The weight row (Kp bytes) stays
// in L1 across the M batch rows. Left for the SIMD phase: several weight rows per pass, VNNI for
// larger batches, prefetch.
#include "avx2_common.h"
#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {

Status int8_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* codes = static_cast<const int8_t*>(q.codes) + n * q.kp;
    const float* scale = q.scale + n * q.n_groups;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.stride_xm;
      __m256 acc = _mm256_setzero_ps();
      float acc_tail = 0.f;
      for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
        const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
        __m256 gacc = _mm256_setzero_ps();  // sum of x * code over the group, scaled once below
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8) gacc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), avx2::load_i8x8(codes + k), gacc);
        float tail = 0.f;
        for (; k < k1; ++k) tail += x[k] * float(codes[k]);
        acc = _mm256_fmadd_ps(gacc, _mm256_set1_ps(scale[g]), acc);
        acc_tail += tail * scale[g];
      }
      store_output(a, m, n, avx2::hsum(acc) + acc_tail);
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
