// Helpers for the NEON group (aarch64 baseline ASIMD, no extra flags). Internal linkage only, and
// no std:: templates: see csrc/README.md ("one ISA per file").
//
// Every NEON kernel works on tiles of up to kMaxRows batch rows (x rows) per weight row: the weight
// row is decoded once per tile (codes -> fp32 in registers, or N:M / CSR values -> fp32 scratch)
// and used for every row of the tile, so decode cost is divided by the tile height. The tile
// height is a template parameter, so each row's accumulators live in registers (4 rows x 2
// accumulators + weights fit the 32 vector registers with room to spare).
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace neon {

constexpr int kMaxRows = 4;  // batch rows per tile
static_assert(kMaxRows == 4, "the remainder switches below handle 1..3 leftover rows");

// -- loads ----------------------------------------------------------------------------------------

// 8 int8 codes at p -> 2 x 4 floats (exact: |code| <= 128).
inline void load_i8x8(const int8_t* p, float32x4_t& lo, float32x4_t& hi) {
  const int16x8_t w = vmovl_s8(vld1_s8(p));
  lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
  hi = vcvtq_f32_s32(vmovl_high_s16(w));
}

// 4 int8 codes at p -> 4 floats; reads exactly 4 bytes (the caller may be at the end of a buffer).
inline float32x4_t load_i8x4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  const int16x8_t w = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(word)));
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
}

// 8 bytes = 16 int4 codes (low nibble = even element) minus the zero point -> 4 x 4 floats, in
// element order. vzip interleaves the low and high nibbles back into element order; the
// subtraction happens in int16, so code - zero is exact.
inline void load_u4x16(const uint8_t* p, int16x8_t zero, float32x4_t w[4]) {
  const uint8x8_t b = vld1_u8(p);
  const uint8x8x2_t c = vzip_u8(vand_u8(b, vdup_n_u8(0xF)), vshr_n_u8(b, 4));
  const int16x8_t lo = vsubq_s16(vreinterpretq_s16_u16(vmovl_u8(c.val[0])), zero);  // elements 0..7
  const int16x8_t hi = vsubq_s16(vreinterpretq_s16_u16(vmovl_u8(c.val[1])), zero);  // elements 8..15
  w[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  w[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
  w[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  w[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

// -- value rows -> fp32 ---------------------------------------------------------------------------

// dst[0, count) = src[0, count) of kind bf16 / f16 widened to fp32 (both exact).
inline void widen_half(const uint16_t* src, ValueKind kind, int64_t count, float* dst) {
  int64_t j = 0;
  if (kind == ValueKind::bf16) {
    for (; j + 8 <= count; j += 8) {  // bf16 is the top half of an fp32
      const uint16x8_t h = vld1q_u16(src + j);
      vst1q_f32(dst + j, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)));
      vst1q_f32(dst + j + 4, vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)));
    }
    for (; j < count; ++j) dst[j] = bf16_to_f32(src[j]);
  } else {
    for (; j + 8 <= count; j += 8) {  // fcvtl: IEEE half -> float, subnormals included
      const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(src + j));
      vst1q_f32(dst + j, vcvt_f32_f16(vget_low_f16(h)));
      vst1q_f32(dst + j + 4, vcvt_high_f32_f16(h));
    }
    for (; j < count; ++j) dst[j] = f16_to_f32(src[j]);
  }
}

// -- sparse rows ----------------------------------------------------------------------------------

// acc[r] (+ tail[r]) += sum_j x[r][cols[j]] * vals[j] for the MR rows of a tile. NEON has no
// gather: the four x values a vector needs are loaded lane by lane, shared by the four values.
template <int MR>
inline void gather_accumulate(const float* const* x, const int32_t* cols, const float* vals, int64_t count,
                              float32x4_t* acc, float* tail) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const float32x4_t v = vld1q_f32(vals + j);
    const int32_t c0 = cols[j], c1 = cols[j + 1], c2 = cols[j + 2], c3 = cols[j + 3];
    for (int r = 0; r < MR; ++r) {
      float32x4_t xv = vld1q_dup_f32(x[r] + c0);
      xv = vld1q_lane_f32(x[r] + c1, xv, 1);
      xv = vld1q_lane_f32(x[r] + c2, xv, 2);
      xv = vld1q_lane_f32(x[r] + c3, xv, 3);
      acc[r] = vfmaq_f32(acc[r], xv, v);
    }
  }
  for (; j < count; ++j)
    for (int r = 0; r < MR; ++r) tail[r] += x[r][cols[j]] * vals[j];
}

// y[m0 .. m0+MR, n] for one sparse weight row given as (column, fp32 value) pairs.
template <int MR>
inline void sparse_row_tile(const GemmArgs& a, int64_t n, int64_t m0, const int32_t* cols, const float* vals,
                            int64_t count) {
  const float* x[MR];
  float32x4_t acc[MR];
  float tail[MR];
  for (int r = 0; r < MR; ++r) x[r] = a.x + (m0 + r) * a.stride_xm, acc[r] = vdupq_n_f32(0.f), tail[r] = 0.f;
  gather_accumulate<MR>(x, cols, vals, count, acc, tail);
  for (int r = 0; r < MR; ++r) store_output(a, m0 + r, n, vaddvq_f32(acc[r]) + tail[r]);
}

// y[:, n] for one sparse weight row: all M batch rows, in tiles.
inline void sparse_row(const GemmArgs& a, int64_t n, const int32_t* cols, const float* vals, int64_t count) {
  int64_t m = 0;
  for (; m + kMaxRows <= a.M; m += kMaxRows) sparse_row_tile<kMaxRows>(a, n, m, cols, vals, count);
  switch (a.M - m) {
    case 3: sparse_row_tile<3>(a, n, m, cols, vals, count); break;
    case 2: sparse_row_tile<2>(a, n, m, cols, vals, count); break;
    case 1: sparse_row_tile<1>(a, n, m, cols, vals, count); break;
    default: break;
  }
}

}  // namespace neon
}  // namespace
}  // namespace sparseinfer
