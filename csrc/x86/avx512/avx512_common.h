// Helpers of the AVX-512 group (compiled with -mavx512f/bw/vl/dq/cd + the AVX2 flags). Internal
// linkage only, and no std:: templates: see csrc/README.md ("one ISA per file").
#pragma once

// GCC 12 warns "'__Y' may be used uninitialized" inside avx512fintrin.h's own setzero / undefined
// helpers (GCC bug 105593, a false positive); the state at the header's include point is what counts.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(SPARSEINFER_AVX512_EMULATION)
// Tests only (tests/test_cpu_avx512.py): scalar stand-ins for the intrinsics this group uses, so
// that these very files run, and are checked, on machines without AVX-512.
#include "avx512_emulation.h"
#else
#include <immintrin.h>
#endif

#include <cstdint>

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace avx512 {

// Lanes [first, last) set.
inline __mmask16 lane_mask(int first, int last) {
  return __mmask16((0xFFFFu >> (16 - last)) & (0xFFFFu << first));
}

// Lanes [first, last) of y[m, n .. n + 16), bias added, rounded once to y's dtype (store_output's
// bits: fp32 adds the bias the same way; bf16 / fp16 go through store_output itself).
inline void store_lanes(const GemmArgs& a, int64_t m, int64_t n, int first, int last, __m512 v) {
  if (a.y_dtype == DType::f32) {
    const __mmask16 k = lane_mask(first, last);  // masked accesses never touch memory outside k
    if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, a.bias + n));
    _mm512_mask_storeu_ps(static_cast<float*>(a.y) + m * a.stride_ym + n, k, v);
    return;
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  for (int l = first; l < last; ++l) store_output(a, m, n + l, lanes[l]);
}

}  // namespace avx512
}  // namespace
}  // namespace sparseinfer
