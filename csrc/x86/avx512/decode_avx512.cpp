// The decode-step math (sparseinfer/decode.h) compiled with this group's flags; attention in
// 16-float vectors (sparseinfer/attend_simd.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC bug 105593: see avx512_common.h
#endif
#include <immintrin.h>

#include "sparseinfer/decode.h"

namespace sparseinfer {
namespace {

struct Simd {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kHeads = 4;  // value accumulators: 4 heads x 4 vectors of 32 registers
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static float hmax(V a) { return _mm512_reduce_max_ps(a); }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  // 2^r for integral r in [-126, 127]
  static V pow2(V r) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(r), _mm512_set1_epi32(127)), 23));
  }
  // lane j = the sum of a[j]'s lanes: pairs of rows, then quads, within 128-bit lanes, then across them
  static V sums(const V* a) {
    V b[8], c[4];
    for (int i = 0; i < 8; ++i)
      b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
      const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
      c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    // c[i]'s 128-bit lane L: rows 4i..4i+3 summed over lane L of each
    const V f0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const V f1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
};

}  // namespace
}  // namespace sparseinfer

#include "sparseinfer/attend_simd.h"

namespace sparseinfer {

DecodeOps decode_ops_avx512() {
  DecodeOps ops = decode_math::ops();
  ops.attend_part = attend_simd::attend_part<float>;
  ops.attend_part_f16 = attend_simd::attend_part<uint16_t>;
  ops.attend_rows = attend_simd::attend_rows;
  return ops;
}

}  // namespace sparseinfer
