// int4 x fp32 activations (exact mode), AVX2 + FMA, small batches: W = (code - zero) * scale per
// group, low nibble = even k. Loop nest: quant_gemv_avx2.h (4 weight rows per pass, codes decoded
// once per batch-row block).
//
// Decode of 32 codes (16 bytes): and / srli split the nibbles, the zero point is subtracted in int8
// (exact: -15..15), then vpmovsxbd + cvtdq2ps. Putting the nibbles back in k order costs two
// unpacks per 32 codes (~10% of this decode-bound loop), so when the groups are multiples of 32
// each thread first copies x with every 32-block reordered evens-then-odds (once per call, M x K
// floats of grow-only scratch) and the codes stay split; otherwise (odd groups, no memory) they are
// interleaved back.
#include "quant_gemv_avx2.h"

namespace sparseinfer {

namespace {

// x with each whole 32-block of a row reordered as k = 0, 2, .., 30, 1, 3, .., 31 (nullptr: none).
struct SplitX {
  const float* x = nullptr;
  int64_t stride = 0;
};

template <bool kSplit>
struct Int4Rows {
  static constexpr int kStep = 32;
  const uint8_t* b[avx2::kGemvRows];
  const uint8_t* zero[avx2::kGemvRows];
  __m128i z[avx2::kGemvRows];
  int zs[avx2::kGemvRows];
  SplitX split;
  Int4Rows(const QuantView& q, int64_t n, int rows, const SplitX& sx) : split(sx) {
    for (int r = 0; r < rows; ++r) {
      b[r] = static_cast<const uint8_t*>(q.codes) + (n + r) * (q.kp / 2);
      zero[r] = q.zero ? q.zero + (n + r) * q.n_groups : nullptr;
    }
  }
  void begin_group(int r, int64_t g) {
    zs[r] = zero[r] ? zero[r][g] : 8;
    z[r] = _mm_set1_epi8(char(zs[r]));
  }
  bool aligned(int64_t k) const { return (k & 1) == 0; }
  void step(int r, int64_t k, __m256* w) const {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[r] + (k >> 1)));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    // kSplit: c0 = even k, c1 = odd k (the order of SplitX); else c0 = k .. k + 15, c1 = k + 16 ..
    const __m128i c0 = _mm_sub_epi8(kSplit ? lo : _mm_unpacklo_epi8(lo, hi), z[r]);
    const __m128i c1 = _mm_sub_epi8(kSplit ? hi : _mm_unpackhi_epi8(lo, hi), z[r]);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c0));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c0, c0)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c1));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c1, c1)));
  }
  float code(int r, int64_t k) const { return float(((b[r][k >> 1] >> ((k & 1) * 4)) & 0xF) - zs[r]); }
  const float* step_x(const GemmArgs& a, int64_t m) const {
    return kSplit ? split.x + m * split.stride : a.x + m * a.stride_xm;
  }
};

}  // namespace

Status int4_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || (q.kp & 1) || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  // Main steps then start at multiples of 32 and only cover whole 32-blocks below K.
  const int64_t kb = a.K / 32 * 32;
  float* xs = q.group % 32 == 0 && kb > 0 ? scratch<float, 3>(size_t(a.M) * size_t(kb)) : nullptr;
  if (!xs) return avx2::gemv<Int4Rows<false>>(a, q, n_begin, n_end, SplitX{});
  for (int64_t m = 0; m < a.M; ++m) {
    const float* x = a.x + m * a.stride_xm;
    float* d = xs + m * kb;
    for (int64_t k = 0; k < kb; k += 32)
      for (int j = 0; j < 16; ++j) d[k + j] = x[k + 2 * j], d[k + 16 + j] = x[k + 2 * j + 1];
  }
  return avx2::gemv<Int4Rows<true>>(a, q, n_begin, n_end, SplitX{xs, kb});
}

}  // namespace sparseinfer
