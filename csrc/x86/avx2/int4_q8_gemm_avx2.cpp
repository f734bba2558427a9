// int4 weights x int8 activations (ActMode::int8), AVX2, every batch size: the row-tile loop nest of
// qtile_gemm.h with pmaddubsw / pmaddwd dot products (qtile_ops_avx2.h says why they cannot saturate).
#include "qtile_ops_avx2.h"
#include "sparseinfer/qtile_gemm.h"

namespace sparseinfer {

Status int4_q8_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return qtile::gemm<avx2q::OpsInt4>(a, w, n_begin, n_end);
}

}  // namespace sparseinfer
