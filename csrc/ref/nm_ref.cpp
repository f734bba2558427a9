// N:M structured sparsity, scalar, for float (f32 / bf16 / f16), int8 and int4 kept values
// (sparseinfer/formats/nm.py). Kept value j of a row belongs to group j / n and sits at column
// (j / n) * m + idx_j, idx_j being the j-th `bits`-wide field of the row's meta bit stream.
#include "ref_common.h"

namespace sparseinfer {

Status nm_gemm_scalar(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const NMView& nm = w.nm;
  if (nm.n < 1 || nm.m <= nm.n || nm.bits < 1 || nm.bits > 32 || nm.kc < 1) return Status::invalid_argument;
  const bool quantized = nm.values == ValueKind::i8 || nm.values == ValueKind::i4;
  if (quantized && (w.q.group <= 0 || w.q.kp < nm.kc)) return Status::invalid_argument;
  int32_t* cols = scratch<int32_t>(size_t(nm.kc));
  float* vals = scratch<float, 1>(size_t(nm.kc));
  if (!cols || !vals) return Status::out_of_memory;
  for (int64_t n = n_begin; n < n_end; ++n) {
    // Decode row n into (column, value) pairs. Columns >= K are the zero padding of the last
    // group (or corrupt metadata): dropped, so x is never read out of bounds.
    BitReader meta(nm.meta + n * nm.meta_stride);
    int64_t count = 0, base = 0;
    for (int64_t j = 0, in_group = 0; j < nm.kc; ++j) {
      const int64_t col = base + meta.get(nm.bits);
      if (++in_group == nm.n) in_group = 0, base += nm.m;
      if (col >= a.K) continue;
      float v;
      switch (nm.values) {
        case ValueKind::i8: v = dequant_int8(w.q, n, j); break;
        case ValueKind::i4: v = dequant_int4(w.q, n, j); break;
        default: v = load_float_value(nm.fvalues, nm.values, n * nm.kc + j); break;
      }
      cols[count] = int32_t(col);
      vals[count++] = v;
    }
    ref::sparse_row_epilogue(a, n, cols, vals, count);
  }
  return Status::ok;
}

}  // namespace sparseinfer
