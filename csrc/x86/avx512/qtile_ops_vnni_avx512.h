// Vector operations of the AVX-512 VNNI int8-activation kernels (qtile_gemm.h): 16 lanes = the 16
// rows of one row tile, one vpdpbusd per 4-byte activation group. vpdpbusd multiplies unsigned
// bytes (its second operand) by signed bytes (its third) and adds each lane's 4 products to an
// int32 without intermediate saturation, so:
//   int4: the codes 0..15 are the unsigned operand as they are; the activations the signed one;
//   int8: codes are signed, so decode flips their sign bit (u = code + 128) and the kernel
//         subtracts 128 * sum(q) per segment (kInt8Offset), exactly, in int32.
// The activation broadcast is the third operand, which the compiler may fold into the
// instruction's embedded {1to16} broadcast. Include only from files built with -mavx512vnni.
#pragma once

#include <cstring>

#include "avx512_common.h"

namespace sparseinfer {
namespace {
namespace avx512q {

struct OpsBase {
  static constexpr int L = 16;
  using VI = __m512i;
  using VF = __m512;
  using XB = __m512i;
  // Batch rows x row tiles of the register tile: 6 x 2 for GEMM-sized batches (12 int32 + 4
  // decoded + 2 broadcasts live in the K loop; the fp32 sums are touched once per segment), and
  // 4 tiles (64 rows, four streams) for batches of 1-2, which are memory-bound.
  static constexpr int kMaxMR = 6;
  static constexpr int kMaxR = 4;
  static int tiles_for(int64_t M) { return M <= 2 ? 4 : 2; }
  static VI zero_i() { return _mm512_setzero_si512(); }
  static VF zero_f() { return _mm512_setzero_ps(); }
  static XB bcast(const int8_t* x4) {
    int32_t v;
    std::memcpy(&v, x4, 4);
    return _mm512_set1_epi32(v);
  }
  static VI sub_uniform(VI acc, int32_t v) { return _mm512_sub_epi32(acc, _mm512_set1_epi32(v)); }
  static VI sub_rows(VI acc, const uint8_t* zero, int32_t sum) {
    const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero)));
    return _mm512_sub_epi32(acc, _mm512_mullo_epi32(z, _mm512_set1_epi32(sum)));
  }
  static VF loadf(const float* p) { return _mm512_loadu_ps(p); }
  // facc + float(acc) * (sw * sx): the product first, then one fused multiply-add, as the scalar kernel.
  static VF fma_seg(VI acc, VF sw, float sx, VF facc) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(sw, _mm512_set1_ps(sx)), facc);
  }
  static void store(const GemmArgs& a, int64_t m, int64_t n, int first, int last, VF v) {
    avx512::store_lanes(a, m, n, first, last, v);
  }
};

struct OpsInt4 : OpsBase {
  static constexpr int kBits = 4;
  static constexpr int32_t kInt8Offset = 0;
  struct Dec {
    __m512i lo, hi;  // codes of elements k..k+3 / k+4..k+7 of the 16 rows
  };
  static void decode(const uint8_t* p, Dec& d) {
    const __m512i v = _mm512_loadu_si512(p), m = _mm512_set1_epi8(0x0F);
    d.lo = _mm512_and_si512(v, m);
    d.hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  }
  static VI dot(VI acc, const Dec& d, const XB* xb) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, d.lo, xb[0]), d.hi, xb[1]);
  }
};

struct OpsInt8 : OpsBase {
  static constexpr int kBits = 8;
  static constexpr int32_t kInt8Offset = 128;
  struct Dec {
    __m512i u;  // code + 128 of elements k..k+3 of the 16 rows
  };
  static void decode(const uint8_t* p, Dec& d) {
    d.u = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(char(0x80)));
  }
  static VI dot(VI acc, const Dec& d, const XB* xb) { return _mm512_dpbusd_epi32(acc, d.u, xb[0]); }
};

}  // namespace avx512q
}  // namespace
}  // namespace sparseinfer
