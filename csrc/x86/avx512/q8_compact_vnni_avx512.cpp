// 2:4 + int8 weights x int8 activations, batches of 1-2 (memory-bound): the row-tile GEMV of
// qtile_gemm.h on the compact steps (kernels.h, QTileView::compact), which hold only the kept codes
// and a mask: 40 bytes per 64-byte step. vpexpandb puts the kept codes back at their positions (the
// pruned ones get 0), so the integer sums and the fp32 steps are the dense tiles' kernel's, bit for
// bit. This file: -mavx512vnni -mavx512vbmi2 (its row requires kFeatAvx512Vnni and kFeatAvx512Vbmi2).
//
// Xeon (Emerald Rapids, 2 threads, 1 row): 1.13-1.38x the dense steps on SmolLM2 / 4096^2 layers
// rotated through 128 MB (L3), 1.23x over the 210 layers of a SmolLM2 decode step. Hot in L2 the
// expansion (about 2 cycles a step) costs more than the bytes it saves (0.74x), and at 8 batch rows
// per expansion it would run at ~0.8x of the dense tiles, hence 1-2 rows. int4 (two expansions per
// step for 25 % fewer bytes) ran 0.97-1.12x on layers and 0.94-1.0x in the model: not built.
#include "qtile_ops_vnni_avx512.h"
#include "sparseinfer/qtile_gemm.h"

namespace sparseinfer {
namespace {
namespace avx512q {

struct OpsInt8Compact : OpsInt8 {
  static constexpr bool kCompact = true;
  static void decode(const uint8_t* p, Dec& d) {  // mask, 32 codes
    __mmask64 k;
    std::memcpy(&k, p, 8);
    const __m512i kept = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)));
    d.s = _mm512_maskz_expand_epi8(k, kept);
  }
};

}  // namespace avx512q
}  // namespace

// (the register tile's shape matters from 3 rows, which the table never sends here)
Status int8_q8_compact_vnni_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return qtile::gemm<avx512q::Tile<avx512q::OpsInt8Compact, 2, 4>>(a, w, n_begin, n_end);
}

}  // namespace sparseinfer
