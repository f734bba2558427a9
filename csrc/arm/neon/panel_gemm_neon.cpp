// Exact-mode (fp32 x) GEMM for batches past the GEMV rows, NEON (aarch64 baseline ASIMD): int8 and
// int4 weights decoded into fp32 panels once per call and multiplied by a 5 x 16 register-blocked
// FMA tile (20 of the 32 vector registers accumulate). Loop nest: sparseinfer/panel_gemm.h.
//
// Decoders give exactly to_dense()'s values (one fp32 multiply per element, any group length): a
// strip's 16 rows are decoded row by row (8 / 16 codes widened at a time, one scale per group)
// into a row-major scratch, then moved into the [k][16] panel by 4 x 4 transposes.
#include "neon_common.h"
#include "sparseinfer/panel_gemm.h"

namespace sparseinfer {

namespace {

struct NeonPanel {
  static constexpr int kNR = 16;   // four q registers of output columns per tile
  static constexpr int kMR = 5;    // batch rows per tile: 20 accumulators + 4 panel loads + 5 x = 29 of 32 (6 rows: 34, spills)
  static constexpr int kKC = 256;  // a [256][16] panel is 16 KB: streamed from L2 past an L1-resident 5 x 256 x tile
  static constexpr int kNC = 256;  // a block's panels: 256 KB, in L2

  template <int MR>
  static void tile(const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, int nr, bool first,
                   const float* bias) {
    panel::tile_through_copy<NeonPanel, MR>(x, sx, wp, kb, c, ldc, nr, first, bias);
  }

  // The unroll pragmas keep the accumulators in registers (see panel_gemm_avx2.cpp).
  template <int MR>
  static void full_tile(const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, bool first,
                        const float* bias) {
    float32x4_t acc[MR][4];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[i][q] = first ? vdupq_n_f32(0.f) : vld1q_f32(c + i * ldc + 4 * q);
    const float* xr[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xr[i] = x + i * sx;
    for (int k = 0; k < kb; ++k) {
      const float* p = wp + k * kNR;
      const float32x4_t w0 = vld1q_f32(p), w1 = vld1q_f32(p + 4), w2 = vld1q_f32(p + 8), w3 = vld1q_f32(p + 12);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const float xv = xr[i][k];
        acc[i][0] = vfmaq_n_f32(acc[i][0], w0, xv);
        acc[i][1] = vfmaq_n_f32(acc[i][1], w1, xv);
        acc[i][2] = vfmaq_n_f32(acc[i][2], w2, xv);
        acc[i][3] = vfmaq_n_f32(acc[i][3], w3, xv);
      }
    }
    if (bias) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const float32x4_t b = vld1q_f32(bias + 4 * q);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) acc[i][q] = vaddq_f32(acc[i][q], b);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) vst1q_f32(c + i * ldc + 4 * q, acc[i][q]);
  }
};

constexpr int NR = NeonPanel::kNR, KC = NeonPanel::kKC;

// -- row decoders: out[kk] = W[n, k0 + kk], kk < kb ------------------------------------------------

void decode_int8_row(const QuantView& q, int64_t n, int64_t k0, int kb, float* out) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + n * q.kp;
  const float* scale = q.scale + n * q.n_groups;
  const int64_t end = k0 + kb;
  for (int64_t k = k0; k < end;) {
    const int64_t ge = panel::group_end(q, k, end);
    const float s = scale[k / q.group];
    for (; k + 8 <= ge; k += 8) {
      float32x4_t lo, hi;
      neon::load_i8x8(codes + k, lo, hi);
      vst1q_f32(out + (k - k0), vmulq_n_f32(lo, s));
      vst1q_f32(out + (k - k0) + 4, vmulq_n_f32(hi, s));
    }
    for (; k < ge; ++k) out[k - k0] = float(codes[k]) * s;
  }
}

// k0 is a multiple of KC (even), so a 16-code step that starts on an even column starts on a byte.
void decode_int4_row(const QuantView& q, int64_t n, int64_t k0, int kb, float* out) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2);
  const float* scale = q.scale + n * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + n * q.n_groups : nullptr;
  const int64_t end = k0 + kb;
  for (int64_t k = k0; k < end;) {
    const int64_t ge = panel::group_end(q, k, end), g = k / q.group;
    const float s = scale[g];
    const int z = zero ? zero[g] : 8;
    if (k & 1) out[k - k0] = float(((bytes[k >> 1] >> 4) & 0xF) - z) * s, ++k;  // a group starting mid-byte
    const int16x8_t vz = vdupq_n_s16(int16_t(z));
    for (; k + 16 <= ge; k += 16) {
      float32x4_t w[4];
      neon::load_u4x16(bytes + (k >> 1), vz, w);
      for (int i = 0; i < 4; ++i) vst1q_f32(out + (k - k0) + 4 * i, vmulq_n_f32(w[i], s));
    }
    for (; k < ge; ++k) out[k - k0] = float(((bytes[k >> 1] >> ((k & 1) * 4)) & 0xF) - z) * s;
  }
}

// rows [16][KC] (rows >= nr and columns >= kb are zero) -> panel [kb][16] by 4 x 4 transposes
// (lines up to kb rounded up to 4 are written; the panel has KC lines).
void rows_to_panel(const float* rows, int kb, float* panel) {
  for (int r = 0; r < NR; r += 4) {
    for (int k = 0; k < kb; k += 4) {
      const float32x4_t a = vld1q_f32(rows + (r + 0) * KC + k), b = vld1q_f32(rows + (r + 1) * KC + k);
      const float32x4_t c = vld1q_f32(rows + (r + 2) * KC + k), d = vld1q_f32(rows + (r + 3) * KC + k);
      const float32x4_t ab0 = vtrn1q_f32(a, b), ab1 = vtrn2q_f32(a, b);  // (a0 b0 a2 b2), (a1 b1 a3 b3)
      const float32x4_t cd0 = vtrn1q_f32(c, d), cd1 = vtrn2q_f32(c, d);
      const float64x2_t ab0d = vreinterpretq_f64_f32(ab0), ab1d = vreinterpretq_f64_f32(ab1);
      const float64x2_t cd0d = vreinterpretq_f64_f32(cd0), cd1d = vreinterpretq_f64_f32(cd1);
      vst1q_f32(panel + (k + 0) * NR + r, vreinterpretq_f32_f64(vtrn1q_f64(ab0d, cd0d)));  // column k: a0 b0 c0 d0
      vst1q_f32(panel + (k + 1) * NR + r, vreinterpretq_f32_f64(vtrn1q_f64(ab1d, cd1d)));
      vst1q_f32(panel + (k + 2) * NR + r, vreinterpretq_f32_f64(vtrn2q_f64(ab0d, cd0d)));
      vst1q_f32(panel + (k + 3) * NR + r, vreinterpretq_f32_f64(vtrn2q_f64(ab1d, cd1d)));
    }
  }
}

template <bool Int4>
Status quant_panel_gemm(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (panel::check_quant(q, a.K, Int4) != Status::ok) return Status::invalid_argument;
  float* rows = scratch<float, 2>(size_t(NR) * KC);
  if (!rows) return Status::out_of_memory;
  return panel::gemm<NeonPanel>(a, n_begin, n_end, [&q, rows](int64_t n, int nr, int64_t k0, int kb, float* panel) {
    const int kb4 = (kb + 3) / 4 * 4;
    for (int j = 0; j < NR; ++j) {
      float* row = rows + j * KC;
      int kk = 0;
      if (j < nr) {
        if constexpr (Int4) decode_int4_row(q, n + j, k0, kb, row);
        else decode_int8_row(q, n + j, k0, kb, row);
        kk = kb;
      }
      for (; kk < kb4; ++kk) row[kk] = 0.f;
    }
    rows_to_panel(rows, kb, panel);
    return true;
  });
}

}  // namespace

Status int8_panel_gemm_neon(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<false>(a, w, n_begin, n_end);
}

Status int4_panel_gemm_neon(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<true>(a, w, n_begin, n_end);
}

}  // namespace sparseinfer
