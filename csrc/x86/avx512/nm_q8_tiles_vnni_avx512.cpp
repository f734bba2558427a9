// 2:4 + int8 / int4 values x int8 activations (ActMode::int8), AVX-512 VNNI, GEMM batch sizes: the
// weight made dense on row tiles once (ref/qtile_ref.cpp, build_nm_qtiles: pruned positions add
// exactly nothing) and run by the int8 / int4 row-tile kernels. Twice the multiply-adds of the kept
// values, but at the vpdpbusd rate with no gather; the activation segments and the per-segment fp32
// steps are those of nm_q8_*_avx2, so either path gives the same bits for an output. A weight whose
// layout has no such tiles (bindings.cpp builds none) is served by nm_q8_gemm_avx2 (its own copy, or exact).
// No VNNI instructions here (the kernels it calls are in -mavx512vnni files); its rows require the feature.
#include "sparseinfer/kernels.h"

namespace sparseinfer {

// x86/avx2/nm_q8_gemm_avx2.cpp (kernels.h declares it for the AVX2 group only; this group is never
// built without that one: its flags include the AVX2 group's).
Status nm_q8_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);

Status nm_q8_tiles_vnni_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (!w.qt.codes || !a.qx.q) return nm_q8_gemm_avx2(a, w, n_begin, n_end);
  return w.qt.bits == 4 ? int4_q8_gemm_vnni_avx512(a, w, n_begin, n_end) : int8_q8_gemm_vnni_avx512(a, w, n_begin, n_end);
}

}  // namespace sparseinfer
