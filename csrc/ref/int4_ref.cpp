// int4, scalar: W[n, k] = (code(n, k) - zero[n, k / g]) * scale[n, k / g], code = nibble k of
// row n, low nibble = even k; zero = 8 when symmetric (sparseinfer/formats/int4.py)
#include "ref_common.h"

namespace sparseinfer {

Status int4_gemm_scalar(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || (q.kp & 1) || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  float* wrow = scratch<float>(size_t(a.K));
  if (!wrow) return Status::out_of_memory;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2);
    const float* scale = q.scale + n * q.n_groups;
    const uint8_t* zero = q.zero ? q.zero + n * q.n_groups : nullptr;
    for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
      const float s = scale[g];
      const int z = zero ? zero[g] : 8;
      const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
      for (int64_t k = k0; k < k1; ++k) {
        const int code = (bytes[k >> 1] >> ((k & 1) * 4)) & 0xF;
        wrow[k] = float(code - z) * s;  // code - z is a small integer: exact, as in to_dense()
      }
    }
    ref::dense_row_epilogue(a, n, wrow);
  }
  return Status::ok;
}

}  // namespace sparseinfer
