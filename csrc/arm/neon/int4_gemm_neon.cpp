// int4 x fp32, NEON, every batch size: W[n, k] = (code - zero[n, k / g]) * scale[n, k / g], codes
// two per byte, low nibble = even k; zero = 8 when symmetric (sparseinfer/formats/int4.py).
//
// 16 codes (8 bytes) per step: split into nibbles, zipped back into element order, zero point
// subtracted in int16 (exact), widened to fp32 once per batch-row tile (neon_common.h). Each group's
// sum of x * (code - zero) is scaled once, as in the AVX2 kernel.
#include "neon_common.h"

namespace sparseinfer {
namespace {

inline int nibble(const uint8_t* bytes, int64_t k) { return (bytes[k >> 1] >> ((k & 1) * 4)) & 0xF; }

// y[m0 .. m0+MR, n].
template <int MR>
void int4_row_tile(const GemmArgs& a, const QuantView& q, int64_t n, int64_t m0) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2);
  const float* scale = q.scale + n * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + n * q.n_groups : nullptr;
  const float* x[MR];
  float32x4_t acc[MR];
  float acc_tail[MR];
  for (int r = 0; r < MR; ++r) x[r] = a.x + (m0 + r) * a.stride_xm, acc[r] = vdupq_n_f32(0.f), acc_tail[r] = 0.f;

  for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
    const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
    const int z = zero ? zero[g] : 8;
    float32x4_t s0[MR], s1[MR];
    float st[MR];
    for (int r = 0; r < MR; ++r) s0[r] = vdupq_n_f32(0.f), s1[r] = vdupq_n_f32(0.f), st[r] = 0.f;
    int64_t k = k0;
    // An odd group length puts a group start mid-byte: one scalar element reaches the byte boundary.
    if ((k & 1) && k < k1) {
      const float c = float(nibble(bytes, k) - z);
      for (int r = 0; r < MR; ++r) st[r] += x[r][k] * c;
      ++k;
    }
    const int16x8_t vz = vdupq_n_s16(int16_t(z));
    for (; k + 16 <= k1; k += 16) {
      float32x4_t wv[4];
      neon::load_u4x16(bytes + (k >> 1), vz, wv);
      for (int r = 0; r < MR; ++r) {
        s0[r] = vfmaq_f32(s0[r], vld1q_f32(x[r] + k), wv[0]);
        s1[r] = vfmaq_f32(s1[r], vld1q_f32(x[r] + k + 4), wv[1]);
        s0[r] = vfmaq_f32(s0[r], vld1q_f32(x[r] + k + 8), wv[2]);
        s1[r] = vfmaq_f32(s1[r], vld1q_f32(x[r] + k + 12), wv[3]);
      }
    }
    for (; k < k1; ++k) {
      const float c = float(nibble(bytes, k) - z);
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

Status int4_gemm_neon(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || (q.kp & 1) || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  for (int64_t n = n_begin; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + neon::kMaxRows <= a.M; m += neon::kMaxRows) int4_row_tile<neon::kMaxRows>(a, q, n, m);
    switch (a.M - m) {
      case 3: int4_row_tile<3>(a, q, n, m); break;
      case 2: int4_row_tile<2>(a, q, n, m); break;
      case 1: int4_row_tile<1>(a, q, n, m); break;
      default: break;
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
