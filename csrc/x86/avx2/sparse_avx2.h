// Building blocks of the AVX2 sparse kernels (nm_*_avx2.cpp, csr_*_avx2.cpp), compiled with
// -mavx2 -mfma -mf16c. Internal linkage and no std:: templates, as every ISA header (csrc/README.md).
//
// Two ways to meet a sparse weight row, picked by batch size (dispatch.cpp tables; thresholds
// measured, and re-measured on the user's machine by `sparseinfer calibrate`):
//
//   gemv (few batch rows)  the weight streams once from memory; x (a few KiB per row) sits in L1.
//     2:4 gathers x in registers: x is rearranged once per call so that one 256-bit load holds
//     groups {0, 2} and the next groups {1, 3} of a 16-column block (permute_x24); then two
//     in-lane vpshufb (controls from a 4 KiB table indexed by meta byte) and a blend deliver the
//     8 kept x values of the block in kept-value order. No gather instruction (vgatherdps), no
//     cross-lane or variable-control float permute: all measured several times slower here.
//   gemm (many batch rows) x is transposed into xT[k][MB] (MB batch rows contiguous, zero-padded
//     to whole vectors): every kept value (column c, value v) then costs MB/8 loads of xT[c] and
//     MB/8 FMAs with v broadcast -- the XNNPACK SpMM idea (weights stationary, batch contiguous).
//     Half the FMAs of the dense product for 2:4, and no wasted work on zeros for CSR.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "avx2_common.h"
#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace sp {

using avx2::hsum;

// An empty asm that claims to change v: keeps scalar gather loops scalar. GCC's vectorizer turns
// them into vinsertps / vpermd sequences that run ~2x slower than plain loads on this core.
inline void keep_scalar(float& v) { __asm__("" : "+x"(v)); }

inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// -- checks ------------------------------------------------------------------------------------

// The N:M view invariants every N:M kernel needs (sizes, the value streams of its kind).
inline Status check_nm(const WeightView& w) {
  const NMView& nm = w.nm;
  if (nm.n < 1 || nm.m <= nm.n || nm.bits < 1 || nm.bits > 32 || nm.kc < 1) return Status::invalid_argument;
  const bool quantized = nm.values == ValueKind::i8 || nm.values == ValueKind::i4;
  if (quantized && (w.q.group <= 0 || w.q.kp < nm.kc || !w.q.codes || !w.q.scale)) return Status::invalid_argument;
  if (!quantized && !nm.fvalues) return Status::invalid_argument;
  return Status::ok;
}

inline bool is_24(const NMView& nm) { return nm.n == 2 && nm.m == 4; }

// Value kinds the CSR kernels take: float, or int8 with its per-row scale.
inline Status check_csr(const CSRView& c) {
  if (c.kind == ValueKind::i4) return Status::unsupported_dtype;
  if (c.kind == ValueKind::i8 && !c.scale) return Status::invalid_argument;
  return Status::ok;
}

// -- values ------------------------------------------------------------------------------------

// 8 float values (f32 / bf16 / f16) at p -> fp32, exactly (bf16: shift; f16: F16C is exact).
template <ValueKind V>
inline __m256 load8(const void* p) {
  if (V == ValueKind::f32) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  if (V == ValueKind::bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <ValueKind V>
inline float load1(const void* p, int64_t j) {
  if (V == ValueKind::f32) return static_cast<const float*>(p)[j];
  if (V == ValueKind::bf16) return bf16_to_f32(static_cast<const uint16_t*>(p)[j]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[j]);
}

// Float values [0, count) of kind `kind` at p (element offset j0) -> fp32 dst.
inline void widen(const void* base, ValueKind kind, int64_t j0, int64_t count, float* dst) {
  int64_t j = 0;
  if (kind == ValueKind::f32) {
    std::memcpy(dst, static_cast<const float*>(base) + j0, size_t(count) * 4);
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(base) + j0;
  if (kind == ValueKind::bf16) {
    for (; j + 8 <= count; j += 8) _mm256_storeu_ps(dst + j, load8<ValueKind::bf16>(p + j));
    for (; j < count; ++j) dst[j] = bf16_to_f32(p[j]);
  } else {
    for (; j + 8 <= count; j += 8) _mm256_storeu_ps(dst + j, load8<ValueKind::f16>(p + j));
    for (; j < count; ++j) dst[j] = f16_to_f32(p[j]);
  }
}

// Row `row` of a quantized (rows, kc) value matrix, entries [j0, j1), dequantized to dst[j - j0]:
// code * scale (int8) or (code - zero) * scale (int4), one fp32 rounding each, as to_dense().
inline void dequant_int8(const QuantView& q, int64_t row, int64_t j0, int64_t j1, float* dst) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + row * q.kp;
  const float* scale = q.scale + row * q.n_groups;
  for (int64_t j = j0; j < j1;) {
    const int64_t g = j / q.group;
    const int64_t end = (g + 1) * q.group < j1 ? (g + 1) * q.group : j1;
    const float s = scale[g];
    const __m256 vs = _mm256_set1_ps(s);
    for (; j + 8 <= end; j += 8) {
      const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
      _mm256_storeu_ps(dst + (j - j0), _mm256_mul_ps(_mm256_cvtepi32_ps(c), vs));
    }
    for (; j < end; ++j) dst[j - j0] = float(codes[j]) * s;
  }
}

inline void dequant_int4(const QuantView& q, int64_t row, int64_t j0, int64_t j1, float* dst) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + row * (q.kp / 2);
  const float* scale = q.scale + row * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + row * q.n_groups : nullptr;
  // lane i of a broadcast 32-bit word >> 4i holds code k..k+7 in order (low nibble = even k)
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low4 = _mm256_set1_epi32(0xF);
  for (int64_t j = j0; j < j1;) {
    const int64_t g = j / q.group;
    const int64_t end = (g + 1) * q.group < j1 ? (g + 1) * q.group : j1;
    const float s = scale[g];
    const int z = zero ? zero[g] : 8;
    if ((j & 1) && j < end) dst[j - j0] = float(((bytes[j >> 1] >> 4) & 0xF) - z) * s, ++j;  // odd start
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i vz = _mm256_set1_epi32(z);
    for (; j + 8 <= end; j += 8) {
      const __m256i w = _mm256_set1_epi32(int32_t(load_u32(bytes + (j >> 1))));
      const __m256i c = _mm256_sub_epi32(_mm256_and_si256(_mm256_srlv_epi32(w, shifts), low4), vz);
      _mm256_storeu_ps(dst + (j - j0), _mm256_mul_ps(_mm256_cvtepi32_ps(c), vs));
    }
    for (; j < end; ++j) dst[j - j0] = float(((bytes[j >> 1] >> ((j & 1) * 4)) & 0xF) - z) * s;
  }
}

// Kept values [j0, j1) of N:M row n as fp32 into dst (any value kind).
inline void nm_values(const WeightView& w, int64_t n, int64_t j0, int64_t j1, float* dst) {
  const NMView& nm = w.nm;
  switch (nm.values) {
    case ValueKind::i8: dequant_int8(w.q, n, j0, j1, dst); break;
    case ValueKind::i4: dequant_int4(w.q, n, j0, j1, dst); break;
    default: widen(nm.fvalues, nm.values, n * nm.kc + j0, j1 - j0, dst); break;
  }
}

// -- N:M index decode ------------------------------------------------------------------------

// Columns of kept values [j0, j1) of an N:M row (any n, m), through the little-endian bit stream;
// (column, value) pairs with column >= K are dropped (padding of the last group; indices are not
// trusted). vals holds values [j0, j1); pairs are compacted in place. Returns how many are left.
inline int64_t nm_decode_generic(const NMView& nm, const uint8_t* meta_row, int64_t K, int64_t j0, int64_t j1,
                                 int32_t* cols, float* vals) {
  // Start the bit reader at the byte holding bit j0 * bits.
  const int64_t bit0 = j0 * nm.bits;
  BitReader r(meta_row + (bit0 >> 3));
  if (bit0 & 7) r.get(int(bit0 & 7));
  int64_t out = 0, group = j0 / nm.n, in_group = j0 % nm.n;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t col = group * nm.m + r.get(nm.bits);
    if (++in_group == nm.n) in_group = 0, ++group;
    if (col >= K) continue;
    cols[out] = int32_t(col);
    vals[out++] = vals[j - j0];
  }
  return out;
}

// 2:4 columns of kept values [j0, j1) with j0 % 16 == 0 and every column < K (whole 32-column
// blocks, see callers), times `mult` (the row stride of xT): 16 at a time from one 32-bit word.
inline void nm24_cols(const uint8_t* meta_row, int64_t j0, int64_t j1, int32_t mult, int32_t* cols) {
  const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256i three = _mm256_set1_epi32(3), vm = _mm256_set1_epi32(mult);
  // kept value l of a 16-column block sits at 4 * (l / 2) + idx_l
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  for (int64_t j = j0; j < j1; j += 16) {
    const __m256i word = _mm256_set1_epi32(int32_t(load_u32(meta_row + j / 4)));
    const __m256i col0 = _mm256_set1_epi32(int32_t(j * 2));  // 16 kept values span 32 columns
    const __m256i c0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(word, sh0), three), base), col0);
    const __m256i c1 = _mm256_add_epi32(_mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(word, sh1), three), base),
                                        _mm256_add_epi32(col0, _mm256_set1_epi32(16)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + (j - j0)), _mm256_mullo_epi32(c0, vm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + (j - j0) + 8), _mm256_mullo_epi32(c1, vm));
  }
}

// -- activations -----------------------------------------------------------------------------

// x rows [m0, m0 + rows) -> dst [rows][kp16], kp16 = K rounded up to 16, zero-filled past K, with
// the two middle 4-float quarters of every 16-float block swapped: [A B C D] -> [A C B D]. A load
// of dst[16b .. 16b+8) then holds groups {0, 2} of 2:4 block b, and the next one groups {1, 3}.
inline void permute_x24(const GemmArgs& a, int64_t m0, int64_t rows, int64_t kp16, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = a.x + (m0 + r) * a.stride_xm;
    float* d = dst + r * kp16;
    int64_t k = 0;
    for (; k + 16 <= a.K; k += 16) {
      const __m256 lo = _mm256_loadu_ps(x + k), hi = _mm256_loadu_ps(x + k + 8);
      _mm256_storeu_ps(d + k, _mm256_permute2f128_ps(lo, hi, 0x20));      // A C
      _mm256_storeu_ps(d + k + 8, _mm256_permute2f128_ps(lo, hi, 0x31));  // B D
    }
    if (k < kp16) {
      float tmp[16];
      for (int64_t i = 0; i < 16; ++i) tmp[i] = k + i < a.K ? x[k + i] : 0.f;
      for (int i = 0; i < 4; ++i) d[k + i] = tmp[i], d[k + 4 + i] = tmp[8 + i], d[k + 8 + i] = tmp[4 + i],
                                  d[k + 12 + i] = tmp[12 + i];
    }
  }
}

// x rows [m0, m0 + rows) -> xT [K][mb] (mb a multiple of 8 >= rows; rows past `rows` are zero).
inline void transpose_x(const GemmArgs& a, int64_t m0, int64_t rows, int64_t mb, float* xT) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    const float* x0 = a.x + (m0 + r) * a.stride_xm;
    int64_t k = 0;
    for (; k + 8 <= a.K; k += 8) {
      // 8x8 transpose in registers (unpack / shuffle / permute2f128)
      __m256 t[8], u[8];
      for (int i = 0; i < 8; ++i) t[i] = _mm256_loadu_ps(x0 + i * a.stride_xm + k);
      for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(t[i], t[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(t[i], t[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        t[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
        t[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
        t[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
        t[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(xT + (k + i) * mb + r, _mm256_permute2f128_ps(t[i], t[i + 4], 0x20));
        _mm256_storeu_ps(xT + (k + i + 4) * mb + r, _mm256_permute2f128_ps(t[i], t[i + 4], 0x31));
      }
    }
    for (; k < a.K; ++k)
      for (int i = 0; i < 8; ++i) xT[k * mb + r + i] = x0[i * a.stride_xm + k];
  }
  for (; r < mb; ++r) {
    if (r < rows) {
      const float* xr = a.x + (m0 + r) * a.stride_xm;
      for (int64_t k = 0; k < a.K; ++k) xT[k * mb + r] = xr[k];
    } else {
      for (int64_t k = 0; k < a.K; ++k) xT[k * mb + r] = 0.f;
    }
  }
}

// -- gemm inner loop -------------------------------------------------------------------------

// acc[i] += sum_j vals[j] * xT[off[j] + 8 i], i < NV: one weight row against NV * 8 batch rows.
// off[j] = column * (row stride of xT), precomputed by the decoder. An FMA takes 5 cycles and the
// core retires one 256-bit FMA per cycle, so fewer than ~5 accumulators leave it idle: small NV
// spreads consecutive kept values over U independent accumulator sets, summed at the end.
template <int NV>
inline void xt_accumulate(const float* xT, const int32_t* off, const float* vals, int64_t count, __m256* acc) {
  constexpr int U = NV >= 4 ? 1 : NV == 1 ? 4 : 2;
  __m256 part[U][NV];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < NV; ++i) part[u][i] = u == 0 ? acc[i] : _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + U <= count; j += U)
    for (int u = 0; u < U; ++u) {
      const float* xr = xT + off[j + u];
      const __m256 v = _mm256_broadcast_ss(vals + j + u);
      for (int i = 0; i < NV; ++i) part[u][i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * i), part[u][i]);
    }
  for (; j < count; ++j) {
    const float* xr = xT + off[j];
    const __m256 v = _mm256_broadcast_ss(vals + j);
    for (int i = 0; i < NV; ++i) part[0][i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * i), part[0][i]);
  }
  for (int i = 0; i < NV; ++i) {
    __m256 t = part[0][i];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, part[u][i]);
    acc[i] = t;
  }
}

// Fetches the lines of y[m0 .. m0 + rows, n0 .. n1) (fp32 y) that the caller is about to store.
// The xT kernels store a batch block of up to 64 rows a few outputs at a time, one 4 KB page per
// row: more streams than the L2 prefetcher follows, so without this each line's first store waited
// for its read-for-ownership. Interleaved with and without, 256-736 rows, Xeon (no AMX), 2 threads:
// AVX-512 2:4 1.01-1.16x on the MiniLM shapes, AVX2 2:4 0.97-1.04x, CSR (90 % sparse) AVX2 1.02-1.05x,
// AVX-512 0.94-1.08x; 4096^2 1.0x.
inline void prefetch_y(const GemmArgs& a, int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
  if (a.y_dtype != DType::f32 || n1 <= n0) return;
  const float* y = static_cast<const float*>(a.y);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = y + (m0 + r) * a.stride_ym;
    for (int64_t n = n0; n < n1; n += 16) __builtin_prefetch(row + n, 1, 3);
    __builtin_prefetch(row + n1 - 1, 1, 3);
  }
}

// y[m0 + r, n] = acc lane r (r < rows), through store_output (bias, rounding).
inline void store_acc(const GemmArgs& a, int64_t m0, int64_t rows, int64_t n, const __m256* acc) {
  alignas(32) float buf[64];
  const int nv = int((rows + 7) / 8);
  for (int i = 0; i < nv; ++i) _mm256_store_ps(buf + 8 * i, acc[i]);
  for (int64_t r = 0; r < rows; ++r) store_output(a, m0 + r, n, buf[r]);
}


// -- 2:4 x int8 activations (nm_q8_gemv_avx2.cpp, nm_q8_gemm_avx2.cpp) -----------------------------
//
// The weight's prepacked copy (NMView::Q8, ref/nm_q8_prepack_ref.cpp) stores the codes and the 2-bit
// indices of each 64-column block (32 kept values) in the order of the 256-bit register they are
// gathered into: kept value 16 h + 8 L + i at byte 16 L + 8 h + i (lane L, 64-bit half h), its index
// at bits 4 L + 2 h of meta byte i. The quantized x rows are stored per block as two 32-byte halves:
// the first as is (columns 0-31), the second with each 16-byte lane 4x4-transposed (byte 4 c + g =
// column c of 4-column group g). Per block:
//   control  broadcast the 8 meta bytes, a 128-bit shift by 4 for lane 1, AND (3 in half 0 bytes,
//            12 in half 1 bytes), OR the group's offset (4 g in half 0, g in half 1): no variable
//            shift (vpsrlv* takes ~3 cycles per 256-bit op on this core, more than the whole rest).
//   gather   vpshufb of each x half with that control, vpblendd of the 64-bit halves.
//   dot      int8: |w| (u8, <= 128) x sign(x, w) (s8): no pmaddubsw pair sum saturates
//            (2 * 128 * 127 < 32767); pmaddwd into int32 per block.
//            int4: (x + 128) (u8) x (code - zero) (s8, -15..15): pair sums <= 2 * 255 * 15, so a
//            whole segment (<= 4 blocks) adds up in int16; 128 * sum(code - zero) (prepacked) comes
//            off exactly after the reduction.
// A register tile is R weight rows x MT batch rows (R * MT <= 4 int accumulators): the control and
// the decoded codes of a block serve the MT batch rows. At each segment end the 4 accumulators are
// reduced across lanes to 4 exact int32 sums (|sum| < 2^24, so float(sum) is exact too) and one
// 128-bit FMA does y = fma(float(sum), sw * sx, y) for all four outputs: the same operations, in
// the same order, for an output whatever the tile shape, the batch size or the thread split.
namespace q8 {

constexpr int64_t kBlock = 64;  // columns per gather block (32 kept values)
// Minimum software prefetch distance on the code stream (the meta stream in proportion); the tiles
// prefetch at least one tile ahead (tile()). From memory, 1 thread: 18% less time than 2 KiB behind.
constexpr int64_t kPrefetchBytes = 4096;

// One call: the quantized activations (this thread's copy) and the weight's streams.
struct Call {
  const uint8_t* xq = nullptr;  // [M][xstride] quantized x in the gather layout (int4: + 128)
  int64_t xstride = 0;
  const float* xsT = nullptr;   // [nseg][sstride] activation scales, batch rows contiguous (+ zero pad)
  int64_t sstride = 0;
  const uint8_t* codes = nullptr;  // prepacked, row_bytes per row
  int64_t row_bytes = 0;
  const uint8_t* meta = nullptr;   // prepacked, 8 bytes per block
  int64_t meta_stride = 0;
  const float* wscale = nullptr;
  int64_t n_groups = 0;
  const uint8_t* wzero = nullptr;  // int4 asymmetric, else nullptr (8)
  const int32_t* wsum = nullptr;   // int4: [N][nseg]
  int64_t nseg = 0;                // activation segments (of seg columns)
  int64_t nblk = 0, per_seg = 0;   // whole blocks per row, per full segment (1, 2 or 4)
  int gshift = 0;                  // scale group of segment s: s >> gshift
};

// 32 gather controls of one block from its 8 prepacked meta bytes.
inline __m256i block_control(const uint8_t* meta8) {
  int64_t m8;
  std::memcpy(&m8, meta8, 8);
  const __m128i m = _mm_set1_epi64x(m8);
  const __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(m), _mm_srli_epi16(m, 4), 1);
  const __m256i mask = _mm256_setr_epi8(3, 3, 3, 3, 3, 3, 3, 3, 12, 12, 12, 12, 12, 12, 12, 12,  //
                                        3, 3, 3, 3, 3, 3, 3, 3, 12, 12, 12, 12, 12, 12, 12, 12);
  const __m256i base = _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 1, 1, 2, 2, 3, 3,  //
                                        0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 1, 1, 2, 2, 3, 3);
  return _mm256_or_si256(_mm256_and_si256(c, mask), base);
}

// The 32 kept activation bytes of one block, in the codes' order.
inline __m256i gather_block(const uint8_t* xq, __m256i ctrl) {
  const __m256i a = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)), ctrl);
  const __m256i b = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)), ctrl);
  return _mm256_blend_epi32(a, b, 0xCC);
}

// 32 prepacked int4 codes (16 bytes: positions 0-15 in the low nibbles, 16-31 in the high ones).
inline __m256i int4_codes(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
  return _mm256_and_si256(c, _mm256_set1_epi8(0x0F));
}

// Lane i of the result = sum of the 8 int32 lanes of a[i] (exact).
inline __m128i reduce4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
  const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
  const __m256i t = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
  return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

// Rows [n0, n0 + R) x batch rows [m0, m0 + MT) of y, before bias: out[r * MT + t].
// PF: prefetch the weight streams ahead (the rows come from memory once: gemv).
template <bool I4, int R, int MT, bool PF>
inline void tile(const GemmArgs& a, const WeightView& w, const Call& c, int64_t n0, int64_t m0, float* out) {
  static_assert(R * MT <= 4, "4 int32 accumulators per tile");
  constexpr int A = R * MT, NA = (A + 3) / 4;  // accumulators, groups of 4 (one epilogue each)
  constexpr int64_t bb = I4 ? 16 : 32;  // code bytes per block
  const uint8_t* codes[R];
  const uint8_t* meta[R];
  const uint8_t* xr[MT];
  for (int r = 0; r < R; ++r) codes[r] = c.codes + (n0 + r) * c.row_bytes, meta[r] = c.meta + (n0 + r) * c.meta_stride;
  for (int t = 0; t < MT; ++t) xr[t] = c.xq + (m0 + t) * c.xstride;
  // prefetch the R rows as one stream at least one tile ahead: block b of this tile prefetches the
  // matching 1 / nblk of the tile that far on (rows of a thread's range are contiguous)
  const int64_t pf_dist = R * c.row_bytes > kPrefetchBytes ? R * c.row_bytes : kPrefetchBytes;
  const char* pf_codes = reinterpret_cast<const char*>(codes[0]) + pf_dist;
  const char* pf_meta = reinterpret_cast<const char*>(meta[0]) + pf_dist * 8 / bb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m128 y[NA];
  for (int i = 0; i < NA; ++i) y[i] = _mm_setzero_ps();
  for (int64_t s = 0, b = 0; b < c.nblk; ++s) {
    const int64_t b_end = b + c.per_seg < c.nblk ? b + c.per_seg : c.nblk;
    const int64_t g = s >> c.gshift;
    __m256i acc[4 * NA];
    for (int i = 0; i < 4 * NA; ++i) acc[i] = _mm256_setzero_si256();
    __m256i zero[R];
    if (I4)
      for (int r = 0; r < R; ++r) zero[r] = _mm256_set1_epi8(int8_t(c.wzero ? c.wzero[(n0 + r) * c.n_groups + g] : 8));
    for (; b < b_end; ++b) {
      if (PF) {  // R rows advance together: as one stream of R * bb bytes per block
        _mm_prefetch(pf_codes + R * bb * b, _MM_HINT_T0);
        if (R * bb > 64) _mm_prefetch(pf_codes + R * bb * b + 64, _MM_HINT_T0);
        _mm_prefetch(pf_meta + R * 8 * b, _MM_HINT_T0);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i ctrl = block_control(meta[r] + 8 * b);
        if (I4) {
          const __m256i wv = _mm256_sub_epi8(int4_codes(codes[r] + bb * b), zero[r]);
          for (int t = 0; t < MT; ++t)
            acc[r * MT + t] = _mm256_add_epi16(acc[r * MT + t], _mm256_maddubs_epi16(gather_block(xr[t] + kBlock * b, ctrl), wv));
        } else {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes[r] + bb * b));
          const __m256i wabs = _mm256_abs_epi8(wv);
          for (int t = 0; t < MT; ++t) {
            const __m256i xs = _mm256_sign_epi8(gather_block(xr[t] + kBlock * b, ctrl), wv);
            acc[r * MT + t] = _mm256_add_epi32(acc[r * MT + t], _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones));
          }
        }
      }
    }
    if (I4)
      for (int i = 0; i < A; ++i) acc[i] = _mm256_madd_epi16(acc[i], ones);
    // weight scale x activation scale of each lane (lane r * MT + t)
    const float* sx = c.xsT + s * c.sstride + m0;
    if (R == 1) {  // lanes = batch rows (past MT: the zero padding of xsT)
      const __m128 sw = _mm_set1_ps(c.wscale[n0 * c.n_groups + g]);
      for (int i = 0; i < NA; ++i) {
        __m128i sums = reduce4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
        if (I4) sums = _mm_sub_epi32(sums, _mm_set1_epi32(128 * c.wsum[n0 * c.nseg + s]));
        y[i] = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), _mm_mul_ps(sw, _mm_loadu_ps(sx + 4 * i)), y[i]);
      }
      continue;
    }
    __m128i sums = reduce4(acc[0], acc[1], acc[2], acc[3]);
    __m128 sw, sxv;
    if (MT == 1) {
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      for (int r = 0; r < R; ++r) v[r] = c.wscale[(n0 + r) * c.n_groups + g];
      sw = _mm_loadu_ps(v);
      sxv = _mm_set1_ps(sx[0]);
    } else {  // R = MT = 2
      sw = _mm_setr_ps(c.wscale[n0 * c.n_groups + g], c.wscale[n0 * c.n_groups + g],
                       c.wscale[(n0 + 1) * c.n_groups + g], c.wscale[(n0 + 1) * c.n_groups + g]);
      sxv = _mm_setr_ps(sx[0], sx[1], sx[0], sx[1]);
    }
    if (I4) {  // undo the + 128 of x: 128 * sum(code - zero) per weight row
      int32_t v[4] = {0, 0, 0, 0};
      for (int i = 0; i < A; ++i) v[i] = 128 * c.wsum[(n0 + i / MT) * c.nseg + s];
      sums = _mm_sub_epi32(sums, _mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    }
    y[0] = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), _mm_mul_ps(sw, sxv), y[0]);
  }
  alignas(16) float lanes[4 * NA];
  for (int i = 0; i < NA; ++i) _mm_store_ps(lanes + 4 * i, y[i]);
  // columns past the last whole 64-column block: exact fp32, checked against K
  const NMView& nm = w.nm;
  const int64_t j0 = c.nblk * 32;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) {
      float tail = 0.f;
      if (j0 < nm.kc) {
        const int64_t n = n0 + r;
        const float* x = a.x + (m0 + t) * a.stride_xm;
        BitReader rd(nm.meta + n * nm.meta_stride + 8 * c.nblk);
        for (int64_t j = j0; j < nm.kc; ++j) {
          const int64_t col = (j / 2) * 4 + rd.get(2);
          if (col >= a.K) continue;
          const float v = I4 ? sparseinfer::dequant_int4(w.q, n, j) : sparseinfer::dequant_int8(w.q, n, j);
          tail += v * x[col];
        }
      }
      out[r * MT + t] = lanes[r * MT + t] + tail;
    }
}


// Whether the q8 kernels take this weight (else the exact kernels serve the call).
inline bool usable(const GemmArgs& a, const WeightView& w) {
  const NMView::Q8& pre = w.nm.q8;
  return pre.codes && pre.meta && w.nm.n == 2 && w.nm.m == 4 && pre.seg % kBlock == 0 && pre.seg <= 4 * kBlock &&
         pre.nseg * pre.seg >= a.K;
}

// Quantizes x once for this thread (M x K bytes: small next to the weight rows it meets) into the
// gather layout and fills the call's pointers. Grow-only scratch, so nothing is allocated in steady state.
inline Status prepare(const GemmArgs& a, const WeightView& w, Call& c) {
  const NMView::Q8& pre = w.nm.q8;
  const QuantView& q = w.q;
  const bool int4 = w.nm.values == ValueKind::i4;
  QTileView seg;
  seg.seg = seg.seg_pad = pre.seg;
  seg.nseg = pre.nseg;
  const int64_t stride = pre.nseg * pre.seg, sstride = (a.M + 3) / 4 * 4 + 8;
  int8_t* xq = scratch<int8_t, 0>(size_t(a.M * stride));
  float* xs = scratch<float, 0>(size_t(a.M * pre.nseg));
  int32_t* sums = scratch<int32_t, 0>(size_t(a.M * pre.nseg));
  float* xsT = scratch<float, 1>(size_t(pre.nseg * sstride));
  if (!xq || !xs || !sums || !xsT) return Status::out_of_memory;
  quantize_act_avx2(a.x, a.M, a.K, a.stride_xm, seg, xq, xs, sums, 0);
  // gather layout: the second 32 bytes of every block 4x4-transposed per 16-byte lane; int4
  // multiplies x + 128 (unsigned) by code - zero
  const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,  //
                                      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i bias = _mm256_set1_epi8(int4 ? char(0x80) : 0);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t k = 0; k + kBlock <= stride; k += kBlock) {
      __m256i* p = reinterpret_cast<__m256i*>(xq + m * stride + k);
      _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), bias));
      _mm256_storeu_si256(p + 1, _mm256_xor_si256(_mm256_shuffle_epi8(_mm256_loadu_si256(p + 1), tr), bias));
    }
  // scales transposed: the MT batch rows of a tile are one 128-bit load (zero past M)
  for (int64_t s = 0; s < pre.nseg; ++s)
    for (int64_t m = 0; m < sstride; ++m) xsT[s * sstride + m] = m < a.M ? xs[m * pre.nseg + s] : 0.f;
  c.xq = reinterpret_cast<const uint8_t*>(xq), c.xstride = stride;
  c.xsT = xsT, c.sstride = sstride;
  c.codes = pre.codes, c.row_bytes = (a.K / kBlock) * (int4 ? 16 : 32);
  c.meta = pre.meta, c.meta_stride = (a.K / kBlock) * 8;
  c.wscale = q.scale, c.n_groups = q.n_groups, c.wzero = q.zero, c.wsum = pre.wsum;
  c.nseg = pre.nseg, c.nblk = a.K / kBlock, c.per_seg = pre.seg / kBlock;
  // segment s lies in scale group s / (group span / seg), a power of two (nm_q8_prepack_ref.cpp)
  c.gshift = 62;
  if (q.n_groups > 1) {
    c.gshift = 0;
    while ((pre.seg << c.gshift) < 2 * q.group) ++c.gshift;
  }
  return Status::ok;
}

}  // namespace q8

}  // namespace sp
}  // namespace
}  // namespace sparseinfer
