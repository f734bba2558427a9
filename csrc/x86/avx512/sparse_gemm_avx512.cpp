// N:M (float / int8 / int4 kept values) and CSR (float / int8 values) x fp32 activations, many batch
// rows, AVX-512: the xT product of the AVX2 sparse kernels (x86/avx2/sparse_avx2.h) on 512-bit
// vectors. Exact mode: fp32 products of x and the values to_dense() produces, fp32 sums.
//
// x is transposed per block of up to 64 batch rows into xT[K][mb] (rows contiguous, zero-padded to
// whole vectors). A kept value (column c, value v) then costs mb/16 FMAs of v (broadcast) against
// xT[c], their loads folded into the FMAs: half the FMAs of the dense product for 2:4, none on the
// zeros of CSR, and no gather. Loop nest per batch block:
//
//   output rows in tiles of kRowTile, per tile K in blocks whose slice of xT fits L1 (kXtBytes):
//     every row of the tile adds its kept values of the block to its partial sums (yacc[row][mb], L1)
//   at the tile's end, yacc is transposed 16 x 16 in registers and stored as rows of y (bias added).
//
// The weight's offsets are decoded per (row, K block, batch block) from the canonical indices (2:4:
// 16 from one meta word; other N:M and the last partial group: the checked bit reader, which drops
// kept values past K) and CSR columns (validated at prepack) times mb. The FMAs of a row spread
// over >= 8 independent accumulators (latency 4 x 2 FMA ports), summed at the end.
//
// Uses 128-bit-lane shuffles (transpose_avx512.h) that tests/native's emulation lacks: run natively
// only (tests/test_cpu_sparse_simd.py on machines with AVX-512).
//
// The AVX2 sparse helpers come with this file, and so do the AVX2 kernels they name: the avx512 group
// is built with the avx2 group's flags plus its own, so a build that has this file has that group.
#ifndef SPARSEINFER_HAVE_AVX2
#define SPARSEINFER_HAVE_AVX2 1
#endif
#include "../avx2/sparse_avx2.h"
#include "avx512_common.h"
#include "transpose_avx512.h"

namespace sparseinfer {
namespace {

constexpr int64_t kMaxVec = 4;            // zmm per batch block: 64 rows
constexpr int64_t kXtBytes = 24 << 10;    // xT slice per K block (L1: 32 KB Zen 4, 48 KB Golden Cove)
constexpr int64_t kRowTile = 32;          // output rows per tile: yacc is 32 x 64 floats, 8 KB
// Offsets into xT are int32 (column x 64): up to 33 M columns; past that the AVX2 gemv kernels serve.
constexpr int64_t kMaxK = INT32_MAX / (16 * kMaxVec);

// acc[i] += sum_j vals[j] * xT[off[j] + 16 i], i < NV, over U independent sets of accumulators.
template <int NV>
inline void xt_accumulate(const float* xT, const int32_t* off, const float* vals, int64_t count, __m512* acc) {
  constexpr int U = NV >= 4 ? 4 : NV == 3 ? 4 : NV == 2 ? 6 : 8;
  __m512 part[U][NV];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < NV; ++i) part[u][i] = u == 0 ? acc[i] : _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + U <= count; j += U)
    for (int u = 0; u < U; ++u) {
      const float* xr = xT + off[j + u];
      __asm__("" : "+r"(xr));  // the address in a register: base + displacement FMAs stay micro-fused
      const __m512 v = _mm512_set1_ps(vals[j + u]);
      for (int i = 0; i < NV; ++i) part[u][i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * i), part[u][i]);
    }
  for (; j < count; ++j) {
    const float* xr = xT + off[j];
    const __m512 v = _mm512_set1_ps(vals[j]);
    for (int i = 0; i < NV; ++i) part[0][i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * i), part[0][i]);
  }
  for (int i = 0; i < NV; ++i) {
    __m512 t = part[0][i];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, part[u][i]);
    acc[i] = t;
  }
}

// y[m0 + r, t0 + n] = yacc[n][r] (+ bias) for n < nrows, r < rows: 16 x 16 blocks transposed in
// registers, each batch row stored as up to 16 contiguous outputs.
void store_tile(const GemmArgs& a, int64_t m0, int64_t rows, int64_t t0, int64_t nrows, const float* yacc,
                int64_t mb) {
  for (int64_t h = 0; h < nrows; h += 16) {
    const int nh = int(nrows - h < 16 ? nrows - h : 16);
    for (int64_t i = 0; i < rows; i += 16) {
      __m512 v[16];
      for (int j = 0; j < 16; ++j) v[j] = j < nh ? _mm512_load_ps(yacc + (h + j) * mb + i) : _mm512_setzero_ps();
      avx512::transpose16x16(v);  // v[t] lane j: batch row m0 + i + t, output t0 + h + j
      const int64_t rt = rows - i < 16 ? rows - i : 16;
      for (int64_t t = 0; t < rt; ++t) avx512::store_lanes(a, m0 + i + t, t0 + h, 0, nh, v[t]);
    }
  }
}

// Columns per K block: the slice of xT (kblk x mb floats) within kXtBytes, a multiple of `unit`.
inline int64_t k_block(int64_t K, int64_t mb, int64_t unit) {
  int64_t kblk = kXtBytes / (4 * mb);
  kblk = kblk < unit ? unit : kblk / unit * unit;
  return kblk > K ? (K + unit - 1) / unit * unit : kblk;
}

// ---- N:M -----------------------------------------------------------------------------------

template <int NV>
void nm_block(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end, int64_t m0, int64_t rows,
              const float* xT, int32_t* off, float* vals, float* yacc) {
  const NMView& nm = w.nm;
  constexpr int32_t mb = NV * 16;
  int64_t unit = nm.m;  // whole groups, and whole 32-column 2:4 decode steps
  while (unit % 32) unit += nm.m;
  const int64_t kblk = k_block(a.K, mb, unit), groups_per_blk = kblk / nm.m;
  const int64_t k_fast = sp::is_24(nm) ? a.K / 32 * 32 : 0;  // whole 32-column 2:4 steps below K
  for (int64_t t0 = n_begin; t0 < n_end; t0 += kRowTile) {
    const int64_t t1 = t0 + kRowTile < n_end ? t0 + kRowTile : n_end;
    sp::prefetch_y(a, m0, rows, t0, t1);  // store_tile's lines
    for (int64_t k0 = 0; k0 < a.K; k0 += kblk) {
      const int64_t j0 = k0 / nm.m * nm.n;
      const int64_t j1 = j0 + groups_per_blk * nm.n < nm.kc ? j0 + groups_per_blk * nm.n : nm.kc;
      const int64_t fast_end = k0 + kblk <= k_fast ? j1 : (k_fast > k0 ? (k_fast - k0) / 2 + j0 : j0);
      for (int64_t n = t0; n < t1; ++n) {
        const uint8_t* meta = nm.meta + n * nm.meta_stride;
        const float* v = vals;
        int64_t count = j1 - j0;
        if (fast_end == j1 && nm.values == ValueKind::f32) {
          v = static_cast<const float*>(nm.fvalues) + n * nm.kc + j0;  // whole 2:4 steps: read in place
        } else {
          sp::nm_values(w, n, j0, j1, vals);
        }
        if (fast_end > j0) sp::nm24_cols(meta, j0, fast_end, mb, off);
        if (fast_end < j1) {
          count = (fast_end - j0) +
                  sp::nm_decode_generic(nm, meta, a.K, fast_end, j1, off + (fast_end - j0), vals + (fast_end - j0));
          for (int64_t j = fast_end - j0; j < count; ++j) off[j] *= mb;
        }
        float* y = yacc + (n - t0) * mb;
        __m512 acc[NV];
        for (int i = 0; i < NV; ++i) acc[i] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(y + 16 * i);
        xt_accumulate<NV>(xT, off, v, count, acc);
        for (int i = 0; i < NV; ++i) _mm512_store_ps(y + 16 * i, acc[i]);
      }
    }
    store_tile(a, m0, rows, t0, t1 - t0, yacc, mb);
  }
}

// ---- CSR -----------------------------------------------------------------------------------

// Values of entries [e0, e1) of row n as fp32: in place (f32), widened, or code * row scale (int8).
inline const float* csr_values(const CSRView& c, int64_t n, int64_t e0, int64_t e1, float* vals) {
  if (c.kind == ValueKind::f32) return static_cast<const float*>(c.values) + e0;
  if (c.kind == ValueKind::i8) {  // code * scale, one rounding each: the values to_dense() produces
    const int8_t* codes = static_cast<const int8_t*>(c.values);
    const __m512 s = _mm512_set1_ps(c.scale[n]);
    int64_t e = e0;
    for (; e + 16 <= e1; e += 16) {
      const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + e)));
      _mm512_storeu_ps(vals + (e - e0), _mm512_mul_ps(_mm512_cvtepi32_ps(q), s));
    }
    for (; e < e1; ++e) vals[e - e0] = float(codes[e]) * c.scale[n];
    return vals;
  }
  sp::widen(c.values, c.kind, e0, e1 - e0, vals);
  return vals;
}

// The first entry in [e, e_end) whose column is >= k1 (columns increase within a row, checked at
// prepack): 16 columns compared at a time.
inline int64_t csr_split(const int32_t* col, int64_t e, int64_t e_end, int64_t k1) {
  const __m512i lim = _mm512_set1_epi32(int32_t(k1));
  for (; e < e_end; e += 16) {
    const __mmask16 in = e_end - e >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (e_end - e)) - 1);
    const __mmask16 below = _mm512_mask_cmplt_epi32_mask(in, _mm512_maskz_loadu_epi32(in, col + e), lim);
    if (below != in) return e + __builtin_popcount(below);  // sorted: the entries below k1 come first
  }
  return e_end;
}

template <int NV>
void csr_block(const GemmArgs& a, const CSRView& c, int64_t n_begin, int64_t n_end, int64_t m0, int64_t rows,
               const float* xT, int32_t* off, float* vals, float* yacc, int64_t* cursor) {
  constexpr int32_t mb = NV * 16;
  // K blocks: xT slices in L1, but at least ~64 entries a row per block on average (a sparser
  // weight would pay the per-block partial sums for a handful of FMAs)
  const int64_t per_row = (c.crow[n_end] - c.crow[n_begin]) / (n_end - n_begin) + 1;  // this thread's rows
  int64_t kblk = k_block(a.K, mb, 16);
  if (kblk * per_row < 64 * a.K) kblk = (64 * a.K / per_row + 15) / 16 * 16;
  const __m512i vmb = _mm512_set1_epi32(mb);
  for (int64_t t0 = n_begin; t0 < n_end; t0 += kRowTile) {
    const int64_t t1 = t0 + kRowTile < n_end ? t0 + kRowTile : n_end;
    for (int64_t n = t0; n < t1; ++n) cursor[n - t0] = c.crow[n];
    sp::prefetch_y(a, m0, rows, t0, t1);  // store_tile's lines
    for (int64_t k0 = 0; k0 < a.K; k0 += kblk) {
      const int64_t k1 = k0 + kblk;
      for (int64_t n = t0; n < t1; ++n) {
        const int64_t e0 = cursor[n - t0];
        const int64_t e1 = k1 >= a.K ? c.crow[n + 1] : csr_split(c.col, e0, c.crow[n + 1], k1);
        cursor[n - t0] = e1;
        const int64_t count = e1 - e0;
        int64_t j = 0;
        for (; j + 16 <= count; j += 16)
          _mm512_storeu_si512(off + j, _mm512_mullo_epi32(_mm512_loadu_si512(c.col + e0 + j), vmb));
        for (; j < count; ++j) off[j] = c.col[e0 + j] * mb;
        const float* v = csr_values(c, n, e0, e1, vals);
        float* y = yacc + (n - t0) * mb;
        __m512 acc[NV];
        for (int i = 0; i < NV; ++i) acc[i] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(y + 16 * i);
        xt_accumulate<NV>(xT, off, v, count, acc);
        for (int i = 0; i < NV; ++i) _mm512_store_ps(y + 16 * i, acc[i]);
      }
    }
    store_tile(a, m0, rows, t0, t1 - t0, yacc, mb);
  }
}

// ---- driver ----------------------------------------------------------------------------------

// Batch blocks of up to kMaxVec vectors, spread evenly (46 vectors: 11 x 4 + 2, not 4 + ... + 2).
template <class Block>
Status run_blocks(const GemmArgs& a, int64_t max_entries, Block&& block) {
  const int64_t vecs = (a.M + 15) / 16, nblocks = (vecs + kMaxVec - 1) / kMaxVec;
  const int64_t per = (vecs + nblocks - 1) / nblocks;  // vectors per block, <= kMaxVec
  float* xT = scratch<float, 0>(size_t(a.K * per * 16));
  int32_t* off = scratch<int32_t, 1>(size_t(max_entries));
  float* vals = scratch<float, 2>(size_t(max_entries));
  float* yacc = scratch<float, 3>(size_t(kRowTile * per * 16));
  int64_t* cursor = scratch<int64_t, 4>(size_t(kRowTile));
  if (!xT || !off || !vals || !yacc || !cursor) return Status::out_of_memory;
  for (int64_t m0 = 0; m0 < a.M; m0 += per * 16) {
    const int64_t rows = a.M - m0 < per * 16 ? a.M - m0 : per * 16;
    const int nv = int((rows + 15) / 16);
    sp::transpose_x(a, m0, rows, nv * 16, xT);
    block(nv, m0, rows, xT, off, vals, yacc, cursor);
  }
  return Status::ok;
}

}  // namespace

Status nm_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const Status s = sp::check_nm(w);
  if (s != Status::ok) return s;
  if (a.K > kMaxK) return nm_gemv_avx2(a, w, n_begin, n_end);
  return run_blocks(a, w.nm.kc, [&](int nv, int64_t m0, int64_t rows, const float* xT, int32_t* off, float* vals,
                                    float* yacc, int64_t*) {
    switch (nv) {
      case 1: nm_block<1>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 2: nm_block<2>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 3: nm_block<3>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      default: nm_block<4>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
    }
  });
}

Status csr_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const CSRView& c = w.csr;
  const Status s = sp::check_csr(c);
  if (s != Status::ok) return s;
  if (a.K > kMaxK) return csr_gemv_avx2(a, w, n_begin, n_end);
  int64_t widest = 0;
  for (int64_t n = n_begin; n < n_end; ++n)
    if (c.crow[n + 1] - c.crow[n] > widest) widest = c.crow[n + 1] - c.crow[n];
  return run_blocks(a, widest, [&](int nv, int64_t m0, int64_t rows, const float* xT, int32_t* off, float* vals,
                                   float* yacc, int64_t* cursor) {
    switch (nv) {
      case 1: csr_block<1>(a, c, n_begin, n_end, m0, rows, xT, off, vals, yacc, cursor); break;
      case 2: csr_block<2>(a, c, n_begin, n_end, m0, rows, xT, off, vals, yacc, cursor); break;
      case 3: csr_block<3>(a, c, n_begin, n_end, m0, rows, xT, off, vals, yacc, cursor); break;
      default: csr_block<4>(a, c, n_begin, n_end, m0, rows, xT, off, vals, yacc, cursor); break;
    }
  });
}

}  // namespace sparseinfer
