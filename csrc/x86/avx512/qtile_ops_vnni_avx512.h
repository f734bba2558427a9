// Vector operations of the AVX-512 VNNI int8-activation kernels (qtile_gemm.h): 16 lanes = the 16
// rows of one row tile, one vpdpbusd per 4-byte activation group. vpdpbusd multiplies unsigned
// bytes (its second operand) by signed bytes (its third) and adds each lane's 4 products to an
// int32 without intermediate saturation, so:
//   int4: the codes 0..15 are the unsigned operand as they are; the activations the signed one;
//   int8: codes are signed, so the activations take the unsigned side as x + 128 (QActView::qu)
//         and the segment epilogue subtracts 128 * sum(code) per row (QTileView::wsum128), exactly,
//         in int32 (kOffsetX).
// Include only from files built with -mavx512vnni.
#pragma once

#include <cstring>

#include "avx512_common.h"

namespace sparseinfer {
namespace {
namespace avx512q {

// acc + vpdpbusd(u, s), in inline assembly: GCC 12 keeps the intrinsic's accumulator out of place
// and copies every accumulator of the register tile twice per K step (24 vmovdqa per 12 vpdpbusd
// in the 6 x 2 tile, 1.16x the time); the "+v" operand pins it in one register.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
#ifdef SPARSEINFER_AVX512_EMULATION  // tests/native: the emulated intrinsic, no assembly
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
#endif
}

struct OpsBase {
  static constexpr bool kCompact = false;  // QTileView::codes (qtile_gemm.h)
  static constexpr bool kOffsetX = false;  // x as it is (QActView::q)
  static constexpr int L = 16;
  using VI = __m512i;
  using VF = __m512;
  using XB = __m512i;
  static VI zero_i() { return _mm512_setzero_si512(); }
  static VF zero_f() { return _mm512_setzero_ps(); }
  static XB bcast(const int8_t* x4) {
    int32_t v;
    std::memcpy(&v, x4, 4);
    return _mm512_set1_epi32(v);
  }
  static VI sub_uniform(VI acc, int32_t v) { return _mm512_sub_epi32(acc, _mm512_set1_epi32(v)); }
  static VI sub_lanes(VI acc, const int32_t* v) { return _mm512_sub_epi32(acc, _mm512_loadu_si512(v)); }
  static VI sub_rows(VI acc, const uint8_t* zero, int32_t sum) {
    const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero)));
    return _mm512_sub_epi32(acc, _mm512_mullo_epi32(z, _mm512_set1_epi32(sum)));
  }
  static VF loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, VF v) { _mm512_storeu_ps(p, v); }
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
  struct Dec {
    __m512i lo, hi;  // codes of elements k..k+3 / k+4..k+7 of the 16 rows
  };
  static void decode(const uint8_t* p, Dec& d) {
    const __m512i v = _mm512_loadu_si512(p), m = _mm512_set1_epi8(0x0F);
    d.lo = _mm512_and_si512(v, m);
    d.hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  }
  static VI dot(VI acc, const Dec& d, const XB* xb) { return dpbusd(dpbusd(acc, d.lo, xb[0]), d.hi, xb[1]); }
};

struct OpsInt8 : OpsBase {
  static constexpr int kBits = 8;
  // vpdpbusd multiplies unsigned by signed bytes: the activations take the unsigned side as x + 128
  // (QActView::qu, made by the driver), the codes the signed side as they are, and the segment
  // epilogue subtracts 128 x the row's code sum (QTileView::wsum128). Offsetting the codes instead
  // cost a vpxord per row tile per step on vpdpbusd's ports: 1.07-1.13x slower on one Xeon core.
  static constexpr bool kOffsetX = true;
  struct Dec {
    __m512i s;  // codes of elements k..k+3 of the 16 rows
  };
  static void decode(const uint8_t* p, Dec& d) { d.s = _mm512_loadu_si512(p); }
  static VI dot(VI acc, const Dec& d, const XB* xb) { return dpbusd(acc, xb[0], d.s); }
};

// The register tile (qtile_gemm.h: kMaxMR batch rows x R row tiles of 16 outputs) for batches of 3
// or more rows; batches of 1-2 (memory-bound) stream 4 row tiles at once in both. Two tiles, because
// the best one differs by core (2 threads, int8 act=int8):
//   8 x 3: 24 int32 sums, 3 decoded tiles and a broadcast live in the K loop, 24 vpdpbusd per 3 code
//          loads (from L2) and 8 broadcasts. The table's tile. Xeon (Emerald Rapids, AMX not exposed):
//          1.07-1.18x the 4 x 4 tile's speed on 4096^2 at M = 64, 1.07-1.14x at M = 256, 1.08-1.17x
//          on 1536 x 384 at M = 64, int4 alike; 0.93-1.05x on 384^2 at M = 128.
//   4 x 4: 16 sums, 16 vpdpbusd per 4 code loads and 4 broadcasts. On Zen 5 (two 512-bit vpdpbusd
//          a cycle, fast L2 streams) 4096^2 at M = 64 ran 1.06-1.1x the 6 x 2 tile's speed, with 8 x 3
//          about as fast as 6 x 2; activations as {1to16} memory operands of vpdpbusd issued at 0.8x
//          the register form's rate there. A measured candidate (the routes time it per layer shape).
template <class Ops, int MR, int R>
struct Tile : Ops {
  static constexpr int kMaxMR = MR;
  static constexpr int kMaxR = 4;
  static int tiles_for(int64_t M) { return M <= 2 ? 4 : R; }
};

}  // namespace avx512q
}  // namespace
}  // namespace sparseinfer
