// Building blocks of the AVX2 sparse kernels (nm_*_avx2.cpp, csr_*_avx2.cpp), compiled with
// -mavx2 -mfma -mf16c. Internal linkage and no std:: templates, as every ISA header (csrc/README.md).
//
// Two ways to meet a sparse weight row, picked by batch size (dispatch.cpp tables, thresholds
// measured by bench/cpu_sparse_roofline.py):
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

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace sp {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// An empty asm that claims to change v: keeps scalar gather loops scalar. GCC's vectorizer turns
// them into vinsertps / vpermd sequences that run ~2x slower than plain loads on this core.
inline void keep_scalar(float& v) { __asm__("" : "+x"(v)); }

inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
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

// y[m0 + r, n] = acc lane r (r < rows), through store_output (bias, rounding).
inline void store_acc(const GemmArgs& a, int64_t m0, int64_t rows, int64_t n, const __m256* acc) {
  alignas(32) float buf[64];
  const int nv = int((rows + 7) / 8);
  for (int i = 0; i < nv; ++i) _mm256_store_ps(buf + 8 * i, acc[i]);
  for (int64_t r = 0; r < rows; ++r) store_output(a, m0 + r, n, buf[r]);
}

}  // namespace sp
}  // namespace
}  // namespace sparseinfer
