// The decode-step math (sparseinfer/decode.h) compiled with this group's flags; attention in
// 8-float vectors (sparseinfer/attend_simd.h).
#include <immintrin.h>

#include "sparseinfer/decode.h"

namespace sparseinfer {
namespace {

struct Simd {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kHeads = 2;  // value accumulators: 2 heads x 4 vectors of 16 registers
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static float hmax(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static float hsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  // 2^r for integral r in [-126, 127]
  static V pow2(V r) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(r), _mm256_set1_epi32(127)), 23));
  }
  // lane j = the sum of a[j]'s lanes: horizontal pairs twice within 128-bit lanes, then across them
  static V sums(const V* a) {
    const V k0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const V k1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(k0, k1, 0x20), _mm256_permute2f128_ps(k0, k1, 0x31));
  }
};

}  // namespace
}  // namespace sparseinfer

#include "sparseinfer/attend_simd.h"

namespace sparseinfer {

DecodeOps decode_ops_avx2() {
  DecodeOps ops = decode_math::ops();
  ops.attend_part = attend_simd::attend_part<float>;
  ops.attend_part_f16 = attend_simd::attend_part<uint16_t>;
  ops.attend_rows = attend_simd::attend_rows;
  return ops;
}

}  // namespace sparseinfer
