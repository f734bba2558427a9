// CSR x fp32, NEON, every batch size: row n holds (col[e], values[e]) for e in crow[n] .. crow[n+1]-1;
// float values (f32 / bf16 / f16), or int8 codes times a per-row scale (sparseinfer/formats/csr.py).
// Columns were range-checked at prepack.
//
// Per weight row the values are widened / dequantized to fp32 once (code * scale, one rounding, as
// in to_dense()), then each batch-row tile gathers x lane by lane (neon_common.h).
#include "neon_common.h"

namespace sparseinfer {

Status csr_gemm_neon(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const CSRView& c = w.csr;
  if (c.kind == ValueKind::i4) return Status::unsupported_dtype;
  if (c.kind == ValueKind::i8 && !c.scale) return Status::invalid_argument;
  int64_t widest = 0;
  for (int64_t n = n_begin; n < n_end; ++n)
    if (c.crow[n + 1] - c.crow[n] > widest) widest = c.crow[n + 1] - c.crow[n];
  float* buf = scratch<float>(size_t(widest));
  if (!buf) return Status::out_of_memory;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t e0 = c.crow[n], count = c.crow[n + 1] - e0;
    const float* vals = buf;
    if (c.kind == ValueKind::f32) {
      vals = static_cast<const float*>(c.values) + e0;
    } else if (c.kind == ValueKind::i8) {
      const int8_t* codes = static_cast<const int8_t*>(c.values) + e0;
      const float s = c.scale[n];
      int64_t j = 0;
      for (; j + 8 <= count; j += 8) {
        float32x4_t lo, hi;
        neon::load_i8x8(codes + j, lo, hi);
        vst1q_f32(buf + j, vmulq_n_f32(lo, s));
        vst1q_f32(buf + j + 4, vmulq_n_f32(hi, s));
      }
      for (; j < count; ++j) buf[j] = float(codes[j]) * s;
    } else {
      neon::widen_half(static_cast<const uint16_t*>(c.values) + e0, c.kind, count, buf);
    }
    neon::sparse_row(a, n, c.col + e0, vals, count);
  }
  return Status::ok;
}

}  // namespace sparseinfer
