// 16 x 16 fp32 transpose in zmm registers, shared by the panel GEMM (panels from rows) and the sparse
// xT GEMM (output tiles from batch-row-major accumulators). Native builds only: the AVX-512 emulation
// of tests/native/ has no 128-bit-lane shuffles, so files that include this run natively only.
#pragma once

#include "avx512_common.h"

namespace sparseinfer {
namespace {
namespace avx512 {

// In-place 16 x 16 transpose: v[k] lane j <- v[j] lane k. unpack (pairs), shuffle (quads inside
// 128-bit lanes), then two rounds of 128-bit lane shuffles: 64 shuffles per 256 floats.
inline void transpose16x16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // v[4i + c]: rows 4i..4i+3 at k = c, 4 + c, 8 + c, 12 + c (one per 128-bit lane)
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    v[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    v[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    v[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 t0 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88), t1 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xDD);
    const __m512 t2 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88), t3 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(t0, t2, 0x88);       // k = c
    t[4 + c] = _mm512_shuffle_f32x4(t1, t3, 0x88);   // k = 4 + c
    t[8 + c] = _mm512_shuffle_f32x4(t0, t2, 0xDD);   // k = 8 + c
    t[12 + c] = _mm512_shuffle_f32x4(t1, t3, 0xDD);  // k = 12 + c
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

}  // namespace avx512
}  // namespace
}  // namespace sparseinfer
