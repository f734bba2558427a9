// The decode-step math (sparseinfer/decode.h) compiled with this group's flags; attention in
// 4-float vectors (sparseinfer/attend_simd.h).
#include <arm_neon.h>

#include "sparseinfer/decode.h"

namespace sparseinfer {
namespace {

struct Simd {
  using V = float32x4_t;
  static constexpr int W = 4;
  static constexpr int kHeads = 4;  // value accumulators: 4 heads x 4 vectors of 32 registers
  static V zero() { return vdupq_n_f32(0.0f); }
  static V set1(float x) { return vdupq_n_f32(x); }
  static V load(const float* p) { return vld1q_f32(p); }
  static V load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static void store(float* p, V v) { vst1q_f32(p, v); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V sub(V a, V b) { return vsubq_f32(a, b); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V fmadd(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V max(V a, V b) { return vmaxq_f32(a, b); }
  static V min(V a, V b) { return vminq_f32(a, b); }
  static float hmax(V a) { return vmaxvq_f32(a); }
  static float hsum(V a) { return vaddvq_f32(a); }
  // 2^r for integral r in [-126, 127]
  static V pow2(V r) { return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(r), vdupq_n_s32(127)), 23)); }
  // lane j = the sum of a[j]'s lanes: pairwise adds twice
  static V sums(const V* a) { return vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3])); }
};

}  // namespace
}  // namespace sparseinfer

#include "sparseinfer/attend_simd.h"

namespace sparseinfer {

DecodeOps decode_ops_neon() {
  DecodeOps ops = decode_math::ops();
  ops.attend_part = attend_simd::attend_part<float>;
  ops.attend_part_f16 = attend_simd::attend_part<uint16_t>;
  ops.attend_rows = attend_simd::attend_rows;
  return ops;
}

}  // namespace sparseinfer
