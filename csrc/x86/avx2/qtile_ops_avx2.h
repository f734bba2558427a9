// Vector operations of the AVX2 int8-activation kernels (qtile_gemm.h): 8 lanes = 8 output rows,
// integer dot products with pmaddubsw (u8 x s8 -> pairs summed in i16) + pmaddwd (-> i32), since
// AVX2 has no vpdpbusd. pmaddubsw saturates at +-32767, so each format keeps its pair sums below:
//   int4: codes 0..15 are the unsigned operand: |pair| <= 2 * 15 * 127 = 3810, and the two parts
//         of a step (low and high nibbles) are added in i16 before pmaddwd (<= 7620);
//   int8: |w| is the unsigned operand and sign(x, w) the signed one (psignb):
//         |pair| <= 2 * 128 * 127 = 32512, one pmaddwd per part.
// Internal linkage, no std:: templates (csrc/README.md).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace avx2q {

struct OpsBase {
  static constexpr bool kCompact = false;  // QTileView::codes (qtile_gemm.h)
  static constexpr bool kOffsetX = false;  // x as it is (QActView::q)
  static constexpr int L = 8;
  using VI = __m256i;
  using VF = __m256;
  using XB = __m256i;
  static VI zero_i() { return _mm256_setzero_si256(); }
  static VF zero_f() { return _mm256_setzero_ps(); }
  static XB bcast(const int8_t* x4) {
    int32_t v;
    std::memcpy(&v, x4, 4);
    return _mm256_set1_epi32(v);
  }
  static VI sub_uniform(VI acc, int32_t v) { return _mm256_sub_epi32(acc, _mm256_set1_epi32(v)); }
  static VI sub_rows(VI acc, const uint8_t* zero, int32_t sum) {
    const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero)));
    return _mm256_sub_epi32(acc, _mm256_mullo_epi32(z, _mm256_set1_epi32(sum)));
  }
  static VF loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, VF v) { _mm256_storeu_ps(p, v); }
  // facc + float(acc) * (sw * sx): the product first, then one fused multiply-add, as the scalar kernel.
  static VF fma_seg(VI acc, VF sw, float sx, VF facc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(sw, _mm256_set1_ps(sx)), facc);
  }
  // Lanes [first, last) of y[m, n .. n + 8), bias added, rounded once to y's dtype.
  static void store(const GemmArgs& a, int64_t m, int64_t n, int first, int last, VF v) {
    if (a.y_dtype == DType::f32 && first == 0 && last == L) {
      if (a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + n));
      _mm256_storeu_ps(static_cast<float*>(a.y) + m * a.stride_ym + n, v);
      return;
    }
    alignas(32) float lanes[L];
    _mm256_store_ps(lanes, v);
    for (int l = first; l < last; ++l) store_output(a, m, n + l, lanes[l]);
  }
};

struct OpsInt4 : OpsBase {
  static constexpr int kBits = 4;
  static constexpr int kMaxMR = 4;  // 4 x 2 int32 accumulators + 4 decoded + 2 broadcasts + 2 constants
  static constexpr int kMaxR = 2;
  static int tiles_for(int64_t M) { return M <= 2 ? 2 : 1; }
  struct Dec {
    __m256i lo, hi;  // codes of elements k..k+3 / k+4..k+7 of 8 rows
  };
  static void decode(const uint8_t* p, Dec& d) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(0x0F);
    d.lo = _mm256_and_si256(v, m);
    d.hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  }
  static VI dot(VI acc, const Dec& d, const XB* xb) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(d.lo, xb[0]), _mm256_maddubs_epi16(d.hi, xb[1]));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

struct OpsInt8 : OpsBase {
  static constexpr int kBits = 8;
  static constexpr int kMaxMR = 4;
  static constexpr int kMaxR = 2;
  static int tiles_for(int64_t M) { return M <= 2 ? 2 : 1; }
  struct Dec {
    __m256i w, aw;  // codes of elements k..k+3 of 8 rows, and their magnitudes
  };
  static void decode(const uint8_t* p, Dec& d) {
    d.w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    d.aw = _mm256_abs_epi8(d.w);  // -128 -> 0x80, read as unsigned 128
  }
  static VI dot(VI acc, const Dec& d, const XB* xb) {
    const __m256i pairs = _mm256_maddubs_epi16(d.aw, _mm256_sign_epi8(xb[0], d.w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

}  // namespace avx2q
}  // namespace
}  // namespace sparseinfer
