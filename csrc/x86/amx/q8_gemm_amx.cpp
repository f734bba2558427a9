// int8 / int4 weights x int8 activations (ActMode::int8) on AMX tiles (Sapphire Rapids and later:
// this group is built with -mamx-tile -mamx-int8; its dispatch rows require kFeatAmxInt8, which
// dispatch.cpp sets only after Linux granted the process the tile state).
//
// The row tiles of qtile_gemm.h (QTileView) are already AMX's B layout: one 64-byte row of 16
// output rows x 4 consecutive codes per K quad, so 16 quads (1 KB) of a tile are one 16 x 64 B
// tile. Per block of 32 batch rows x 32 outputs (2 A tiles x 2 B tiles -> 4 int32 C tiles, all 8
// tile registers), each K step of 64 is one tdpbssd (int8 codes, signed x signed) or tdpbsud (int4
// codes 0..15, unsigned) per C tile: 16 x 16 x 64 multiply-adds, where vpdpbusd does 16 x 4.
// At the end of each activation segment the C tiles go to memory and the epilogue of the VNNI
// kernel (the zero-point term, one fp32 FMA with scale_w * scale_x) runs on them: the integer sums
// are exact, so the output has the scalar kernel's bits.
//
// Operands that are not whole tiles are copied into zero-padded scratch once per call: the
// activations when M is not a multiple of 16 or a segment not of 64, the codes of a 16-output tile
// when a segment is not a multiple of 64 (int8) and always for int4 (nibbles unpacked to bytes).
// Zeros add nothing to the dot products.
#include <immintrin.h>

#include <cstring>

#include "../avx512/qtile_ops_vnni_avx512.h"

namespace sparseinfer {
namespace {

constexpr int kTileK = 64;  // int8 elements per A tile row / per 16 B tile rows
constexpr int64_t kChunkK = 512;  // K elements per chunk (see gemm)

// ldtilecfg's 64-byte operand, palette 1: every tile 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int i = 0; i < 8; ++i) colsb[i] = kTileK, rows[i] = 16;
  }
};

// The epilogue of segment s for the C tiles stored in c (the VNNI kernel's, qtile_gemm.h): the
// zero-point term in int32, then one fp32 FMA with scale_w * scale_x per output.
template <int kBits, int MA, int NB>
inline void epilogue(const GemmArgs& a, const QTileView& t, const int32_t (*c)[16][16], int64_t s, int64_t tile0,
                     int64_t m0, float (*facc)[32]) {
  const int64_t g = s / t.segs_per_group;
  __m512 sw[NB];
  for (int j = 0; j < NB; ++j) sw[j] = _mm512_loadu_ps(t.scale + ((tile0 + j) * t.n_groups + g) * kQTileRows);
  const int rows = a.M - m0 < MA * 16 ? int(a.M - m0) : MA * 16;
  for (int row = 0; row < rows; ++row) {
    const int64_t cell = (m0 + row) * t.nseg + s;
    const float sx = a.qx.scale[cell];
    const int32_t sum = a.qx.sum[cell];
    for (int j = 0; j < NB; ++j) {
      __m512i acc = _mm512_load_si512(c[(row >> 4) * NB + j][row & 15]);
      if constexpr (kBits == 4) {
        acc = t.zero ? avx512q::OpsBase::sub_rows(acc, t.zero + ((tile0 + j) * t.n_groups + g) * kQTileRows, sum)
                     : avx512q::OpsBase::sub_uniform(acc, 8 * sum);
      }
      float* f = facc[row] + j * 16;
      _mm512_store_ps(f, avx512q::OpsBase::fma_seg(acc, sw[j], sx, _mm512_load_ps(f)));
    }
  }
}

// Segments [s0, s1) of y[m0 .. m0 + 16 MA, tiles tile0 .. tile0 + NB], added into facc (rows of 32
// floats). Tile registers: C(i, j) = tmm(2i + j), A(i) = tmm(4 + i), B(j) = tmm(6 + j). The epilogue of
// segment s - 1 is issued after the tile products of segment s, which do not depend on it, so that the
// vector units work on it while the tile unit multiplies.
template <int kBits, int MA, int NB>
void block(const GemmArgs& a, const QTileView& t, const int8_t* A, int64_t a_tile, const uint8_t* const* B,
           int64_t b_seg, int64_t ksteps, int64_t tile0, int64_t m0, int64_t s0, int64_t s1, float (*facc)[32]) {
  alignas(64) int32_t c[2][MA * NB][16][16];
  for (int64_t s = s0; s < s1; ++s) {
    _tile_zero(0);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (MA > 1) _tile_zero(2);
    if constexpr (MA > 1 && NB > 1) _tile_zero(3);
    for (int64_t kk = 0; kk < ksteps; ++kk) {
      const int8_t* ap = A + (s * ksteps + kk) * 1024;
      _tile_loadd(4, ap, 64);
      if constexpr (MA > 1) _tile_loadd(5, ap + a_tile, 64);
      _tile_loadd(6, B[0] + s * b_seg + kk * 1024, 64);
      if constexpr (NB > 1) _tile_loadd(7, B[1] + s * b_seg + kk * 1024, 64);
      if constexpr (kBits == 8) {
        _tile_dpbssd(0, 4, 6);
        if constexpr (NB > 1) _tile_dpbssd(1, 4, 7);
        if constexpr (MA > 1) _tile_dpbssd(2, 5, 6);
        if constexpr (MA > 1 && NB > 1) _tile_dpbssd(3, 5, 7);
      } else {
        _tile_dpbsud(0, 4, 6);
        if constexpr (NB > 1) _tile_dpbsud(1, 4, 7);
        if constexpr (MA > 1) _tile_dpbsud(2, 5, 6);
        if constexpr (MA > 1 && NB > 1) _tile_dpbsud(3, 5, 7);
      }
    }
    if (s > s0) epilogue<kBits, MA, NB>(a, t, c[(s - 1) & 1], s - 1, tile0, m0, facc);
    auto& cs = c[s & 1];
    _tile_stored(0, cs[0], 64);
    if constexpr (NB > 1) _tile_stored(1, cs[1], 64);
    if constexpr (MA > 1) _tile_stored(2, cs[NB], 64);
    if constexpr (MA > 1 && NB > 1) _tile_stored(3, cs[NB + 1], 64);
  }
  epilogue<kBits, MA, NB>(a, t, c[(s1 - 1) & 1], s1 - 1, tile0, m0, facc);
}

template <int kBits, int MA>
void block_nb(int nb, const GemmArgs& a, const QTileView& t, const int8_t* A, int64_t a_tile,
              const uint8_t* const* B, int64_t b_seg, int64_t ksteps, int64_t tile0, int64_t m0, int64_t s0,
              int64_t s1, float (*facc)[32]) {
  if (nb > 1) return block<kBits, MA, 2>(a, t, A, a_tile, B, b_seg, ksteps, tile0, m0, s0, s1, facc);
  block<kBits, MA, 1>(a, t, A, a_tile, B, b_seg, ksteps, tile0, m0, s0, s1, facc);
}

// The codes of row tile `tile` as whole B tiles: [nseg][segp / 4 quads][64 bytes], zero-padded.
template <int kBits>
void unpack_tile(const QTileView& t, int64_t tile, int64_t segp, uint8_t* out) {
  constexpr int64_t EPL = 32 / kBits;  // elements per 32-bit lane per 64-byte step
  const int64_t steps = t.seg_pad / EPL;
  const uint8_t* src = t.codes + tile * t.nseg * steps * 64;
  const int64_t quads = t.seg_pad / 4, out_seg = segp / 4 * 64;
  for (int64_t s = 0; s < t.nseg; ++s, src += steps * 64) {
    uint8_t* dst = out + s * out_seg;
    if constexpr (kBits == 8) {
      std::memcpy(dst, src, size_t(quads * 64));
    } else {  // low nibbles: elements k..k+3 of each row, high nibbles: k+4..k+7 (kernels.h)
      const __m512i m = _mm512_set1_epi8(0x0F);
      for (int64_t j = 0; j < steps; ++j) {
        const __m512i v = _mm512_loadu_si512(src + j * 64);
        _mm512_storeu_si512(dst + (2 * j) * 64, _mm512_and_si512(v, m));
        _mm512_storeu_si512(dst + (2 * j + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), m));
      }
    }
    std::memset(dst + quads * 64, 0, size_t(out_seg - quads * 64));
  }
}

template <int kBits>
Status gemm(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QTileView& t = w.qt;
  if (t.bits != kBits || !t.codes || !a.qx.q || a.qx.stride_m != t.nseg * t.seg_pad || t.seg_pad % 8 ||
      n_begin < 0 || n_end > a.N || t.tiles * kQTileRows < a.N)
    return Status::invalid_argument;
  if (n_begin >= n_end) return Status::ok;
  const int64_t segp = (t.seg_pad + kTileK - 1) / kTileK * kTileK, ksteps = segp / kTileK;

  // Activations, repacked once per call: [mp / 16][nseg][ksteps][16 rows][64], zero-padded, so that
  // each A tile is 1 KB contiguous (rows K apart would share one L1 set at K = 4096).
  const int64_t mtiles = (a.M + 15) / 16, a_tile = t.nseg * ksteps * 1024;
  int8_t* A = scratch<int8_t, 0>(size_t(mtiles * a_tile));
  if (!A) return Status::out_of_memory;
  std::memset(A, 0, size_t(mtiles * a_tile));
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t s = 0; s < t.nseg; ++s)
      for (int64_t k0 = 0; k0 < t.seg_pad; k0 += kTileK) {
        const int64_t len = t.seg_pad - k0 < kTileK ? t.seg_pad - k0 : kTileK;
        std::memcpy(A + (m / 16) * a_tile + (s * ksteps + k0 / kTileK) * 1024 + (m % 16) * 64,
                    a.qx.q + m * a.qx.stride_m + s * t.seg_pad + k0, size_t(len));
      }
  // Codes: in place (int8 with whole 64-element steps), else one tile pair at a time into scratch.
  const bool in_place = kBits == 8 && segp == t.seg_pad;
  const int64_t tile_bytes = t.nseg * segp / 4 * 64;
  uint8_t* bbuf = nullptr;
  if (!in_place && !(bbuf = scratch<uint8_t, 0>(size_t(2 * tile_bytes)))) return Status::out_of_memory;

  // fp32 sums of all M rows x one tile pair, kept across the K chunks
  float(*facc)[32] = reinterpret_cast<float(*)[32]>(scratch<float, 0>(size_t(mtiles * 16 * 32)));
  if (!facc) return Status::out_of_memory;
  // K chunks of about kChunkK elements: one tile pair's codes of a chunk (32 KB at most) stay in L1 while
  // every 32-row block of the batch passes over them (whole K at once, they came from L2 per block).
  const int64_t chunk = kChunkK / segp > 1 ? kChunkK / segp : 1;

  static const TileConfig config;
  _tile_loadconfig(&config);
  const int64_t t_end = (n_end + kQTileRows - 1) / kQTileRows;
  for (int64_t tile = n_begin / kQTileRows; tile < t_end; tile += 2) {
    const int nb = t_end - tile > 1 ? 2 : 1;
    const uint8_t* B[2];
    for (int j = 0; j < nb; ++j) {
      if (in_place) {
        B[j] = t.codes + (tile + j) * tile_bytes;
      } else {
        unpack_tile<kBits>(t, tile + j, segp, bbuf + j * tile_bytes);
        B[j] = bbuf + j * tile_bytes;
      }
    }
    std::memset(facc, 0, size_t(mtiles * 16 * 32) * sizeof(float));
    for (int64_t s0 = 0; s0 < t.nseg; s0 += chunk) {
      const int64_t s1 = s0 + chunk < t.nseg ? s0 + chunk : t.nseg;
      for (int64_t mt = 0; mt < mtiles; mt += 2) {
        if (mtiles - mt > 1)
          block_nb<kBits, 2>(nb, a, t, A + mt * a_tile, a_tile, B, segp / 4 * 64, ksteps, tile, mt * 16, s0, s1,
                             facc + mt * 16);
        else
          block_nb<kBits, 1>(nb, a, t, A + mt * a_tile, a_tile, B, segp / 4 * 64, ksteps, tile, mt * 16, s0, s1,
                             facc + mt * 16);
      }
    }
    for (int64_t m = 0; m < a.M; ++m)
      for (int j = 0; j < nb; ++j) {
        const int64_t n = (tile + j) * kQTileRows;
        const int64_t lo = n_begin > n ? n_begin : n, hi = n_end < n + 16 ? n_end : n + 16;
        if (hi > lo) avx512::store_lanes(a, m, n, int(lo - n), int(hi - n), _mm512_load_ps(facc[m] + j * 16));
      }
  }
  _tile_release();
  return Status::ok;
}

}  // namespace

Status int8_q8_gemm_amx(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return gemm<8>(a, w, n_begin, n_end);
}

Status int4_q8_gemm_amx(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return gemm<4>(a, w, n_begin, n_end);
}

}  // namespace sparseinfer
