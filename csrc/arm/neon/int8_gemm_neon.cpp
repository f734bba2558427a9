// int8 x fp32, NEON, every batch size: W[n, k] = code[n, k] * scale[n, k / g]
// (sparseinfer/formats/int8.py).
//
// Per weight row, the batch rows go in tiles of up to 4 (neon_common.h): 8 codes at a time are
// widened int8 -> int16 -> int32 -> fp32 once and FMA'd into two accumulators per batch row. Each
// scale group's sum of x * code is scaled once, as in the AVX2 kernel; code -> fp32 is exact, so the
// result differs from x . to_dense() only in rounding order (bounded by the tests' TOL_F32).
#include "neon_common.h"

namespace sparseinfer {
namespace {

// y[m0 .. m0+MR, n].
template <int MR>
void int8_row_tile(const GemmArgs& a, const QuantView& q, int64_t n, int64_t m0) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + n * q.kp;
  const float* scale = q.scale + n * q.n_groups;
  const float* x[MR];
  float32x4_t acc[MR];  // sum over groups of scale * (group sum)
  float acc_tail[MR];   // the same for the scalar tails
  for (int r = 0; r < MR; ++r) x[r] = a.x + (m0 + r) * a.stride_xm, acc[r] = vdupq_n_f32(0.f), acc_tail[r] = 0.f;

  for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
    const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;  // columns >= K are padding
    float32x4_t s0[MR], s1[MR];                                  // group sums of x * code
    float st[MR];
    for (int r = 0; r < MR; ++r) s0[r] = vdupq_n_f32(0.f), s1[r] = vdupq_n_f32(0.f), st[r] = 0.f;
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      float32x4_t w0, w1;
      neon::load_i8x8(codes + k, w0, w1);
      for (int r = 0; r < MR; ++r) {
        s0[r] = vfmaq_f32(s0[r], vld1q_f32(x[r] + k), w0);
        s1[r] = vfmaq_f32(s1[r], vld1q_f32(x[r] + k + 4), w1);
      }
    }
    if (k + 4 <= k1) {
      const float32x4_t w0 = neon::load_i8x4(codes + k);
      for (int r = 0; r < MR; ++r) s0[r] = vfmaq_f32(s0[r], vld1q_f32(x[r] + k), w0);
      k += 4;
    }
    for (; k < k1; ++k) {
      const float c = float(codes[k]);
      for (int r = 0; r < MR; ++r) st[r] += x[r][k] * c;
    }
    const float s = scale[g];
    for (int r = 0; r < MR; ++r) {
      acc[r] = vfmaq_n_f32(acc[r], vaddq_f32(s0[r], s1[r]), s);
      acc_tail[r] += st[r] * s;
    }
  }
  for (int r = 0; r < MR; ++r) store_output(a, m0 + r, n, vaddvq_f32(acc[r]) + acc_tail[r]);
}

}  // namespace

Status int8_gemm_neon(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  for (int64_t n = n_begin; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + neon::kMaxRows <= a.M; m += neon::kMaxRows) int8_row_tile<neon::kMaxRows>(a, q, n, m);
    switch (a.M - m) {
      case 3: int8_row_tile<3>(a, q, n, m); break;
      case 2: int8_row_tile<2>(a, q, n, m); break;
      case 1: int8_row_tile<1>(a, q, n, m); break;
      default: break;
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
