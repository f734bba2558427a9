// 2:4 structured sparsity with int8 / int4 kept values x int8-quantized activations (ActMode::int8),
// AVX2, decode-sized batches (the weight streams from memory once). The fast mode of 2:4+int8 /
// 2:4+int4 (csrc/README.md, "Activation modes"): x is quantized per row and segment by the shared
// quantizer (quantize_act_avx2: q = rne(x 127 / max|x_seg|), the bits of the dense int8 kernels'
// activations), the kept x bytes are gathered in registers and meet the weight codes in pmaddubsw /
// pmaddwd; per segment one fp32 product and one FMA apply weight scale x activation scale to the
// exact integer sum. The building blocks and the layout are in sparse_avx2.h (namespace q8).
//
// Register tiles of 4 weight rows x 1 batch row (2 x 2 for batch 2): four independent rows in flight,
// one 128-bit epilogue per segment for the four outputs, and the 4 rows prefetched as one stream one
// tile ahead. Measured here, 1 thread, 4096 columns: int8 3.3 ns per 64-column block from L3, int4
// 3.6 (the previous layout with 1 x 1 tiles: 4.0 / 4.6: a vpsrlvq per block, an integer division and
// the epilogue per segment); from memory, one thread, 18% / 22% less time. Batch 3 and up: the gemm
// (nm_q8_gemm_avx2.cpp), measured faster from 3 rows here (`sparseinfer calibrate` re-measures it).
//
// Kept values past the last whole 64-column block (K % 64 columns) run in exact fp32 through the
// checked decoder (kept values whose column is >= K are skipped). Weights without a prepacked copy
// (other patterns, groups of fewer than 32 kept values) run the exact kernels instead.
#include "sparse_avx2.h"

namespace sparseinfer {
namespace {

template <bool I4>
void gemv_rows(const GemmArgs& a, const WeightView& w, const sp::q8::Call& c, int64_t n_begin, int64_t n_end) {
  float out[4];
  int64_t n = n_begin;
  if (a.M == 2) {
    for (; n + 2 <= n_end; n += 2) {
      sp::q8::tile<I4, 2, 2, true>(a, w, c, n, 0, out);
      for (int i = 0; i < 4; ++i) store_output(a, i % 2, n + i / 2, out[i]);
    }
  } else {
    for (; n + 4 <= n_end; n += 4)
      for (int64_t m = 0; m < a.M; ++m) {  // the first batch row pulls the 4 rows in; the others hit L1
        if (m == 0)
          sp::q8::tile<I4, 4, 1, true>(a, w, c, n, m, out);
        else
          sp::q8::tile<I4, 4, 1, false>(a, w, c, n, m, out);
        for (int r = 0; r < 4; ++r) store_output(a, m, n + r, out[r]);
      }
  }
  for (; n < n_end; ++n)
    for (int64_t m = 0; m < a.M; ++m) {
      sp::q8::tile<I4, 1, 1, true>(a, w, c, n, m, out);
      store_output(a, m, n, out[0]);
    }
}

}  // namespace

Status nm_q8_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (!sp::q8::usable(a, w)) return nm_gemv_avx2(a, w, n_begin, n_end);  // no prepacked copy: exact
  sp::q8::Call c;
  const Status st = sp::q8::prepare(a, w, c);
  if (st != Status::ok) return st;
  if (w.nm.values == ValueKind::i4)
    gemv_rows<true>(a, w, c, n_begin, n_end);
  else
    gemv_rows<false>(a, w, c, n_begin, n_end);
  return Status::ok;
}

}  // namespace sparseinfer
