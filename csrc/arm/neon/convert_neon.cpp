// Activation conversion, NEON: f32 / bf16 / f16 rows (any row stride) -> contiguous fp32. Bit-exact
// with convert_to_f32_scalar: both widenings are exact (bf16: a shift; f16: fcvtl).
#include <cstring>

#include "neon_common.h"

namespace sparseinfer {

void convert_to_f32_neon(const void* src, DType dtype, int64_t rows, int64_t cols, int64_t src_stride,
                         float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * cols;
    if (dtype == DType::f32) {
      std::memcpy(out, static_cast<const float*>(src) + r * src_stride, size_t(cols) * sizeof(float));
    } else {
      neon::widen_half(static_cast<const uint16_t*>(src) + r * src_stride,
                       dtype == DType::bf16 ? ValueKind::bf16 : ValueKind::f16, cols, out);
    }
  }
}

}  // namespace sparseinfer
