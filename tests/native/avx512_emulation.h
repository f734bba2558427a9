// Scalar stand-ins for the AVX-512 intrinsics used by csrc/x86/avx512/, for tests only: compiled
// with -DSPARSEINFER_AVX512_EMULATION (and without <immintrin.h>), the kernel sources run on any
// x86-64 or other CPU and are compared with the scalar reference (tests/test_cpu_avx512.py).
// Each function follows Intel's pseudo-code for the instruction; only what the kernels use.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __m512i { alignas(64) uint8_t b[64]; };
struct __m512 { alignas(64) float f[16]; };
struct __m128i { alignas(16) uint8_t b[16]; };
struct __m256i { alignas(32) uint8_t b[32]; };
typedef uint16_t __mmask16;
typedef uint64_t __mmask64;

namespace emu {
inline int32_t i32(const __m512i& v, int i) { int32_t x; std::memcpy(&x, v.b + 4 * i, 4); return x; }
inline void set_i32(__m512i& v, int i, int32_t x) { std::memcpy(v.b + 4 * i, &x, 4); }
template <class F> inline __m512i map32(const __m512i& a, const __m512i& b, F f) {
  __m512i r;
  for (int i = 0; i < 16; ++i) set_i32(r, i, f(i32(a, i), i32(b, i)));
  return r;
}
}  // namespace emu

// -- integer --------------------------------------------------------------------------------------
inline __m512i _mm512_setzero_si512() { __m512i r; std::memset(r.b, 0, 64); return r; }
inline __m512i _mm512_set1_epi32(int32_t x) { __m512i r; for (int i = 0; i < 16; ++i) emu::set_i32(r, i, x); return r; }
inline __m512i _mm512_set1_epi8(char x) { __m512i r; std::memset(r.b, (unsigned char)x, 64); return r; }
inline __m512i _mm512_set_epi32(int e15, int e14, int e13, int e12, int e11, int e10, int e9, int e8, int e7, int e6,
                                int e5, int e4, int e3, int e2, int e1, int e0) {
  const int e[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
  __m512i r;
  for (int i = 0; i < 16; ++i) emu::set_i32(r, i, e[i]);
  return r;
}
inline __m512i _mm512_loadu_si512(const void* p) { __m512i r; std::memcpy(r.b, p, 64); return r; }
inline __m512i _mm512_and_si512(__m512i a, __m512i b) { for (int i = 0; i < 64; ++i) a.b[i] &= b.b[i]; return a; }
inline __m512i _mm512_xor_si512(__m512i a, __m512i b) { for (int i = 0; i < 64; ++i) a.b[i] ^= b.b[i]; return a; }
inline __m512i _mm512_srli_epi16(__m512i a, unsigned n) {
  for (int i = 0; i < 32; ++i) {
    uint16_t h;
    std::memcpy(&h, a.b + 2 * i, 2);
    h = n > 15 ? 0 : uint16_t(h >> n);
    std::memcpy(a.b + 2 * i, &h, 2);
  }
  return a;
}
inline __m512i _mm512_srli_epi32(__m512i a, unsigned n) {
  return emu::map32(a, a, [n](int32_t x, int32_t) { return n > 31 ? 0 : int32_t(uint32_t(x) >> n); });
}
inline __m512i _mm512_srlv_epi32(__m512i a, __m512i c) {
  return emu::map32(a, c, [](int32_t x, int32_t n) { return uint32_t(n) > 31 ? 0 : int32_t(uint32_t(x) >> n); });
}
inline __m512i _mm512_sub_epi32(__m512i a, __m512i b) {
  return emu::map32(a, b, [](int32_t x, int32_t y) { return int32_t(uint32_t(x) - uint32_t(y)); });
}
inline __m512i _mm512_mullo_epi32(__m512i a, __m512i b) {
  return emu::map32(a, b, [](int32_t x, int32_t y) { return int32_t(uint32_t(x) * uint32_t(y)); });
}
// VPDPBUSD: per 32-bit lane, src + the 4 products of unsigned bytes of a and signed bytes of b,
// wrapping (no saturation).
inline __m512i _mm512_dpbusd_epi32(__m512i src, __m512i a, __m512i b) {
  __m512i r;
  for (int i = 0; i < 16; ++i) {
    uint32_t s = uint32_t(emu::i32(src, i));
    for (int j = 0; j < 4; ++j) s += uint32_t(int32_t(a.b[4 * i + j]) * int32_t(int8_t(b.b[4 * i + j])));
    emu::set_i32(r, i, int32_t(s));
  }
  return r;
}
// VPEXPANDB (VBMI2), zero-masking: byte i, for each set bit i of k in order, takes the next byte of a
// (from a's byte 0); the others become 0.
inline __m512i _mm512_maskz_expand_epi8(__mmask64 k, __m512i a) {
  __m512i r = _mm512_setzero_si512();
  for (int i = 0, j = 0; i < 64; ++i)
    if ((k >> i) & 1) r.b[i] = a.b[j++];
  return r;
}
inline __m256i _mm256_loadu_si256(const __m256i* p) { __m256i r; std::memcpy(r.b, p, 32); return r; }
// The upper half is undefined: garbage here, so that a kernel that reads it fails its test.
inline __m512i _mm512_castsi256_si512(__m256i a) {
  __m512i r;
  std::memset(r.b + 32, 0xA5, 32);
  std::memcpy(r.b, a.b, 32);
  return r;
}
inline __m128i _mm_loadu_si128(const __m128i* p) { __m128i r; std::memcpy(r.b, p, 16); return r; }
inline __m128i _mm_maskz_loadu_epi8(__mmask16 k, const void* p) {
  __m128i r;
  for (int i = 0; i < 16; ++i) r.b[i] = (k >> i) & 1 ? static_cast<const uint8_t*>(p)[i] : 0;  // masked: not read
  return r;
}
inline __m128i _mm_unpacklo_epi8(__m128i a, __m128i b) {
  __m128i r;
  for (int i = 0; i < 8; ++i) r.b[2 * i] = a.b[i], r.b[2 * i + 1] = b.b[i];
  return r;
}
inline __m512i _mm512_cvtepu8_epi32(__m128i a) { __m512i r; for (int i = 0; i < 16; ++i) emu::set_i32(r, i, a.b[i]); return r; }
inline __m512i _mm512_cvtepi8_epi32(__m128i a) {
  __m512i r;
  for (int i = 0; i < 16; ++i) emu::set_i32(r, i, int8_t(a.b[i]));
  return r;
}

// -- float ------------------------------------------------------------------------------------------
inline __m512 _mm512_setzero_ps() { __m512 r; for (float& f : r.f) f = 0.f; return r; }
inline __m512 _mm512_set1_ps(float x) { __m512 r; for (float& f : r.f) f = x; return r; }
inline __m512 _mm512_loadu_ps(const void* p) { __m512 r; std::memcpy(r.f, p, 64); return r; }
inline void _mm512_store_ps(void* p, __m512 a) { std::memcpy(p, a.f, 64); }
inline void _mm512_storeu_ps(void* p, __m512 a) { std::memcpy(p, a.f, 64); }
inline __m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = (k >> i) & 1 ? static_cast<const float*>(p)[i] : 0.f;
  return r;
}
inline void _mm512_mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) static_cast<float*>(p)[i] = a.f[i];
}
inline __m512 _mm512_add_ps(__m512 a, __m512 b) { for (int i = 0; i < 16; ++i) a.f[i] += b.f[i]; return a; }
inline __m512 _mm512_mul_ps(__m512 a, __m512 b) { for (int i = 0; i < 16; ++i) a.f[i] *= b.f[i]; return a; }
inline __m512 _mm512_sub_ps(__m512 a, __m512 b) { for (int i = 0; i < 16; ++i) a.f[i] -= b.f[i]; return a; }
inline __m512 _mm512_set_ps(float e15, float e14, float e13, float e12, float e11, float e10, float e9, float e8,
                            float e7, float e6, float e5, float e4, float e3, float e2, float e1, float e0) {
  const float e[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = e[i];
  return r;
}
// vpermps: lane i = table[idx lane i & 15] (the instruction reads only the index's low 4 bits)
inline __m512 _mm512_permutexvar_ps(__m512i idx, __m512 table) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = table.f[emu::i32(idx, i) & 15];
  return r;
}
inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
  for (int i = 0; i < 16; ++i) a.f[i] = std::fmaf(a.f[i], b.f[i], c.f[i]);
  return a;
}
inline __m512 _mm512_cvtepi32_ps(__m512i a) { __m512 r; for (int i = 0; i < 16; ++i) r.f[i] = float(emu::i32(a, i)); return r; }
inline float _mm512_reduce_add_ps(__m512 a) {  // a tree, as GCC's expansion (halves, then pairs)
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a.f[i] += a.f[i + w];
  return a.f[0];
}
