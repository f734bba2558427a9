// Activation quantization for ActMode::int8, AVX2: the bits of quantize_act_scalar
// (ref/qtile_ref.cpp), 32 elements at a time. Per segment: amax = max |x|, q = round-to-nearest-
// even(clamp(x * (127 / amax), -127, 127)), scale = amax / 127, sum = sum of q; a segment with an
// inf or NaN gets scale NaN and q = 0, one whose 127 / amax overflows scale 0 and q = 0. Exact
// max, one rounding per product and the same clamp make every step identical to the scalar one.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "sparseinfer/kernels.h"

namespace sparseinfer {

namespace {

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline __m256i quant8(const float* x, __m256 inv) {
  const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x), inv);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f)));
}

inline int32_t quant1(float x, float inv) {
  float v = x * inv;
  v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);
  return int32_t(std::nearbyint(v));
}

}  // namespace

// Two passes per row: every segment's max |x| (into scale[], as the pass's scratch), then every
// segment's codes. Segment by segment, each waited on its own chain (max, horizontal max, division,
// codes, horizontal sum): 0.42-0.44 ns an element on a Xeon core at 128-element segments, against
// 0.25 ns this way (the segments' chains overlap).
void quantize_act_avx2(const float* x, int64_t rows, int64_t K, int64_t stride_x, const QTileView& t, int8_t* q,
                       float* scale, int32_t* sum, uint8_t flip) {
  const int64_t row_q = t.nseg * t.seg_pad;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(3.4028235e38f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i vflip = _mm256_set1_epi8(char(flip));
  for (int64_t m = 0; m < rows; ++m) {
    const float* xr = x + m * stride_x;
    float* amaxes = scale + m * t.nseg;
    // -- max |x| of every segment (NaN where it holds an inf or NaN) ------------------------------
    for (int64_t s = 0; s < t.nseg; ++s) {
      const float* xs = xr + s * t.seg;
      const int64_t len = (s * t.seg + t.seg < K ? t.seg : K - s * t.seg);
      __m256 vmax0 = _mm256_setzero_ps(), vmax1 = _mm256_setzero_ps();
      __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
      int64_t k = 0;
      for (; k + 16 <= len; k += 16) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xs + k), abs_mask);
        const __m256 b = _mm256_and_ps(_mm256_loadu_ps(xs + k + 8), abs_mask);
        vmax0 = _mm256_max_ps(vmax0, a), vmax1 = _mm256_max_ps(vmax1, b);
        ok = _mm256_and_ps(ok, _mm256_and_ps(_mm256_cmp_ps(a, fmax, _CMP_LE_OQ),  // false for inf and NaN
                                             _mm256_cmp_ps(b, fmax, _CMP_LE_OQ)));
      }
      for (; k + 8 <= len; k += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xs + k), abs_mask);
        vmax0 = _mm256_max_ps(vmax0, a);
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, fmax, _CMP_LE_OQ));
      }
      float amax = hmax(_mm256_max_ps(vmax0, vmax1));
      bool finite = _mm256_movemask_ps(ok) == 0xFF;
      for (; k < len; ++k) {
        const float v = std::fabs(xs[k]);
        finite = finite && v <= 3.4028235e38f;
        amax = v > amax ? v : amax;
      }
      amaxes[s] = finite ? amax : std::nanf("");
    }
    // -- codes: 32 per iteration (4 x 8 int32 packed to 32 int8 in order), then 1 by 1 ------------
    for (int64_t s = 0; s < t.nseg; ++s) {
      int8_t* qs = q + m * row_q + s * t.seg_pad;
      const float* xs = xr + s * t.seg;
      const int64_t len = (s * t.seg + t.seg < K ? t.seg : K - s * t.seg);
      const float amax = amaxes[s], inv = 127.f / amax;
      if (!(inv <= 3.4028235e38f)) {  // amax 0 or below 127 / FLT_MAX (scale 0), or not finite (scale NaN)
        std::memset(qs, flip, size_t(t.seg_pad));
        scale[m * t.nseg + s] = amax >= 0.f ? 0.f : amax;
        sum[m * t.nseg + s] = 0;
        continue;
      }
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i vsum = _mm256_setzero_si256();
      int64_t k = 0;
      for (; k + 32 <= len; k += 32) {
        const __m256i a = quant8(xs + k, vinv), b = quant8(xs + k + 8, vinv), c = quant8(xs + k + 16, vinv),
                      d = quant8(xs + k + 24, vinv);
        vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs + k),
                            _mm256_xor_si256(_mm256_permutevar8x32_epi32(bytes, order), vflip));
      }
      int32_t total = hsum(vsum);
      for (; k < len; ++k) {
        const int32_t c = quant1(xs[k], inv);
        qs[k] = int8_t(uint8_t(c) ^ flip);
        total += c;
      }
      if (len < t.seg_pad) std::memset(qs + len, flip, size_t(t.seg_pad - len));  // the padding
      scale[m * t.nseg + s] = amax / 127.f;
      sum[m * t.nseg + s] = total;
    }
  }
}

}  // namespace sparseinfer
