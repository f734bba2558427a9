// Activation conversion, AVX2 + F16C: bf16 / fp16 rows -> fp32, 8 at a time (exact, as scalar).
#include <immintrin.h>

#include <cstring>

#include "sparseinfer/half.h"
#include "sparseinfer/kernels.h"

namespace sparseinfer {

void convert_to_f32_avx2(const void* src, DType dtype, int64_t rows, int64_t cols, int64_t src_stride, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * cols;
    if (dtype == DType::f32) {
      std::memcpy(out, static_cast<const float*>(src) + r * src_stride, size_t(cols) * sizeof(float));
      continue;
    }
    const uint16_t* in = static_cast<const uint16_t*>(src) + r * src_stride;
    int64_t k = 0;
    if (dtype == DType::bf16) {
      for (; k + 8 <= cols; k += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + k)));
        _mm256_storeu_ps(out + k, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
      }
      for (; k < cols; ++k) out[k] = bf16_to_f32(in[k]);
    } else {
      for (; k + 8 <= cols; k += 8)
        _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + k))));
      for (; k < cols; ++k) out[k] = f16_to_f32(in[k]);
    }
  }
}

}  // namespace sparseinfer
