// Helpers for the AVX2 group (compiled with -mavx2 -mfma -mf16c). Internal linkage only, and no
// std:: templates: see csrc/README.md ("one ISA per file").
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace sparseinfer {
namespace {
namespace avx2 {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 int8 codes at p -> 8 floats.
inline __m256 load_i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// 4 bytes = 8 int4 codes, low nibble first -> 8 int32 lanes: lane i = (bytes >> 4i) & 15, which is
// element 2j (low nibble of byte j) for i = 2j and element 2j+1 for i = 2j+1.
inline __m256i load_u4x8(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int32_t(word)), shifts), _mm256_set1_epi32(0xF));
}

}  // namespace avx2
}  // namespace
}  // namespace sparseinfer
