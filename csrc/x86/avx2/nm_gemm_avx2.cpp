// N:M structured sparsity x fp32 activations, AVX2 + FMA, for float (f32 / bf16 / f16), int8 and
// int4 kept values (sparseinfer/formats/nm.py). Exact mode: fp32 products of x and the values
// to_dense() produces, fp32 accumulation. Two kernels (sparse_avx2.h explains both layouts):
//
//   nm_gemv_avx2  few batch rows. 2:4: x gathered in registers (2x vpshufb + blend per 8 kept
//                 values), float values widened and int8 / int4 codes converted in registers (scale
//                 once per group). Other N:M: (column, value) pairs decoded per row, then a scalar
//                 gather-dot.
//   nm_gemm_avx2  many batch rows: every N:M pattern; kept values decoded (and dequantized) once
//                 per weight row and batch block, then MB/8 FMAs per kept value against xT.
//
// Kept values whose column is >= K (padding of the last group; indices are not trusted) are
// skipped: the SIMD loops only cover whole blocks below K, the rest goes through the checked
// generic decoder.
#include "sparse_avx2.h"

namespace sparseinfer {
namespace {

using sp::is_24;

// ---- 2:4 gemv ---------------------------------------------------------------------------------
//
// One meta byte holds the 2-bit indices of 4 kept values (2 groups, 8 columns). kLanes24[byte] is the
// vpshufb control that moves those 4 values into place out of the two permute_x24 registers: dword
// l (kept value l, group l / 2) takes float idx_l of its 128-bit source lane. A 16-column block is 2
// meta bytes = one 256-bit control (one table row per 128-bit lane). vpshufb, not vpermilps: the
// variable-control vpermilps / vpermps measured ~4x slower here (Zen-class core: 1.6 ns vs 0.6 ns
// per vector), and a computed vpshufb control costs 5 more ops than the 4 KiB table read from L1.
struct Lanes24 {
  alignas(16) uint8_t bytes[256][16];
  constexpr Lanes24() : bytes() {
    for (int b = 0; b < 256; ++b)
      for (int l = 0; l < 4; ++l)
        for (int i = 0; i < 4; ++i) bytes[b][4 * l + i] = uint8_t(4 * ((b >> (2 * l)) & 3) + i);
  }
};
constexpr Lanes24 kLanes24;

inline __m256i lanes24(uint32_t lo_byte, uint32_t hi_byte) {
  return _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kLanes24.bytes[lo_byte]))),
      _mm_load_si128(reinterpret_cast<const __m128i*>(kLanes24.bytes[hi_byte])), 1);
}

// The 8 kept x values of 16-column block xr (permute_x24 layout), in kept-value order.
inline __m256 gather24(const float* xr, __m256i ctrl) {
  const __m256i a = _mm256_shuffle_epi8(_mm256_castps_si256(_mm256_loadu_ps(xr)), ctrl);      // groups 0, 2
  const __m256i b = _mm256_shuffle_epi8(_mm256_castps_si256(_mm256_loadu_ps(xr + 8)), ctrl);  // groups 1, 3
  return _mm256_castsi256_ps(_mm256_blend_epi32(a, b, 0xCC));
}

// The kept values of one weight row as the 2:4 gemv reads them, 8 at a time: float kinds widened in
// registers; int8 / int4 codes converted to fp32 (int4 minus the zero point: exact small integers),
// their group's scale applied once per group to the group's sum. Groups must hold whole pairs of
// 16-column blocks (16 kept values); nm24_gemv dequantizes other layouts into scratch first.
struct RowValues {
  const void* p;           // float values / int8 codes / int4 bytes of the row
  const float* scale;      // int8 / int4: [groups]; nullptr for float kinds
  const uint8_t* zero;     // int4: [groups] or nullptr (symmetric, 8)
  int64_t group;           // kept values per scale group (float kinds: kc)
};

template <ValueKind V>
inline __m256 values8(const RowValues& rv, int64_t j, __m256i zero) {
  if (V == ValueKind::i8) {
    const int8_t* c = static_cast<const int8_t*>(rv.p) + j;
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
  }
  if (V == ValueKind::i4) {  // 4 bytes, low nibble first; 128-bit ops are the cheap ones on this core
    const __m128i b = _mm_cvtsi32_si128(int32_t(sp::load_u32(static_cast<const uint8_t*>(rv.p) + j / 2)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(c), zero));
  }
  const size_t vsize = V == ValueKind::f32 ? 4 : 2;
  return sp::load8<V>(static_cast<const uint8_t*>(rv.p) + j * vsize);
}

// Values j .. j+15 (two blocks): int4 decodes its 8 bytes at once.
template <ValueKind V>
inline void values16(const RowValues& rv, int64_t j, __m256i zero, __m256& v0, __m256& v1) {
  if (V == ValueKind::i4) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(rv.p) + j / 2));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    v0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(c), zero));
    v1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)), zero));
    return;
  }
  v0 = values8<V>(rv, j, zero), v1 = values8<V>(rv, j + 8, zero);
}

template <ValueKind V>
inline float value1(const RowValues& rv, const WeightView& w, int64_t n, int64_t j) {
  if (V == ValueKind::i8) return dequant_int8(w.q, n, j);
  if (V == ValueKind::i4) return dequant_int4(w.q, n, j);
  return sp::load1<V>(rv.p, j);
}

// Software prefetch distance on the value stream (bytes ahead): measured 20-25% faster on f32 values
// from memory than the hardware prefetcher alone (2048 vs 1024 / 512 / none).
constexpr int64_t kPrefetchBytes = 2048;

// MT batch rows against one weight row. xp: MT rows of permute_x24(x), row stride kp16. Whole
// 16-column blocks below K (nb of them, 8 kept values and 2 meta bytes each) run in SIMD, group by
// group; kept values from 8 * nb on go through the checked scalar tail.
template <ValueKind V, int MT>
void nm24_gemv_tile(const GemmArgs& a, const WeightView& w, int64_t n, int64_t m0, const float* xp, int64_t kp16,
                    const RowValues& rv, const uint8_t* meta, float* out) {
  constexpr bool quantized = V == ValueKind::i8 || V == ValueKind::i4;
  const int64_t nb = a.K / 16, kc = w.nm.kc;
  // value-stream bytes per 16-column block
  const int64_t vbytes = V == ValueKind::f32 ? 32 : V == ValueKind::i4 ? 4 : V == ValueKind::i8 ? 8 : 16;
  const char* stream = static_cast<const char*>(rv.p);
  __m256 facc[MT];
  for (int t = 0; t < MT; ++t) facc[t] = _mm256_setzero_ps();
  for (int64_t b = 0, g = 0; b < nb; ++g) {
    const int64_t b_end = quantized && (g + 1) * rv.group / 8 < nb ? (g + 1) * rv.group / 8 : nb;
    const __m256i zero = _mm256_set1_epi32(V == ValueKind::i4 ? (rv.zero ? rv.zero[g] : 8) : 0);
    __m256 acc0[MT], acc1[MT];
    for (int t = 0; t < MT; ++t) acc0[t] = _mm256_setzero_ps(), acc1[t] = _mm256_setzero_ps();
    for (; b + 2 <= b_end; b += 2) {  // 32 columns, 16 kept values, 4 meta bytes per step
      const uint32_t word = sp::load_u32(meta + 2 * b);
      _mm_prefetch(stream + b * vbytes + kPrefetchBytes, _MM_HINT_T0);
      const __m256i c0 = lanes24(word & 0xFF, (word >> 8) & 0xFF), c1 = lanes24((word >> 16) & 0xFF, word >> 24);
      __m256 v0, v1;
      values16<V>(rv, 8 * b, zero, v0, v1);
      for (int t = 0; t < MT; ++t) {
        const float* xr = xp + t * kp16 + 16 * b;
        acc0[t] = _mm256_fmadd_ps(v0, gather24(xr, c0), acc0[t]);
        acc1[t] = _mm256_fmadd_ps(v1, gather24(xr + 16, c1), acc1[t]);
      }
    }
    if (b < b_end) {  // one more 16-column block (float kinds, or the last group of a row): 2 meta bytes
      const __m256i c0 = lanes24(meta[2 * b], meta[2 * b + 1]);
      const __m256 v0 = values8<V>(rv, 8 * b, zero);
      for (int t = 0; t < MT; ++t) acc0[t] = _mm256_fmadd_ps(v0, gather24(xp + t * kp16 + 16 * b, c0), acc0[t]);
      ++b;
    }
    for (int t = 0; t < MT; ++t) {
      const __m256 sum = _mm256_add_ps(acc0[t], acc1[t]);
      facc[t] = quantized ? _mm256_fmadd_ps(sum, _mm256_set1_ps(rv.scale[g]), facc[t]) : _mm256_add_ps(sum, facc[t]);
    }
  }
  float tail[MT] = {};
  if (8 * nb < kc) {  // the columns of the last partial block: checked against K
    BitReader r(meta + 2 * nb);
    for (int64_t j = 8 * nb; j < kc; ++j) {
      const int64_t col = (j / 2) * 4 + r.get(2);
      if (col >= a.K) continue;
      const float v = value1<V>(rv, w, n, j);
      for (int t = 0; t < MT; ++t) tail[t] += v * a.x[(m0 + t) * a.stride_xm + col];
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = sp::hsum(facc[t]) + tail[t];
}

template <ValueKind V>
void nm24_gemv_row(const GemmArgs& a, const WeightView& w, int64_t n, const float* xp, int64_t kp16,
                   const RowValues& rv) {
  const uint8_t* meta = w.nm.meta + n * w.nm.meta_stride;
  float out[4];
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) {
    nm24_gemv_tile<V, 4>(a, w, n, m, xp + m * kp16, kp16, rv, meta, out);
    for (int t = 0; t < 4; ++t) store_output(a, m + t, n, out[t]);
  }
  switch (a.M - m) {
    case 3: nm24_gemv_tile<V, 3>(a, w, n, m, xp + m * kp16, kp16, rv, meta, out); break;
    case 2: nm24_gemv_tile<V, 2>(a, w, n, m, xp + m * kp16, kp16, rv, meta, out); break;
    case 1: nm24_gemv_tile<V, 1>(a, w, n, m, xp + m * kp16, kp16, rv, meta, out); break;
    default: return;
  }
  for (int64_t t = 0; m + t < a.M; ++t) store_output(a, m + t, n, out[t]);
}

Status nm24_gemv(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const NMView& nm = w.nm;
  const QuantView& q = w.q;
  const int64_t kp16 = (a.K + 15) / 16 * 16;
  float* xp = scratch<float, 0>(size_t(a.M * kp16));
  float* deq = scratch<float, 1>(size_t(nm.kc));
  if (!xp || !deq) return Status::out_of_memory;
  sp::permute_x24(a, 0, a.M, kp16, xp);
  // int8 / int4 codes are read in place when every scale group holds whole 16-value steps
  const bool inline_q = q.n_groups == 1 || q.group % 16 == 0;
  const size_t fsize = nm.values == ValueKind::f32 ? 4 : 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    RowValues rv{static_cast<const char*>(nm.fvalues) + n * nm.kc * int64_t(fsize), nullptr, nullptr, nm.kc};
    switch (nm.values) {
      case ValueKind::f32: nm24_gemv_row<ValueKind::f32>(a, w, n, xp, kp16, rv); break;
      case ValueKind::bf16: nm24_gemv_row<ValueKind::bf16>(a, w, n, xp, kp16, rv); break;
      case ValueKind::f16: nm24_gemv_row<ValueKind::f16>(a, w, n, xp, kp16, rv); break;
      default:
        if (inline_q) {
          const bool i4 = nm.values == ValueKind::i4;
          rv.p = i4 ? static_cast<const void*>(static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2))
                    : static_cast<const void*>(static_cast<const int8_t*>(q.codes) + n * q.kp);
          rv.scale = q.scale + n * q.n_groups;
          rv.zero = q.zero ? q.zero + n * q.n_groups : nullptr;
          rv.group = q.n_groups == 1 ? nm.kc : q.group;
          if (i4)
            nm24_gemv_row<ValueKind::i4>(a, w, n, xp, kp16, rv);
          else
            nm24_gemv_row<ValueKind::i8>(a, w, n, xp, kp16, rv);
        } else {  // other groups: dequantize the row into L1 once, shared by every batch row
          sp::nm_values(w, n, 0, nm.kc, deq);
          rv.p = deq;
          nm24_gemv_row<ValueKind::f32>(a, w, n, xp, kp16, rv);
        }
        break;
    }
  }
  return Status::ok;
}

// ---- any N:M, gemv: decoded pairs, scalar gather --------------------------------------------

inline float gather_dot(const float* x, const int32_t* cols, const float* vals, int64_t count) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    s0 += vals[j] * x[cols[j]];
    s1 += vals[j + 1] * x[cols[j + 1]];
    s2 += vals[j + 2] * x[cols[j + 2]];
    s3 += vals[j + 3] * x[cols[j + 3]];
    sp::keep_scalar(s0);
  }
  for (; j < count; ++j) s0 += vals[j] * x[cols[j]];
  return (s0 + s1) + (s2 + s3);
}

Status nm_generic_gemv(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const NMView& nm = w.nm;
  int32_t* cols = scratch<int32_t, 2>(size_t(nm.kc));
  float* vals = scratch<float, 1>(size_t(nm.kc));
  if (!cols || !vals) return Status::out_of_memory;
  for (int64_t n = n_begin; n < n_end; ++n) {
    sp::nm_values(w, n, 0, nm.kc, vals);
    const int64_t count = sp::nm_decode_generic(nm, nm.meta + n * nm.meta_stride, a.K, 0, nm.kc, cols, vals);
    for (int64_t m = 0; m < a.M; ++m) store_output(a, m, n, gather_dot(a.x + m * a.stride_xm, cols, vals, count));
  }
  return Status::ok;
}

// ---- any N:M, gemm: xT ----------------------------------------------------------------------
//
// Batch rows in blocks of up to 64 (8 accumulators + a broadcast + loads fit the 16 ymm registers).
// Loops: weight rows in tiles of kRowTile; inside a tile, K in blocks whose slice of xT fits L1
// (kXtBytes), and every row of the tile adds its kept values of that K block to its fp32 partial
// sums (yacc, kRowTile x MB floats, L1). So the FMAs read xT from L1 (a 64-row batch needs 256 B per
// kept value, more than the L2 -> L1 path delivers), xT as a whole (K x 256 B) is re-read from
// L2 / L3 once per row tile, and each weight byte is still read once per batch block.
constexpr int64_t kMaxBlock = 64;
constexpr int64_t kXtBytes = 16 << 10;
constexpr int64_t kRowTile = 32;

template <int NV>
void nm_gemm_block(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end, int64_t m0, int64_t rows,
                   const float* xT, int32_t* off, float* vals, float* yacc) {
  const NMView& nm = w.nm;
  constexpr int32_t stride = NV * 8;
  // columns per K block: a multiple of 32 (whole 2:4 decode steps) and of m (whole groups)
  int64_t kblk = kXtBytes / (4 * stride);
  int64_t unit = nm.m;
  while (unit % 32) unit += nm.m;
  kblk = kblk < unit ? unit : kblk / unit * unit;
  if (kblk > a.K) kblk = (a.K + unit - 1) / unit * unit;
  const int64_t groups_per_blk = kblk / nm.m;
  const int64_t k_fast = is_24(nm) ? a.K / 32 * 32 : 0;  // whole 32-column 2:4 steps below K
  for (int64_t t0 = n_begin; t0 < n_end; t0 += kRowTile) {
    const int64_t t1 = t0 + kRowTile < n_end ? t0 + kRowTile : n_end;
    sp::prefetch_y(a, m0, rows, t0, t1);  // the lines store_acc writes in the last K block
    for (int64_t k0 = 0; k0 < a.K; k0 += kblk) {
      const int64_t j0 = k0 / nm.m * nm.n;
      const int64_t j1 = j0 + groups_per_blk * nm.n < nm.kc ? j0 + groups_per_blk * nm.n : nm.kc;
      const int64_t fast_end = k0 + kblk <= k_fast ? j1 : (k_fast > k0 ? (k_fast - k0) / 2 + j0 : j0);
      const bool last = k0 + kblk >= a.K;
      for (int64_t n = t0; n < t1; ++n) {
        const uint8_t* meta = nm.meta + n * nm.meta_stride;
        const float* v = vals;
        int64_t count = j1 - j0;
        if (fast_end == j1 && nm.values == ValueKind::f32) {
          v = static_cast<const float*>(nm.fvalues) + n * nm.kc + j0;  // whole 2:4 block: read in place
        } else {
          sp::nm_values(w, n, j0, j1, vals);
        }
        if (fast_end > j0) sp::nm24_cols(meta, j0, fast_end, stride, off);
        if (fast_end < j1) {
          count = (fast_end - j0) +
                  sp::nm_decode_generic(nm, meta, a.K, fast_end, j1, off + (fast_end - j0), vals + (fast_end - j0));
          for (int64_t j = fast_end - j0; j < count; ++j) off[j] *= stride;
        }
        float* y = yacc + (n - t0) * stride;
        __m256 acc[NV];
        for (int i = 0; i < NV; ++i) acc[i] = k0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(y + 8 * i);
        sp::xt_accumulate<NV>(xT, off, v, count, acc);  // offsets are absolute columns * stride
        if (last) {
          sp::store_acc(a, m0, rows, n, acc);
        } else {
          for (int i = 0; i < NV; ++i) _mm256_store_ps(y + 8 * i, acc[i]);
        }
      }
    }
  }
}

}  // namespace

Status nm_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const Status s = sp::check_nm(w);
  if (s != Status::ok) return s;
  return is_24(w.nm) ? nm24_gemv(a, w, n_begin, n_end) : nm_generic_gemv(a, w, n_begin, n_end);
}

Status nm_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const Status s = sp::check_nm(w);
  if (s != Status::ok) return s;
  const NMView& nm = w.nm;
  // xT offsets are int32: K * 64 must fit (K <= 33M); beyond that the gemv path serves every batch.
  if (a.K > INT32_MAX / kMaxBlock) return nm_gemv_avx2(a, w, n_begin, n_end);
  const int64_t block = a.M < kMaxBlock ? (a.M + 7) / 8 * 8 : kMaxBlock;
  float* xT = scratch<float, 0>(size_t(a.K * block));
  int32_t* off = scratch<int32_t, 2>(size_t(nm.kc));
  float* vals = scratch<float, 1>(size_t(nm.kc));
  float* yacc = scratch<float, 3>(size_t(kRowTile * block));
  if (!xT || !off || !vals || !yacc) return Status::out_of_memory;
  for (int64_t m0 = 0; m0 < a.M; m0 += block) {
    const int64_t rows = a.M - m0 < block ? a.M - m0 : block;
    const int64_t nv = (rows + 7) / 8;
    sp::transpose_x(a, m0, rows, nv * 8, xT);
    switch (nv) {
      case 1: nm_gemm_block<1>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 2: nm_gemm_block<2>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 3: nm_gemm_block<3>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 4: nm_gemm_block<4>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 5: nm_gemm_block<5>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 6: nm_gemm_block<6>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      case 7: nm_gemm_block<7>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
      default: nm_gemm_block<8>(a, w, n_begin, n_end, m0, rows, xT, off, vals, yacc); break;
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
