// Scalar bf16 / fp16 <-> fp32 conversions, bit-exact with PyTorch's (round to nearest even).
// Header-only and ISA-free: usable from every group. Must not be compiled with -ffast-math (nor
// with FMA contraction: the build passes -ffp-contract=off). Internal linkage (anonymous
// namespace), see kernel_utils.h for why.
#pragma once

#include <cstdint>
#include <cstring>

namespace sparseinfer {
namespace {

inline float bits_to_f32(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

// bf16 is the top half of an fp32: widening is a shift.
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet, sign kept), as c10::round_to_nearest_even does.
inline uint16_t f32_to_bf16(float f) {
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x0040u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

// IEEE half -> float (normals, subnormals, inf, NaN), after Maratyszcza's FP16 library
// (fp16_ieee_to_fp32_value), which c10::Half uses as well.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normals / inf / NaN: shift exponent+mantissa into place and rescale by 2^-112.
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = bits_to_f32(0x7800000u);  // 0x1.0p-112f
  const float normalized = bits_to_f32((two_w >> 4) + exp_offset) * exp_scale;
  // Subnormals: build 0.5 * 2^-23-scaled magic and subtract it.
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_to_f32((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result = sign | (two_w < denormalized_cutoff ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return bits_to_f32(result);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN to a quiet NaN
// (fp16_ieee_from_fp32_value). Relies on fp32 arithmetic being correctly rounded (SSE / NEON).
inline uint16_t f32_to_f16(float f) {
  const float scale_to_inf = bits_to_f32(0x77800000u);   // 0x1.0p+112f
  const float scale_to_zero = bits_to_f32(0x08800000u);  // 0x1.0p-110f
  float base = ((f < 0 ? -f : f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace
}  // namespace sparseinfer
