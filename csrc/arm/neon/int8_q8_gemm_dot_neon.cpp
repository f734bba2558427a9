// int8 weights x int8 activations (ActMode::int8), NEON dotprod, every batch size: the row-tile loop
// nest of qtile_gemm.h with sdot dot products (qtile_ops_dot_neon.h). Built with
// -march=armv8.2-a+dotprod; its dispatch row requires kFeatNeonDot (HWCAP_ASIMDDP).
#include "qtile_ops_dot_neon.h"
#include "sparseinfer/qtile_gemm.h"

namespace sparseinfer {

Status int8_q8_gemm_dot_neon(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return qtile::gemm<neonq::OpsInt8>(a, w, n_begin, n_end);
}

}  // namespace sparseinfer
