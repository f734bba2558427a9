// int8 weights x int8 activations (ActMode::int8), AVX-512 VNNI (this file: -mavx512vnni; its dispatch
// rows require kFeatAvx512Vnni), every batch size: the row-tile loop nest of qtile_gemm.h with one
// vpdpbusd per 16 rows x 4 codes (qtile_ops_vnni_avx512.h). Batch 1-2 stream 4 row tiles (64 rows)
// per pass over K; larger batches an 8 x 48 register tile (8 batch rows x 3 row tiles) or, measured
// per layer shape, a 4 x 64 one (qtile_ops_vnni_avx512.h says why both).
#include "qtile_ops_vnni_avx512.h"
#include "sparseinfer/qtile_gemm.h"

namespace sparseinfer {

Status int8_q8_gemm_vnni_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return qtile::gemm<avx512q::Tile<avx512q::OpsInt8, 8, 3>>(a, w, n_begin, n_end);
}

Status int8_q8_gemm_vnni4x4_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return qtile::gemm<avx512q::Tile<avx512q::OpsInt8, 4, 4>>(a, w, n_begin, n_end);
}

}  // namespace sparseinfer
