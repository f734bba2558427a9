// Vector operations of the NEON int8-activation kernels (the Ops policy of qtile_gemm.h): 4 lanes =
// 4 output rows, integer dot products with sdot (vdotq_s32: per 32-bit lane, the sum of 4 int8 x
// int8 products added to an int32). A row tile step is [16 rows][4 bytes], so one 16-byte load
// holds 4 rows x 4 codes and meets a broadcast 4-byte activation group lane for lane:
//   int8: the codes are signed, as sdot wants them: no offset;
//   int4: the low / high nibbles (elements k..k+3 / k+4..k+7) are 0..15, i.e. non-negative int8;
//         the zero point is subtracted in the segment epilogue (qtile_gemm.h).
// Products and sums are exact int32; the epilogue (sub, convert, sw * sx, one FMA) is the scalar
// kernel's (ref/qtile_ref.cpp) operation for operation, so results are bit-identical to it.
//
// Only for files built with -march=armv8.2-a+dotprod (csrc/CMakeLists.txt) whose dispatch rows
// require kFeatNeonDot. Internal linkage, no std:: templates (csrc/README.md).
#pragma once

#if !defined(__ARM_FEATURE_DOTPROD)
#error "qtile_ops_dot_neon.h needs -march=armv8.2-a+dotprod (per-file flags in csrc/CMakeLists.txt)"
#endif

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace neonq {

struct OpsBase {
  static constexpr bool kCompact = false;  // QTileView::codes (qtile_gemm.h)
  static constexpr bool kOffsetX = false;  // x as it is (QActView::q)
  static constexpr int L = 4;
  using VI = int32x4_t;
  using VF = float32x4_t;
  using XB = int8x16_t;
  static VI zero_i() { return vdupq_n_s32(0); }
  static VF zero_f() { return vdupq_n_f32(0.f); }
  static XB bcast(const int8_t* x4) {  // the 4-byte group in every lane
    int32_t v;
    std::memcpy(&v, x4, 4);
    return vreinterpretq_s8_s32(vdupq_n_s32(v));
  }
  static VI sub_uniform(VI acc, int32_t v) { return vsubq_s32(acc, vdupq_n_s32(v)); }
  static VI sub_rows(VI acc, const uint8_t* zero, int32_t sum) {  // acc - zero[lane] * sum, exact
    uint32_t z4;
    std::memcpy(&z4, zero, 4);
    const uint16x8_t z16 = vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(z4)));
    return vmlsq_n_s32(acc, vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(z16))), sum);
  }
  static VF loadf(const float* p) { return vld1q_f32(p); }
  static void storef(float* p, VF v) { vst1q_f32(p, v); }
  // facc + float(acc) * (sw * sx): the product first, then one fused multiply-add, as the scalar kernel.
  static VF fma_seg(VI acc, VF sw, float sx, VF facc) {
    return vfmaq_f32(facc, vcvtq_f32_s32(acc), vmulq_n_f32(sw, sx));
  }
  // Lanes [first, last) of y[m, n .. n + 4), bias added, rounded once to y's dtype.
  static void store(const GemmArgs& a, int64_t m, int64_t n, int first, int last, VF v) {
    if (a.y_dtype == DType::f32 && first == 0 && last == L) {
      if (a.bias) v = vaddq_f32(v, vld1q_f32(a.bias + n));
      vst1q_f32(static_cast<float*>(a.y) + m * a.stride_ym + n, v);
      return;
    }
    float lanes[L];
    vst1q_f32(lanes, v);
    for (int l = first; l < last; ++l) store_output(a, m, n + l, lanes[l]);
  }
};

// Register budget (32 vector registers), per K step: MR x R * 4 int32 accumulators, R * 4 decoded
// code vectors (x2 for int4) and 1-2 broadcasts; the fp32 accumulators are touched once per
// segment and may live on the stack. 4 x 1 tiles: 16 + 4 (int8) / 8 (int4) + 2; GEMV streams two
// tiles: 2 x 2 for int8 (16 + 8 + 1), 1 x 2 for int4 (8 + 16 + 2).
struct OpsInt8 : OpsBase {
  static constexpr int kBits = 8;
  static constexpr int kMaxMR = 4;
  static constexpr int kMaxR = 2;
  static int tiles_for(int64_t M) { return M <= 2 ? 2 : 1; }
  struct Dec {
    int8x16_t w;  // codes of elements k..k+3 of 4 rows
  };
  static void decode(const uint8_t* p, Dec& d) { d.w = vreinterpretq_s8_u8(vld1q_u8(p)); }
  static VI dot(VI acc, const Dec& d, const XB* xb) { return vdotq_s32(acc, d.w, xb[0]); }
};

struct OpsInt4 : OpsBase {
  static constexpr int kBits = 4;
  static constexpr int kMaxMR = 4;
  static constexpr int kMaxR = 2;
  static int tiles_for(int64_t M) { return M <= 1 ? 2 : 1; }
  struct Dec {
    int8x16_t lo, hi;  // codes 0..15 of elements k..k+3 / k+4..k+7 of 4 rows
  };
  static void decode(const uint8_t* p, Dec& d) {
    const uint8x16_t v = vld1q_u8(p);
    d.lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
    d.hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
  }
  static VI dot(VI acc, const Dec& d, const XB* xb) { return vdotq_s32(vdotq_s32(acc, d.lo, xb[0]), d.hi, xb[1]); }
};

}  // namespace neonq
}  // namespace
}  // namespace sparseinfer
