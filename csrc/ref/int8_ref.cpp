// int8, scalar: W[n, k] = qweight[n, k] * scale[n, k / g]   (sparseinfer/formats/int8.py)
#include "ref_common.h"

namespace sparseinfer {

Status int8_gemm_scalar(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  float* wrow = scratch<float>(size_t(a.K));
  if (!wrow) return Status::out_of_memory;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* codes = static_cast<const int8_t*>(q.codes) + n * q.kp;
    const float* scale = q.scale + n * q.n_groups;
    // Dequantize row n group by group (columns >= K are padding and skipped).
    for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
      const float s = scale[g];
      const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
      for (int64_t k = k0; k < k1; ++k) wrow[k] = float(codes[k]) * s;
    }
    ref::dense_row_epilogue(a, n, wrow);
  }
  return Status::ok;
}

}  // namespace sparseinfer
