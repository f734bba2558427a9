// N:M structured sparsity x fp32, NEON, every batch size, for float (f32 / bf16 / f16), int8 and int4
// kept values (sparseinfer/formats/nm.py). Kept value j of a row belongs to group j / n and sits at
// column (j / n) * m + idx_j, idx_j being the j-th `bits`-wide field of the row's meta bit stream.
//
// Per weight row: the kept values are decoded to fp32 once (exactly to_dense()'s values: widened,
// or code * scale / (code - zero) * scale), then every batch-row tile uses them:
//   * 2:4, the common case, has a table-lookup path: one meta byte holds the 4 indices of two groups,
//     i.e. of 8 consecutive columns, and selects the 4 matching x values out of two vector loads
//     with one tbl (byte shuffle). Only whole 8-column blocks below K take it, so it never reads x
//     past K and needs no column check.
//   * everything else (other N:M, the 2:4 tail) decodes (column, value) pairs, drops columns >= K
//     (the zero padding of the last group; indices are not trusted) and gathers.
#include "neon_common.h"

namespace sparseinfer {
namespace {

// For every 2:4 meta byte, the tbl indices that pick its 4 kept x values out of the 32 bytes of
// x[8b .. 8b+8): kept value l belongs to group l / 2 and has index field l (bits 2l, 2l+1).
struct Lanes24 {
  uint8_t bytes[256][16];
  constexpr Lanes24() : bytes() {
    for (int b = 0; b < 256; ++b)
      for (int l = 0; l < 4; ++l) {
        const int col = (l / 2) * 4 + ((b >> (2 * l)) & 3);
        for (int i = 0; i < 4; ++i) bytes[b][4 * l + i] = uint8_t(4 * col + i);
      }
  }
};
constexpr Lanes24 kLanes24;

// Row `row` of a quantized (rows, kc) value matrix, dequantized: dst[j] = code * scale (int8) or
// (code - zero) * scale (int4), one fp32 rounding each, as in to_dense().
void dequant_int8_row(const QuantView& q, int64_t row, int64_t count, float* dst) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + row * q.kp;
  const float* scale = q.scale + row * q.n_groups;
  for (int64_t g = 0, j0 = 0; j0 < count; ++g, j0 += q.group) {
    const int64_t j1 = j0 + q.group < count ? j0 + q.group : count;
    const float s = scale[g];
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      float32x4_t lo, hi;
      neon::load_i8x8(codes + j, lo, hi);
      vst1q_f32(dst + j, vmulq_n_f32(lo, s));
      vst1q_f32(dst + j + 4, vmulq_n_f32(hi, s));
    }
    for (; j < j1; ++j) dst[j] = float(codes[j]) * s;
  }
}

void dequant_int4_row(const QuantView& q, int64_t row, int64_t count, float* dst) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + row * (q.kp / 2);
  const float* scale = q.scale + row * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + row * q.n_groups : nullptr;
  for (int64_t g = 0, j0 = 0; j0 < count; ++g, j0 += q.group) {
    const int64_t j1 = j0 + q.group < count ? j0 + q.group : count;
    const float s = scale[g];
    const int z = zero ? zero[g] : 8;
    int64_t j = j0;
    if ((j & 1) && j < j1) dst[j] = float(((bytes[j >> 1] >> 4) & 0xF) - z) * s, ++j;  // odd group start
    const int16x8_t vz = vdupq_n_s16(int16_t(z));
    for (; j + 16 <= j1; j += 16) {
      float32x4_t wv[4];
      neon::load_u4x16(bytes + (j >> 1), vz, wv);
      for (int i = 0; i < 4; ++i) vst1q_f32(dst + j + 4 * i, vmulq_n_f32(wv[i], s));
    }
    for (; j < j1; ++j) dst[j] = float(((bytes[j >> 1] >> ((j & 1) * 4)) & 0xF) - z) * s;
  }
}

// The kept values of weight row n in fp32: the f32 row itself, or decoded into buf.
const float* kept_values(const WeightView& w, int64_t n, float* buf) {
  const NMView& nm = w.nm;
  switch (nm.values) {
    case ValueKind::f32: return static_cast<const float*>(nm.fvalues) + n * nm.kc;
    case ValueKind::i8: dequant_int8_row(w.q, n, nm.kc, buf); return buf;
    case ValueKind::i4: dequant_int4_row(w.q, n, nm.kc, buf); return buf;
    default: neon::widen_half(static_cast<const uint16_t*>(nm.fvalues) + n * nm.kc, nm.values, nm.kc, buf); return buf;
  }
}

// y[m0 .. m0+MR, n]: `blocks` whole 2:4 blocks through the table (values v[0, 4 * blocks)), then the
// decoded (column, value) pairs.
template <int MR>
void nm_row_tile(const GemmArgs& a, int64_t n, int64_t m0, const uint8_t* meta, const float* v, int64_t blocks,
                 const int32_t* cols, const float* cvals, int64_t count) {
  const float* x[MR];
  float32x4_t acc[MR];
  float tail[MR];
  for (int r = 0; r < MR; ++r) x[r] = a.x + (m0 + r) * a.stride_xm, acc[r] = vdupq_n_f32(0.f), tail[r] = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8x16_t lanes = vld1q_u8(kLanes24.bytes[meta[b]]);
    const float32x4_t vv = vld1q_f32(v + 4 * b);
    for (int r = 0; r < MR; ++r) {
      uint8x16x2_t xs;
      xs.val[0] = vreinterpretq_u8_f32(vld1q_f32(x[r] + 8 * b));
      xs.val[1] = vreinterpretq_u8_f32(vld1q_f32(x[r] + 8 * b + 4));
      acc[r] = vfmaq_f32(acc[r], vreinterpretq_f32_u8(vqtbl2q_u8(xs, lanes)), vv);
    }
  }
  neon::gather_accumulate<MR>(x, cols, cvals, count, acc, tail);
  for (int r = 0; r < MR; ++r) store_output(a, m0 + r, n, vaddvq_f32(acc[r]) + tail[r]);
}

}  // namespace

Status nm_gemm_neon(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const NMView& nm = w.nm;
  if (nm.n < 1 || nm.m <= nm.n || nm.bits < 1 || nm.bits > 32 || nm.kc < 1) return Status::invalid_argument;
  const bool quantized = nm.values == ValueKind::i8 || nm.values == ValueKind::i4;
  if (quantized && (w.q.group <= 0 || w.q.kp < nm.kc)) return Status::invalid_argument;
  float* vbuf = scratch<float, 0>(size_t(nm.kc));      // decoded kept values of one row
  int32_t* cols = scratch<int32_t, 1>(size_t(nm.kc));  // (column, value) pairs of the gather part
  float* cvals = scratch<float, 2>(size_t(nm.kc));
  if (!vbuf || !cols || !cvals) return Status::out_of_memory;

  // 2:4: whole 8-column blocks (one meta byte, 4 kept values) go through the table. 4 * blocks kept
  // values use 8 * blocks index bits, so the gather part starts on a meta byte boundary.
  const int64_t blocks = nm.n == 2 && nm.m == 4 && nm.bits == 2 ? a.K / 8 : 0;
  const int64_t j0 = 4 * blocks;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* v = kept_values(w, n, vbuf);
    const uint8_t* meta = nm.meta + n * nm.meta_stride;
    BitReader fields(meta + j0 * nm.bits / 8);
    int64_t count = 0, base = j0 / nm.n * nm.m;
    for (int64_t j = j0, in_group = 0; j < nm.kc; ++j) {
      const int64_t col = base + fields.get(nm.bits);
      if (++in_group == nm.n) in_group = 0, base += nm.m;
      if (col >= a.K) continue;  // padding of the last group (or corrupt metadata): never read x there
      cols[count] = int32_t(col);
      cvals[count++] = v[j];
    }
    int64_t m = 0;
    for (; m + neon::kMaxRows <= a.M; m += neon::kMaxRows)
      nm_row_tile<neon::kMaxRows>(a, n, m, meta, v, blocks, cols, cvals, count);
    switch (a.M - m) {
      case 3: nm_row_tile<3>(a, n, m, meta, v, blocks, cols, cvals, count); break;
      case 2: nm_row_tile<2>(a, n, m, meta, v, blocks, cols, cvals, count); break;
      case 1: nm_row_tile<1>(a, n, m, meta, v, blocks, cols, cvals, count); break;
      default: break;
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
