// The loop nest of the int8-activation kernels on row tiles (kernels.h: QTileView, QActView),
// written once and instantiated by each ISA file with that ISA's vector operations:
//
//   x86/avx2/int{8,4}_q8_gemm_avx2.cpp         8 lanes, pmaddubsw + pmaddwd
//   x86/avx512/int{8,4}_q8_gemm_vnni_avx512.cpp 16 lanes, vpdpbusd
//   arm/neon/int{8,4}_q8_gemm_dot_neon.cpp       4 lanes, sdot
//
// ISA-free itself (no intrinsics here) and, like every header of this directory, internal
// linkage only: each ISA file gets its own copy compiled with its own flags (csrc/README.md).
//
// Register tile: MR batch rows x R row tiles (16 outputs each). Per K step (4 int8 codes or 8 int4
// codes per lane) the R tiles' codes are loaded and decoded once, then every batch row broadcasts
// its 4-byte activation group(s) and accumulates into MR x (R * 16 / L) int32 vectors. At the end of
// each segment the int32 sums get the zero-point term subtracted (exact) and are scaled into fp32
// accumulators with one FMA; the order of those FMAs is the one ref/qtile_ref.cpp uses, so every
// instantiation gives the scalar kernel's bits.
//
// The Ops policy supplies (see the ISA files):
//   kCompact (false: the 64-byte steps of QTileView::codes; true: int8's compact steps,
//   QTileView::compact, which decode rebuilds: L = 16 only), kOffsetX (int8: x read as x + 128 from
//   QActView::qu, corrected by QTileView::wsum128 through sub_lanes), L, kBits (8 / 4),
//   kMaxMR, kMaxR (largest register tile), tiles_for(M) (R for a batch), VI / VF (int32 / fp32
//   vectors), XB (broadcast), Dec, zero_i, zero_f, decode, bcast, dot (one K step, every part),
//   sub_uniform, sub_rows, sub_lanes (kOffsetX only), loadf, storef, fma_seg (facc + float(acc) *
//   (sw * sx)), store (lanes [first, last) of one row of y).
#pragma once

#include <cstdint>

#include "sparseinfer/kernels.h"

namespace sparseinfer {
namespace {
namespace qtile {

// Bytes of one step of one row tile (16 rows x 4 bytes, or its compact form) and where they start.
template <class Ops>
constexpr int64_t step_bytes() {
  if constexpr (Ops::kCompact) return kCompactStepBytes;
  return 64;
}
template <class Ops>
inline const uint8_t* steps_of(const QTileView& t) {
  if constexpr (Ops::kCompact) return t.compact;
  return t.codes;
}

// Bytes of one row tile's codes (kernels.h, QTileView: [nseg][seg_pad / epl] steps).
template <class Ops>
inline int64_t tile_bytes(const QTileView& t) {
  return t.nseg * (t.seg_pad / (32 / Ops::kBits)) * step_bytes<Ops>();
}

// Codes a chunk pass prefetches into L2 for the next tile group, a few lines per segment (see gemm).
struct Ahead {
  const uint8_t* p = nullptr;
  int64_t lines_per_seg = 0;
};

// y[m0 .. m0 + MR, columns of tiles tile0 .. tile0 + R] restricted to [n_lo, n_hi).
template <class Ops, int MR, int R>
inline void block(const GemmArgs& a, const QTileView& t, int64_t tile0, int64_t m0, int64_t n_lo, int64_t n_hi,
                  Ahead ahead) {
  constexpr int L = Ops::L;
  constexpr int VPT = int(kQTileRows) / L;  // vectors per tile
  constexpr int NV = R * VPT;               // vectors per batch row
  constexpr int EPL = 32 / Ops::kBits;      // elements per 32-bit lane per step
  constexpr int PARTS = EPL / 4;            // 4-byte activation groups per step
  static_assert(!Ops::kCompact || VPT == 1, "a compact step decodes into one vector per tile");
  const int64_t steps = t.seg_pad / EPL;
  const int64_t tile_stride = tile_bytes<Ops>(t);
  // Batches of 1-2 stream their codes from memory once: prefetch each stream 2 KB ahead (cold
  // 576x1536 int4 at batch 1: 9.7 -> 10.7 GB/s on one Xeon core; nearer or NTA prefetches were slower).
  constexpr bool kStream = MR <= 2;
  constexpr int kPrefetchBytes = 2048;

  const uint8_t* wp[R];
  for (int r = 0; r < R; ++r) wp[r] = steps_of<Ops>(t) + (tile0 + r) * tile_stride;
  const int8_t* xp[MR];
  const int8_t* xq = Ops::kOffsetX ? reinterpret_cast<const int8_t*>(a.qx.qu) : a.qx.q;
  for (int i = 0; i < MR; ++i) xp[i] = xq + (m0 + i) * a.qx.stride_m;

  // The fp32 sums wait in memory, touched once per segment, so that the K loop's registers hold
  // the int32 sums, the decoded codes and the broadcasts only (spilling, 4 x 4 int4 ran 1.2x slower).
  alignas(64) float facc[MR][NV * L];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) Ops::storef(facc[i] + v * L, Ops::zero_f());

  for (int64_t s = 0; s < t.nseg; ++s) {
    for (int64_t l = 0; l < ahead.lines_per_seg; ++l, ahead.p += 64) __builtin_prefetch(ahead.p, 0, 2);
    // -- integer dot products over one segment --------------------------------------------------
    typename Ops::VI acc[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = Ops::zero_i();
    for (int64_t j = 0; j < steps; ++j) {
      typename Ops::Dec d[NV];
      for (int r = 0; r < R; ++r) {
        if constexpr (kStream) __builtin_prefetch(wp[r] + kPrefetchBytes, 0, 3);
        for (int v = 0; v < VPT; ++v) Ops::decode(wp[r] + v * L * 4, d[r * VPT + v]);
        wp[r] += step_bytes<Ops>();
      }
      for (int i = 0; i < MR; ++i) {
        typename Ops::XB xb[PARTS];
        for (int p = 0; p < PARTS; ++p) xb[p] = Ops::bcast(xp[i] + p * 4);
        for (int v = 0; v < NV; ++v) acc[i][v] = Ops::dot(acc[i][v], d[v], xb);
        xp[i] += EPL;
      }
    }

    // -- segment epilogue: zero point (integers), then one fp32 FMA per lane --------------------
    const int64_t g = s / t.segs_per_group;
    typename Ops::VF sw[NV];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < VPT; ++v) sw[r * VPT + v] = Ops::loadf(t.scale + ((tile0 + r) * t.n_groups + g) * kQTileRows + v * L);
    for (int i = 0; i < MR; ++i) {
      const int64_t cell = (m0 + i) * t.nseg + s;
      const float sx = a.qx.scale[cell];
      const int32_t sum = a.qx.sum[cell];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < VPT; ++v) {
          const int nv = r * VPT + v;
          typename Ops::VI c;
          if constexpr (Ops::kOffsetX) {
            c = Ops::sub_lanes(acc[i][nv], t.wsum128 + ((tile0 + r) * t.nseg + s) * kQTileRows + v * L);
          } else if constexpr (Ops::kBits == 8) {
            c = acc[i][nv];
          } else if (t.zero) {
            c = Ops::sub_rows(acc[i][nv], t.zero + ((tile0 + r) * t.n_groups + g) * kQTileRows + v * L, sum);
          } else {
            c = Ops::sub_uniform(acc[i][nv], 8 * sum);
          }
          Ops::storef(facc[i] + nv * L, Ops::fma_seg(c, sw[nv], sx, Ops::loadf(facc[i] + nv * L)));
        }
    }
  }

  // -- store the columns of [n_lo, n_hi) --------------------------------------------------------------
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < VPT; ++v) {
        const int64_t n = (tile0 + r) * kQTileRows + v * L;
        const int64_t lo = n_lo > n ? n_lo : n, hi = n_hi < n + L ? n_hi : n + L;
        if (hi > lo) Ops::store(a, m0 + i, n, int(lo - n), int(hi - n), Ops::loadf(facc[i] + (r * VPT + v) * L));
      }
}

// Picks the instantiation for a run-time MR (1 .. Ops::kMaxMR) and R (1 .. Ops::kMaxR).
template <class Ops, int R, int MR = 1>
inline void block_mr(int mr, const GemmArgs& a, const QTileView& t, int64_t tile0, int64_t m0, int64_t n_lo,
                     int64_t n_hi, Ahead ahead) {
  if constexpr (MR < Ops::kMaxMR) {
    if (mr > MR) return block_mr<Ops, R, MR + 1>(mr, a, t, tile0, m0, n_lo, n_hi, ahead);
  }
  block<Ops, MR, R>(a, t, tile0, m0, n_lo, n_hi, ahead);
}

template <class Ops, int R = 1>
inline void block_r(int r, int mr, const GemmArgs& a, const QTileView& t, int64_t tile0, int64_t m0, int64_t n_lo,
                    int64_t n_hi, Ahead ahead) {
  if constexpr (R < Ops::kMaxR) {
    if (r > R) return block_r<Ops, R + 1>(r, mr, a, t, tile0, m0, n_lo, n_hi, ahead);
  }
  block_mr<Ops, R>(mr, a, t, tile0, m0, n_lo, n_hi, ahead);
}

// Chunk passes per group from which they prefetch the next group: with fewer, each group's codes are
// read about once and the hardware's stream prefetch serves them (the bursts cost 1.1-1.25x on
// 1536 x 384 at M = 3).
constexpr int64_t kAheadChunks = 4;

// Cache blocking of the output. A pass of every tile group over kRowBlock batch rows writes y as
// that many row streams; over a whole large batch, the columns of each group as a stripe down
// hundreds of rows, one 4 KB page per row, more pages than the L2 stream prefetcher tracks, so
// every line of y waited for its read-for-ownership: 1536 x 384 int8 at 736 rows ran 72-129 G
// multiply-adds/s against 186-188 in blocks of 16 rows (one Xeon core, no AMX; 24 rows:
// 148; 64: 83). The codes of the groups in a row block are then read once per block, from L2
// while they fit in kCodeBlockBytes (a thread's columns in blocks of that many code bytes).
constexpr int64_t kRowBlock = 16;
constexpr int64_t kCodeBlockBytes = 512 << 10;

// The kernel: columns [n_begin, n_end) of y, all M rows. Within a column block (its codes about
// kCodeBlockBytes) and a row block (kRowBlock rows; all M rows when M is at most 4 of them, whose
// y stripes stay few), batch rows go in chunks of kMaxMR, each over the whole of K, the tile
// group's codes streaming from L2 (cutting K into L1-sized blocks, BLIS-style, was 1.1-1.2x slower
// on Zen 5: the L2 streams keep up, and the blocks' sums must wait in memory). Meanwhile each
// chunk pass prefetches its share of the next group's codes into L2, so that the group's first
// pass does not wait on L3 or memory (a 16 MB int8 weight at M = 64 on Zen 5: 1.06-1.1x in a model
// of this loop). Small batches (GEMV, memory-bound) take the widest tile group, so each pass over
// the codes streams R tiles at once (Ops::tiles_for).
template <class Ops>
inline Status gemm(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QTileView& t = w.qt;
  if (t.bits != Ops::kBits || !steps_of<Ops>(t) || !(Ops::kOffsetX ? a.qx.qu && t.wsum128 : a.qx.q != nullptr) ||
      a.qx.stride_m != t.nseg * t.seg_pad ||
      t.seg_pad % 8 || n_begin < 0 || n_end > a.N || t.tiles * kQTileRows < a.N)
    return Status::invalid_argument;
  if (n_begin >= n_end) return Status::ok;
  const int64_t t_begin = n_begin / kQTileRows, t_end = (n_end + kQTileRows - 1) / kQTileRows;
  const int rmax = Ops::tiles_for(a.M);
  const int64_t tile_stride = tile_bytes<Ops>(t);
  const int64_t groups_per_block = kCodeBlockBytes / (rmax * tile_stride) > 1 ? kCodeBlockBytes / (rmax * tile_stride) : 1;
  const int64_t row_block = a.M <= 4 * kRowBlock ? a.M : kRowBlock;
  for (int64_t tb = t_begin; tb < t_end; tb += groups_per_block * rmax) {
    const int64_t tb_end = t_end - tb < groups_per_block * rmax ? t_end : tb + groups_per_block * rmax;
    for (int64_t mb = 0; mb < a.M; mb += row_block) {
      const int64_t mb_end = a.M - mb < row_block ? a.M : mb + row_block;
      const int64_t chunks = (mb_end - mb + Ops::kMaxMR - 1) / Ops::kMaxMR;
      for (int64_t tile = tb; tile < tb_end; tile += rmax) {
        const int r = int(tb_end - tile < rmax ? tb_end - tile : rmax);
        const int64_t next = tile + rmax, next_r = t_end - next < rmax ? t_end - next : rmax;
        const int64_t share = next_r > 0 ? (next_r * tile_stride + chunks - 1) / chunks : 0;  // bytes a chunk pass
        for (int64_t m0 = mb, c = 0; m0 < mb_end; m0 += Ops::kMaxMR, ++c) {
          const int mr = int(mb_end - m0 < Ops::kMaxMR ? mb_end - m0 : Ops::kMaxMR);
          Ahead ahead;
          if (share > 0 && chunks >= kAheadChunks) {
            ahead.p = steps_of<Ops>(t) + next * tile_stride + c * share;
            ahead.lines_per_seg = (share / 64 + t.nseg - 1) / t.nseg;  // (prefetches past the end cannot fault)
          }
          block_r<Ops>(r, mr, a, t, tile, m0, n_begin, n_end, ahead);
        }
      }
    }
  }
  return Status::ok;
}

}  // namespace qtile
}  // namespace
}  // namespace sparseinfer
