// Activation conversion, scalar: f32 / bf16 / f16 rows (any row stride) -> contiguous fp32.
#include <cstring>

#include "sparseinfer/half.h"
#include "sparseinfer/kernels.h"

namespace sparseinfer {

void convert_to_f32_scalar(const void* src, DType dtype, int64_t rows, int64_t cols, int64_t src_stride,
                           float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * cols;
    if (dtype == DType::f32) {
      std::memcpy(out, static_cast<const float*>(src) + r * src_stride, size_t(cols) * sizeof(float));
      continue;
    }
    const uint16_t* in = static_cast<const uint16_t*>(src) + r * src_stride;
    if (dtype == DType::bf16) {
      for (int64_t k = 0; k < cols; ++k) out[k] = bf16_to_f32(in[k]);
    } else {
      for (int64_t k = 0; k < cols; ++k) out[k] = f16_to_f32(in[k]);
    }
  }
}

}  // namespace sparseinfer
