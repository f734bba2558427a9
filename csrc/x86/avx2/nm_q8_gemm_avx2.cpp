// 2:4 + int8 / int4 values x int8-quantized activations, AVX2, larger batches: the same arithmetic as
// nm_q8_gemv_avx2.cpp (building blocks in sparse_avx2.h, namespace q8), so every output has the same
// bits whichever of the two kernels computes it. Register tiles of 1 weight row x 4 batch rows: the
// gather control and the decoded codes of a block serve 4 batch rows. Blocks of kRows weight rows
// (L2) meet every 4-row tile of x (4 x K bytes, L1) in turn, so the weight streams from memory once.
#include "sparse_avx2.h"

namespace sparseinfer {
namespace {

// Weight rows per L2 block: 32 rows of 4096 columns are 80 KiB of int8 codes + meta.
constexpr int64_t kRows = 32;
// Batch rows per register tile: 8 (x tile 8 x K bytes, all of L1 at K = 4096) measured no faster.
constexpr int64_t kMT = 4;

template <bool I4, int MT>
void gemm_tile_rows(const GemmArgs& a, const WeightView& w, const sp::q8::Call& c, int64_t n0, int64_t n1,
                    int64_t m0, bool first) {
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    if (first)
      sp::q8::tile<I4, 1, MT, true>(a, w, c, n, m0, out);
    else
      sp::q8::tile<I4, 1, MT, false>(a, w, c, n, m0, out);
    for (int t = 0; t < MT; ++t) store_output(a, m0 + t, n, out[t]);
  }
}

template <bool I4>
void gemm_rows(const GemmArgs& a, const WeightView& w, const sp::q8::Call& c, int64_t n_begin, int64_t n_end) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kRows) {
    const int64_t n1 = n0 + kRows < n_end ? n0 + kRows : n_end;
    for (int64_t m0 = 0; m0 < a.M; m0 += kMT) {
      const bool first = m0 == 0;
      switch (a.M - m0 < kMT ? a.M - m0 : kMT) {
        case 4: gemm_tile_rows<I4, 4>(a, w, c, n0, n1, m0, first); break;
        case 3: gemm_tile_rows<I4, 3>(a, w, c, n0, n1, m0, first); break;
        case 2: gemm_tile_rows<I4, 2>(a, w, c, n0, n1, m0, first); break;
        default: gemm_tile_rows<I4, 1>(a, w, c, n0, n1, m0, first); break;
      }
    }
  }
}

}  // namespace

Status nm_q8_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (!sp::q8::usable(a, w)) return nm_gemm_avx2(a, w, n_begin, n_end);  // no prepacked copy: exact
  sp::q8::Call c;
  const Status st = sp::q8::prepare(a, w, c);
  if (st != Status::ok) return st;
  if (w.nm.values == ValueKind::i4)
    gemm_rows<true>(a, w, c, n_begin, n_end);
  else
    gemm_rows<false>(a, w, c, n_begin, n_end);
  return Status::ok;
}

}  // namespace sparseinfer
