// CSR, scalar: row n holds (col[e], values[e]) for e in crow[n] .. crow[n+1]-1; float values, or
// int8 codes times a per-row scale (sparseinfer/formats/csr.py). Columns were range-checked at
// prepack.
#include "ref_common.h"

namespace sparseinfer {

Status csr_gemm_scalar(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const CSRView& c = w.csr;
  if (c.kind == ValueKind::i4) return Status::unsupported_dtype;
  if (c.kind == ValueKind::i8 && !c.scale) return Status::invalid_argument;
  int64_t widest = 0;
  for (int64_t n = n_begin; n < n_end; ++n) if (c.crow[n + 1] - c.crow[n] > widest) widest = c.crow[n + 1] - c.crow[n];
  float* vals = scratch<float>(size_t(widest));
  if (!vals) return Status::out_of_memory;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t e0 = c.crow[n], count = c.crow[n + 1] - e0;
    if (c.kind == ValueKind::i8) {
      const int8_t* codes = static_cast<const int8_t*>(c.values) + e0;
      const float s = c.scale[n];
      for (int64_t j = 0; j < count; ++j) vals[j] = float(codes[j]) * s;
    } else {
      for (int64_t j = 0; j < count; ++j) vals[j] = load_float_value(c.values, c.kind, e0 + j);
    }
    ref::sparse_row_epilogue(a, n, c.col + e0, vals, count);
  }
  return Status::ok;
}

}  // namespace sparseinfer
