// Exact-mode (fp32 x) GEMM for batches past the GEMV rows, AVX-512: int8 and int4 weights decoded
// into fp32 panels once per call and multiplied by an 8 x 32 register-blocked FMA tile. Loop nest:
// sparseinfer/panel_gemm.h.
//
// Decoders give exactly to_dense()'s values (one fp32 multiply per element) in [k][32] panels: the
// codes of 16 rows x 64 columns are transposed as bytes, then widened per k line. Group lengths
// that are not a multiple of 16 (int8) / 32 (int4) decode row by row and transpose as fp32.
//
// N:M rows (2:4 with vexpandps: 2 meta bytes say where the 8 kept values of 16 columns go) serve
// the dense fallback (dequantize_row_avx512) and nm_panel_gemm_avx512, which decodes them into the
// same fp32 panels: twice the FMAs of the kept values, at the tile's rate. It beat the sparse-aware
// nm_gemm_avx2 at 4096x4096 and lost on some MiniLM shapes (bench/README.md), so its row is
// measured-only (kMeasuredOnly): the routes of cpu_routes.py time it per layer shape. Float CSR
// likewise (csr_panel_gemm_avx512: a strip's nonzeros scattered into a zeroed panel).
#include "avx512_common.h"
#include "transpose_avx512.h"
#include "sparseinfer/panel_gemm.h"

namespace sparseinfer {

namespace {

// -- the register tile and the transpose ------------------------------------------------------------

inline __mmask16 first_lanes(int n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

struct Avx512Panel {
  static constexpr int kNR = 32;   // two zmm of output columns per tile
  static constexpr int kMR = 8;    // batch rows per tile: 16 accumulators (latency 4 x 2-4 FMA ports)
  static constexpr int kKC = 256;  // a [256][32] panel is 32 KB: streamed from L2 past an L1-resident x tile
  static constexpr int kNC = 256;  // a block's panels: 256 KB, in L2

  template <int MR>
  static void tile(const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, int nr, bool first,
                   const float* bias) {
    const __mmask16 m0 = first_lanes(nr), m1 = first_lanes(nr - 16);
    __m512 acc[MR][2];
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, c + i * ldc);
      acc[i][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, c + i * ldc + 16);
    }
    const float* xr[MR];
    for (int i = 0; i < MR; ++i) xr[i] = x + i * sx;
    for (int k = 0; k < kb; ++k) {
      const __m512 w0 = _mm512_load_ps(wp + k * kNR), w1 = _mm512_load_ps(wp + k * kNR + 16);
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_set1_ps(xr[i][k]);  // vfmadd231ps {1to16}: a broadcast from memory
        acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      }
    }
    if (bias) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, bias), b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
      for (int i = 0; i < MR; ++i) acc[i][0] = _mm512_add_ps(acc[i][0], b0), acc[i][1] = _mm512_add_ps(acc[i][1], b1);
    }
    for (int i = 0; i < MR; ++i) {
      _mm512_mask_storeu_ps(c + i * ldc, m0, acc[i][0]);
      _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc[i][1]);
    }
  }
};


// rows [32][ld] (row-major, rows >= nr and k >= kb not read) -> panel [kb][32], zero in lanes >= nr.
void rows_to_panel(const float* rows, int64_t ld, int nr, int kb, float* panel) {
  constexpr int NR = Avx512Panel::kNR;
  for (int h = 0; h < 2; ++h) {
    const int rh = nr - 16 * h;  // rows of this half that exist
    for (int k = 0; k < kb; k += 16) {
      const int kn = kb - k < 16 ? kb - k : 16;
      const __mmask16 km = first_lanes(kn);
      __m512 v[16];
      for (int j = 0; j < 16; ++j)
        v[j] = j < rh ? _mm512_maskz_loadu_ps(km, rows + (16 * h + j) * ld + k) : _mm512_setzero_ps();
      if (rh > 0) avx512::transpose16x16(v);
      for (int t = 0; t < kn; ++t) _mm512_store_ps(panel + (k + t) * NR + 16 * h, v[t]);
    }
  }
}

// A row-major scratch strip for decoders that write rows (odd group lengths, N:M).
inline float* row_strip() { return scratch<float, 2>(size_t(Avx512Panel::kNR) * Avx512Panel::kKC); }

// Per 128-bit lane, a 16 x 16 byte transpose (v[t] byte j <- v[j] byte t): four rounds of the
// perfect shuffle, each a rotation of the 8-bit (vector, byte) index by one bit.
inline void transpose16x16_epi8_x4(__m512i* v) {
  for (int round = 0; round < 4; ++round) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_epi8(v[i], v[i + 8]);
      t[2 * i + 1] = _mm512_unpackhi_epi8(v[i], v[i + 8]);
    }
    for (int i = 0; i < 16; ++i) v[i] = t[i];
  }
}

// Per-row (lane) scale and zero point of one scale group for the rows n .. n + rh - 1 (0 beyond).
struct GroupVecs {
  int64_t g = -1;
  __m512 scale;
  __m512i zero;
  void load(const QuantView& q, int64_t n, int rh, int64_t group, bool int4) {
    if (group == g) return;
    alignas(64) float s[16];
    alignas(64) int32_t z[16];
    for (int j = 0; j < 16; ++j) {
      s[j] = j < rh ? q.scale[(n + j) * q.n_groups + group] : 0.0f;
      z[j] = !int4 ? 0 : j < rh && q.zero ? q.zero[(n + j) * q.n_groups + group] : 8;
    }
    scale = _mm512_load_ps(s), zero = _mm512_load_si512(z), g = group;
  }
};

// Codes (int8 lanes, 16 rows) of byte lane L of v[t], t < 16, -> panel lines k = first + step * t
// (< kb), 16 lanes from column `lane0`: (code - zero) * scale, one fp32 multiply like to_dense().
template <int L, bool Signed>
inline void emit_lane(const __m512i* v, const GroupVecs& gv, int first, int step, int kb, float* panel, int lane0) {
  for (int t = 0; t < 16; ++t) {
    const int k = first + step * t;
    if (k >= kb) break;
    const __m128i c = _mm512_extracti32x4_epi32(v[t], L);
    const __m512i wi = Signed ? _mm512_cvtepi8_epi32(c) : _mm512_sub_epi32(_mm512_cvtepu8_epi32(c), gv.zero);
    _mm512_store_ps(panel + k * Avx512Panel::kNR + lane0, _mm512_mul_ps(_mm512_cvtepi32_ps(wi), gv.scale));
  }
}

inline void zero_half(int kb, float* panel, int lane0) {
  for (int k = 0; k < kb; ++k) _mm512_store_ps(panel + k * Avx512Panel::kNR + lane0, _mm512_setzero_ps());
}

// int8 strip, scale groups a multiple of 16: 16 rows x 64 codes per step, transposed as bytes (one
// shuffle per 16 outputs instead of four for fp32), then widened per k line.
void decode_int8_panel(const QuantView& q, int64_t n, int nr, int64_t k0, int kb, float* panel) {
  for (int h = 0; h < 2; ++h) {
    const int rh = nr - 16 * h < 16 ? nr - 16 * h : 16;
    if (rh <= 0) { zero_half(kb, panel, 16 * h); continue; }
    const int8_t* base = static_cast<const int8_t*>(q.codes) + (n + 16 * h) * q.kp + k0;
    GroupVecs gv[4];
    for (int k = 0; k < kb; k += 64) {
      const int kn = kb - k < 64 ? kb - k : 64;
      const __mmask64 km = kn >= 64 ? ~__mmask64(0) : (__mmask64(1) << kn) - 1;
      __m512i v[16];
      for (int j = 0; j < 16; ++j) v[j] = j < rh ? _mm512_maskz_loadu_epi8(km, base + j * q.kp + k) : _mm512_setzero_si512();
      transpose16x16_epi8_x4(v);  // lane L of v[t]: column k + 16 L + t
      for (int L = 0; L < 4 && k + 16 * L < kb; ++L) gv[L].load(q, n + 16 * h, rh, (k0 + k + 16 * L) / q.group, false);
      emit_lane<0, true>(v, gv[0], k, 1, kb, panel, 16 * h);
      emit_lane<1, true>(v, gv[1], k + 16, 1, kb, panel, 16 * h);
      emit_lane<2, true>(v, gv[2], k + 32, 1, kb, panel, 16 * h);
      emit_lane<3, true>(v, gv[3], k + 48, 1, kb, panel, 16 * h);
    }
  }
}

// int4 strip, scale groups a multiple of 32 (k0 is even): per row, 32 bytes = 64 codes split into
// the low nibbles (even k) and the high nibbles (odd k), then the byte transpose as for int8.
void decode_int4_panel(const QuantView& q, int64_t n, int nr, int64_t k0, int kb, float* panel) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    const int rh = nr - 16 * h < 16 ? nr - 16 * h : 16;
    if (rh <= 0) { zero_half(kb, panel, 16 * h); continue; }
    const uint8_t* base = static_cast<const uint8_t*>(q.codes) + (n + 16 * h) * (q.kp / 2) + k0 / 2;
    GroupVecs glo, ghi;  // columns k .. k + 31, k + 32 .. k + 63
    for (int k = 0; k < kb; k += 64) {
      const int bytes = (kb - k < 64 ? kb - k + 1 : 64) / 2;
      const __mmask32 bm = bytes >= 32 ? ~__mmask32(0) : (__mmask32(1) << bytes) - 1;
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        if (j >= rh) { v[j] = _mm512_setzero_si512(); continue; }
        const __m256i b = _mm256_maskz_loadu_epi8(bm, base + j * (q.kp / 2) + k / 2);
        const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        v[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      }
      transpose16x16_epi8_x4(v);  // lane 0: k + 2t, 1: k + 32 + 2t, 2: k + 2t + 1, 3: k + 33 + 2t
      glo.load(q, n + 16 * h, rh, (k0 + k) / q.group, true);
      if (k + 32 < kb) ghi.load(q, n + 16 * h, rh, (k0 + k + 32) / q.group, true);
      emit_lane<0, false>(v, glo, k, 2, kb, panel, 16 * h);
      emit_lane<2, false>(v, glo, k + 1, 2, kb, panel, 16 * h);
      if (k + 32 < kb) {
        emit_lane<1, false>(v, ghi, k + 32, 2, kb, panel, 16 * h);
        emit_lane<3, false>(v, ghi, k + 33, 2, kb, panel, 16 * h);
      }
    }
  }
}

// -- row decoders: out[kk] = W[n, k0 + kk], kk < kb ------------------------------------------------

void decode_int8_row(const QuantView& q, int64_t n, int64_t k0, int kb, float* out) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + n * q.kp;
  const float* scale = q.scale + n * q.n_groups;
  const int64_t end = k0 + kb;
  for (int64_t k = k0; k < end;) {  // one scale group at a time (any group length)
    const int64_t ge = panel::group_end(q, k, end);
    const __m512 s = _mm512_set1_ps(scale[k / q.group]);
    for (; k < ge; k += 16) {
      const __mmask16 m = first_lanes(int(ge - k));
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, codes + k)));
      _mm512_mask_storeu_ps(out + (k - k0), m, _mm512_mul_ps(v, s));
    }
    k = ge;
  }
}

// 16 int4 codes from byte p on (element k even: low nibble first), `count` <= 16 of them read.
inline __m512i load_u4x16_even(const uint8_t* p, int count) {
  const __m128i b = _mm_maskz_loadu_epi8(first_lanes((count + 1) / 2), p);
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
}

void decode_int4_row(const QuantView& q, int64_t n, int64_t k0, int kb, float* out) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2);
  const float* scale = q.scale + n * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + n * q.n_groups : nullptr;
  const int64_t end = k0 + kb;
  for (int64_t k = k0; k < end; k += 16) {  // k0 is even, so every chunk starts on a byte
    const int cnt = int(end - k < 16 ? end - k : 16);
    const __m512i codes = load_u4x16_even(bytes + (k >> 1), cnt);
    const int64_t g = k / q.group;
    if ((k + cnt - 1) / q.group == g) {  // one scale group (every power-of-two group >= 16)
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(zero ? zero[g] : 8)));
      _mm512_mask_storeu_ps(out + (k - k0), first_lanes(cnt), _mm512_mul_ps(v, _mm512_set1_ps(scale[g])));
    } else {  // a group boundary inside the chunk: per element
      alignas(64) int32_t c[16];
      _mm512_store_si512(c, codes);
      for (int i = 0; i < cnt; ++i) {
        const int64_t gi = (k + i) / q.group;
        out[k - k0 + i] = float(c[i] - (zero ? zero[gi] : 8)) * scale[gi];
      }
    }
  }
}

// Kept value j of N:M row n as fp32 (float values widened, codes dequantized).
inline float nm_value(const WeightView& w, int64_t n, int64_t j) {
  switch (w.nm.values) {
    case ValueKind::i8: return dequant_int8(w.q, n, j);
    case ValueKind::i4: return dequant_int4(w.q, n, j);
    default: return load_float_value(w.nm.fvalues, w.nm.values, n * w.nm.kc + j);
  }
}

// Generic N:M: zero, then add each kept value of the groups that can reach [k0, k0 + kb) at its
// column (an index is a `bits`-wide field, so group g reaches g*m .. g*m + 2^bits - 1; indices are
// not trusted). Added, not stored, like the scalar kernel sums duplicate columns.
void decode_nm_row_generic(const WeightView& w, int64_t n, int64_t k0, int kb, float* out) {
  const NMView& nm = w.nm;
  for (int i = 0; i < kb; ++i) out[i] = 0.0f;
  const int64_t reach = (int64_t(1) << (nm.bits < 31 ? nm.bits : 31)) - 1;
  int64_t g = k0 > reach ? (k0 - reach) / nm.m : 0;
  const int64_t end = k0 + kb < w.K ? k0 + kb : w.K;
  int64_t j = g * nm.n;
  const int64_t bit = j * nm.bits;
  BitReader meta(nm.meta + n * nm.meta_stride + bit / 8);
  if (bit % 8) meta.get(int(bit % 8));
  for (; g * nm.m < end && j < nm.kc; ++g)
    for (int t = 0; t < nm.n && j < nm.kc; ++t, ++j) {
      const int64_t col = g * nm.m + meta.get(nm.bits);
      if (col >= k0 && col < end) out[col - k0] += nm_value(w, n, j);
    }
}

// 2:4: a meta byte holds the indices of 2 groups (8 columns). kExpand24[byte] = the 8-bit mask of
// the columns they name, or 0 when a group's indices are not strictly ascending (vexpandps would
// misplace them: that block takes the generic path).
struct Expand24 {
  uint8_t mask[256];
  constexpr Expand24() : mask() {
    for (int b = 0; b < 256; ++b) {
      const int i0 = b & 3, i1 = (b >> 2) & 3, i2 = (b >> 4) & 3, i3 = b >> 6;
      mask[b] = i0 < i1 && i2 < i3 ? uint8_t((1 << i0) | (1 << i1) | (16 << i2) | (16 << i3)) : 0;
    }
  }
};
constexpr Expand24 kExpand24;

// The 8 kept values j .. j + 7 of row n (j a multiple of 8; quantized values: q.group % 8 == 0).
inline __m256 nm_values8(const WeightView& w, int64_t n, int64_t j) {
  const NMView& nm = w.nm;
  switch (nm.values) {
    case ValueKind::f32: return _mm256_loadu_ps(static_cast<const float*>(nm.fvalues) + n * nm.kc + j);
    case ValueKind::bf16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(nm.fvalues) + n * nm.kc + j));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    case ValueKind::f16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(nm.fvalues) + n * nm.kc + j)));
    case ValueKind::i8: {
      const QuantView& q = w.q;
      const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(q.codes) + n * q.kp + j));
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), _mm256_set1_ps(q.scale[n * q.n_groups + j / q.group]));
    }
    default: {  // i4
      const QuantView& q = w.q;
      const int64_t g = n * q.n_groups + j / q.group;
      const __m128i b = _mm_maskz_loadu_epi8(0xF, static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2) + j / 2);
      const __m128i nib = _mm_set1_epi8(0x0F);
      const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, nib), _mm_and_si128(_mm_srli_epi16(b, 4), nib));
      const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(c), _mm256_set1_epi32(q.zero ? q.zero[g] : 8));
      return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(q.scale[g]));
    }
  }
}

void decode_nm_row(const WeightView& w, int64_t n, int64_t k0, int kb, float* out) {
  const NMView& nm = w.nm;
  const bool quantized = nm.values == ValueKind::i8 || nm.values == ValueKind::i4;
  if (!(nm.n == 2 && nm.m == 4 && nm.bits == 2) || (quantized && w.q.group % 8) || k0 % 16)
    return decode_nm_row_generic(w, n, k0, kb, out);
  const uint8_t* meta = nm.meta + n * nm.meta_stride;
  int kk = 0;
  for (; kk + 16 <= kb && k0 + kk + 16 <= w.K; kk += 16) {  // 16 columns = 8 kept values = 2 meta bytes
    const int64_t j = (k0 + kk) / 2;
    const uint32_t lo = kExpand24.mask[meta[j / 4]], hi = kExpand24.mask[meta[j / 4 + 1]];
    if (!lo || !hi) {  // indices out of order: the generic decoder, for these 16 columns only
      decode_nm_row_generic(w, n, k0 + kk, 16, out + kk);
      continue;
    }
    const __m512 v = _mm512_castps256_ps512(nm_values8(w, n, j));
    _mm512_storeu_ps(out + kk, _mm512_maskz_expand_ps(__mmask16(lo | hi << 8), v));
  }
  if (kk < kb) decode_nm_row_generic(w, n, k0 + kk, kb - kk, out + kk);
}

// The N:M layout invariants the decoders rely on (values present for their kind).
bool nm_view_ok(const WeightView& w) {
  const NMView& nm = w.nm;
  const bool quantized = nm.values == ValueKind::i8 || nm.values == ValueKind::i4;
  return nm.n >= 1 && nm.m > nm.n && nm.bits >= 1 && nm.bits <= 32 && nm.kc >= 1 &&
         (quantized ? w.q.group > 0 && w.q.kp >= nm.kc && w.q.codes && w.q.scale : nm.fvalues != nullptr);
}

// int8 / int4 differ only in their decoders and in the group length the whole-panel decoder needs
// (16 int8 / 32 int4 codes per 16-byte load); other groups decode row by row, then transpose.
template <bool Int4>
Status quant_panel_gemm(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (panel::check_quant(w.q, a.K, Int4) != Status::ok) return Status::invalid_argument;
  const QuantView& q = w.q;
  if (q.group % (Int4 ? 32 : 16) == 0)
    return panel::gemm<Avx512Panel>(a, n_begin, n_end, [&q](int64_t n, int nr, int64_t k0, int kb, float* panel) {
      if constexpr (Int4) decode_int4_panel(q, n, nr, k0, kb, panel);
      else decode_int8_panel(q, n, nr, k0, kb, panel);
      return true;
    });
  float* rows = row_strip();
  if (!rows) return Status::out_of_memory;
  return panel::gemm<Avx512Panel>(a, n_begin, n_end, [&q, rows](int64_t n, int nr, int64_t k0, int kb, float* panel) {
    for (int j = 0; j < nr; ++j) {
      if constexpr (Int4) decode_int4_row(q, n + j, k0, kb, rows + j * Avx512Panel::kKC);
      else decode_int8_row(q, n + j, k0, kb, rows + j * Avx512Panel::kKC);
    }
    rows_to_panel(rows, Avx512Panel::kKC, nr, kb, panel);
    return true;
  });
}

}  // namespace

// N:M strip: its rows decoded (decode_nm_row), then transposed into the panel.
Status nm_panel_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (!nm_view_ok(w)) return Status::invalid_argument;
  float* rows = row_strip();
  if (!rows) return Status::out_of_memory;
  return panel::gemm<Avx512Panel>(a, n_begin, n_end, [&w, rows](int64_t n, int nr, int64_t k0, int kb, float* panel) {
    for (int j = 0; j < nr; ++j) decode_nm_row(w, n + j, k0, kb, rows + j * Avx512Panel::kKC);
    rows_to_panel(rows, Avx512Panel::kKC, nr, kb, panel);
    return true;
  });
}

// CSR strip: the panel zeroed, then each row's nonzeros in [k0, k0 + kb) stored at (col - k0, j);
// a row's first such entry found by binary search (columns strictly increase: checked at prepack).
// Values as csr_gemm_scalar takes them (float, or int8 code times the row's scale).
Status csr_panel_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const CSRView& c = w.csr;
  if (c.kind == ValueKind::i4 || (c.kind == ValueKind::i8 && !c.scale)) return Status::invalid_argument;
  return panel::gemm<Avx512Panel>(a, n_begin, n_end, [&c](int64_t n, int nr, int64_t k0, int kb, float* panel) {
    constexpr int NR = Avx512Panel::kNR;
    for (int k = 0; k < kb; ++k) {
      _mm512_store_ps(panel + k * NR, _mm512_setzero_ps());
      _mm512_store_ps(panel + k * NR + 16, _mm512_setzero_ps());
    }
    for (int j = 0; j < nr; ++j) {
      const int32_t* col = c.col;
      int64_t lo = c.crow[n + j], hi = c.crow[n + j + 1];
      while (lo < hi) {  // first entry with col >= k0
        const int64_t mid = lo + (hi - lo) / 2;
        if (col[mid] < k0) lo = mid + 1; else hi = mid;
      }
      const int64_t end = c.crow[n + j + 1], kend = k0 + kb;
      if (c.kind == ValueKind::i8) {
        const int8_t* codes = static_cast<const int8_t*>(c.values);
        const float s = c.scale[n + j];
        for (int64_t e = lo; e < end && col[e] < kend; ++e) panel[(col[e] - k0) * NR + j] = float(codes[e]) * s;
      } else {
        for (int64_t e = lo; e < end && col[e] < kend; ++e) panel[(col[e] - k0) * NR + j] = load_float_value(c.values, c.kind, e);
      }
    }
    return true;
  });
}

Status int8_panel_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<false>(a, w, n_begin, n_end);
}

Status int4_panel_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<true>(a, w, n_begin, n_end);
}

// The dense fallback's row dequantizer (ref/dequantize_ref.cpp calls it through dispatch.cpp):
// the decoders above over the whole row, the same values as to_dense(). CSR stays scalar.
bool dequantize_row_avx512(const WeightView& w, int64_t n, float* out) {
  switch (w.id) {
    case KernelId::int8:
      if (panel::check_quant(w.q, w.K, false) != Status::ok) return false;
      decode_int8_row(w.q, n, 0, int(w.K), out);
      return true;
    case KernelId::int4:
      if (panel::check_quant(w.q, w.K, true) != Status::ok) return false;
      decode_int4_row(w.q, n, 0, int(w.K), out);
      return true;
    case KernelId::nm_float: case KernelId::nm_int8: case KernelId::nm_int4:
      if (!nm_view_ok(w)) return false;
      decode_nm_row(w, n, 0, int(w.K), out);
      return true;
    default: return false;
  }
}

}  // namespace sparseinfer
