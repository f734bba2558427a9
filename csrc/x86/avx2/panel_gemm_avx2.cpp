// Exact-mode (fp32 x) GEMM for batches past the GEMV rows, AVX2 + FMA: int8, int4 and N:M weights
// decoded into fp32 panels once per call and multiplied by a 6 x 16 register-blocked FMA tile (the
// BLIS Haswell shape). Loop nest: sparseinfer/panel_gemm.h.
//
// Decoders give exactly to_dense()'s values in [k][16] panels:
//   int8 / int4  16 rows x 16 bytes are loaded row-wise and transposed as bytes, so each k line is
//                one register of 16 codes: widened, converted, times the rows' group scales (one
//                fp32 multiply, as to_dense()). Any group length (a boundary is checked per k).
//   N:M (float)  2:4: per row and meta byte, one vpshufb puts 4 kept values at their 8 columns
//                (zeros elsewhere), then 8 x 8 transposes make the [k][16] lines. Other patterns,
//                the K tail and repeated indices: the lines are zeroed and every kept value added at
//                its (column, row) through the bit reader (sp::nm_decode_generic); added, like the
//                scalar kernel sums duplicate columns; indices are not trusted. The panel holds the
//                zeros too: twice the FMAs of the sparse-aware nm_gemm_avx2 for 2:4 (dispatch.cpp).
#include "sparse_avx2.h"
#include "sparseinfer/panel_gemm.h"

namespace sparseinfer {

namespace {

struct Avx2Panel {
  static constexpr int kNR = 16;   // two ymm of output columns per tile
  static constexpr int kMR = 6;    // batch rows per tile: 12 accumulators + 2 panel loads + 1 broadcast = 15 ymm
  static constexpr int kKC = 256;  // a [256][16] panel is 16 KB: streamed from L2 past an L1-resident 6 x 256 x tile
  static constexpr int kNC = 256;  // a block's panels: 256 KB, half of a Zen 1 / Zen 2 L2 (512 KB)

  // The unroll pragmas in full_tile are load-bearing: without them GCC 12 -O3 (loop peeling) left the
  // 12 accumulators in memory, a store per FMA, half speed.
  template <int MR>
  static void tile(const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, int nr, bool first,
                   const float* bias) {
    panel::tile_through_copy<Avx2Panel, MR>(x, sx, wp, kb, c, ldc, nr, first, bias);
  }

  template <int MR>
  static void full_tile(const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, bool first,
                        const float* bias) {
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc);
      acc[i][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8);
    }
    const float* xr[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xr[i] = x + i * sx;
    for (int k = 0; k < kb; ++k) {
      const __m256 w0 = _mm256_load_ps(wp + k * kNR), w1 = _mm256_load_ps(wp + k * kNR + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_broadcast_ss(xr[i] + k);
        acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
      }
    }
    if (bias) {
      const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][0] = _mm256_add_ps(acc[i][0], b0), acc[i][1] = _mm256_add_ps(acc[i][1], b1);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(c + i * ldc, acc[i][0]);
      _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
    }
  }
};

constexpr int NR = Avx2Panel::kNR;

// -- int8 / int4 --------------------------------------------------------------------------------

// In-place 16 x 16 byte transpose (v[j] byte i <- v[i] byte j): four rounds of the perfect shuffle,
// each a rotation of the 8-bit (vector, byte) index by one bit.
inline void transpose16x16_epi8(__m128i* v) {
  for (int round = 0; round < 4; ++round) {
    __m128i t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm_unpacklo_epi8(v[i], v[i + 8]);
      t[2 * i + 1] = _mm_unpackhi_epi8(v[i], v[i + 8]);
    }
    for (int i = 0; i < 16; ++i) v[i] = t[i];
  }
}

// 16 bytes at p, of which only the first `avail` (may be < 16 at the end of a row) are read.
inline __m128i load16_partial(const uint8_t* p, int64_t avail) {
  if (avail >= 16) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint8_t t[16] = {};
  for (int64_t i = 0; i < avail; ++i) t[i] = p[i];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
}

// base[j * stride] for the strip's rows j < nr (0 beyond), as two ymm (rows 0-7, 8-15).
inline void load_col16(const float* base, int64_t stride, int nr, __m256* lo, __m256* hi) {
  alignas(32) float t[16];
  for (int j = 0; j < 16; ++j) t[j] = j < nr ? base[j * stride] : 0.f;
  *lo = _mm256_load_ps(t), *hi = _mm256_load_ps(t + 8);
}

inline __m128i load_zero16(const uint8_t* zero, int64_t stride, int nr) {
  if (!zero) return _mm_set1_epi8(8);
  alignas(16) uint8_t t[16] = {};
  for (int j = 0; j < nr; ++j) t[j] = zero[j * stride];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
}

// 16 int8 lanes (one k line of the strip) -> two ymm of fp32 codes.
inline void widen16(__m128i c, __m256* lo, __m256* hi) {
  *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
  *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c, c)));
}

void decode_int8_panel(const QuantView& q, int64_t n0, int nr, int64_t k0, int kb, float* wp) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + n0 * q.kp;
  const float* scale = q.scale + n0 * q.n_groups;
  int64_t g = k0 / q.group, gnext = (g + 1) * q.group;
  __m256 s_lo, s_hi;
  load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
  for (int kk = 0; kk < kb; kk += 16) {
    const int64_t k = k0 + kk;
    __m128i v[16];
    for (int j = 0; j < 16; ++j)
      v[j] = j < nr ? load16_partial(reinterpret_cast<const uint8_t*>(codes + j * q.kp + k), q.kp - k)
                    : _mm_setzero_si128();
    if (kk % 64 == 0 && k + Avx2Panel::kKC < q.kp)  // the strip's next K block: a cache line per row
      for (int j = 0; j < nr; ++j) _mm_prefetch(reinterpret_cast<const char*>(codes + j * q.kp + k + Avx2Panel::kKC), _MM_HINT_T1);
    transpose16x16_epi8(v);
    const int cnt = kb - kk < 16 ? kb - kk : 16;
    for (int t = 0; t < cnt; ++t) {
      if (k + t == gnext) {  // a group boundary inside the block (any group length)
        ++g, gnext += q.group;
        load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
      }
      __m256 lo, hi;
      widen16(v[t], &lo, &hi);
      _mm256_store_ps(wp + (kk + t) * NR, _mm256_mul_ps(lo, s_lo));
      _mm256_store_ps(wp + (kk + t) * NR + 8, _mm256_mul_ps(hi, s_hi));
    }
  }
}

// 16 rows x 16 bytes (32 codes) transposed as bytes: each byte column holds k (low nibbles) and
// k + 1 (high nibbles) of the 16 rows; the zero point is subtracted in int8 (exact, -15..15).
// k0 is a multiple of kKC, so every 32-code step starts on a byte.
void decode_int4_panel(const QuantView& q, int64_t n0, int nr, int64_t k0, int kb, float* wp) {
  const int64_t row_bytes = q.kp / 2;
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n0 * row_bytes;
  const float* scale = q.scale + n0 * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + n0 * q.n_groups : nullptr;
  int64_t g = k0 / q.group, gnext = (g + 1) * q.group;
  __m256 s_lo, s_hi;
  load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
  __m128i z = load_zero16(zero ? zero + g : nullptr, q.n_groups, nr);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int kk = 0; kk < kb; kk += 32) {
    const int64_t byte0 = (k0 + kk) / 2;
    __m128i v[16];
    for (int j = 0; j < 16; ++j)
      v[j] = j < nr ? load16_partial(bytes + j * row_bytes + byte0, row_bytes - byte0) : _mm_setzero_si128();
    if (kk % 128 == 0 && byte0 + Avx2Panel::kKC / 2 < row_bytes)  // the strip's next K block: a cache line per row
      for (int j = 0; j < nr; ++j) _mm_prefetch(reinterpret_cast<const char*>(bytes + j * row_bytes + byte0 + Avx2Panel::kKC / 2), _MM_HINT_T1);
    transpose16x16_epi8(v);
    const int cnt = kb - kk < 32 ? kb - kk : 32;
    for (int t = 0; t < cnt; ++t) {
      if (k0 + kk + t == gnext) {
        ++g, gnext += q.group;
        load_col16(scale + g, q.n_groups, nr, &s_lo, &s_hi);
        z = load_zero16(zero ? zero + g : nullptr, q.n_groups, nr);
      }
      const __m128i b = v[t >> 1];
      __m256 lo, hi;
      widen16(_mm_sub_epi8(_mm_and_si128((t & 1) ? _mm_srli_epi16(b, 4) : b, mask), z), &lo, &hi);
      _mm256_store_ps(wp + (kk + t) * NR, _mm256_mul_ps(lo, s_lo));
      _mm256_store_ps(wp + (kk + t) * NR + 8, _mm256_mul_ps(hi, s_hi));
    }
  }
}

template <bool Int4>
Status quant_panel_gemm(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (panel::check_quant(w.q, a.K, Int4) != Status::ok) return Status::invalid_argument;
  const QuantView& q = w.q;
  return panel::gemm<Avx2Panel>(a, n_begin, n_end, [&q](int64_t n, int nr, int64_t k0, int kb, float* wp) {
    if constexpr (Int4) decode_int4_panel(q, n, nr, k0, kb, wp);
    else decode_int8_panel(q, n, nr, k0, kb, wp);
    return true;
  });
}

// -- N:M (float values) -------------------------------------------------------------------------

// Scratch for one row's kept values of a block: fp32 values and their columns.
struct NMRowScratch {
  float* vals;
  int32_t* cols;
};

// Row j of the strip (weight row n): add every kept value whose column falls in [lo, hi) (inside the
// block [k0, k0 + kb)) at panel[(column - k0) * NR + j], through the bit reader. Groups that can
// reach [lo, hi): an index is a `bits`-wide field, so group g reaches g*m .. g*m + 2^bits - 1.
void add_nm_columns(const WeightView& w, int64_t n, int j, int64_t k0, int64_t lo, int64_t hi, float* wp,
                    NMRowScratch s) {
  const NMView& nm = w.nm;
  const int64_t reach = (int64_t(1) << (nm.bits < 31 ? nm.bits : 31)) - 1;
  const int64_t g0 = lo > reach ? (lo - reach) / nm.m : 0;
  const int64_t j0 = g0 * nm.n, j1 = (hi + nm.m - 1) / nm.m * nm.n < nm.kc ? (hi + nm.m - 1) / nm.m * nm.n : nm.kc;
  if (j0 >= j1) return;
  sp::nm_values(w, n, j0, j1, s.vals);
  const int64_t cnt = sp::nm_decode_generic(nm, nm.meta + n * nm.meta_stride, w.K, j0, j1, s.cols, s.vals);
  for (int64_t i = 0; i < cnt; ++i)
    if (s.cols[i] >= lo && s.cols[i] < hi) wp[(s.cols[i] - k0) * NR + j] += s.vals[i];
}

// 2:4: a meta byte holds the indices of 2 groups (8 columns, 4 kept values). With the 4 values in
// both 128-bit lanes of a register, ctrl[byte] is the vpshufb control that puts each value at its
// column (lane 0: columns 0-3, lane 1: 4-7) and zeroes the rest (0x80). Any index order works;
// `dup` marks bytes where a group names one column twice (the values would be summed: generic path).
struct Shuffle24 {
  alignas(32) uint8_t ctrl[256][32];
  bool dup[256];
  constexpr Shuffle24() : ctrl(), dup() {
    for (int b = 0; b < 256; ++b) {
      const int idx[4] = {b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6};
      dup[b] = idx[0] == idx[1] || idx[2] == idx[3];
      for (int c = 0; c < 8; ++c) {
        const int g = c / 4, p = c % 4;
        const int l = idx[2 * g] == p ? 2 * g : idx[2 * g + 1] == p ? 2 * g + 1 : -1;
        for (int e = 0; e < 4; ++e) ctrl[b][c * 4 + e] = uint8_t(l < 0 ? 0x80 : l * 4 + e);
      }
    }
  }
};
constexpr Shuffle24 kShuffle24;

// Kept values j .. j + 3 of a float value row as fp32 (exact widening).
template <ValueKind V>
inline __m128 load4(const void* row, int64_t j) {
  if constexpr (V == ValueKind::f32) return _mm_loadu_ps(static_cast<const float*>(row) + j);
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + j));
  if constexpr (V == ValueKind::bf16) return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  return _mm_cvtph_ps(h);
}

// r[i] lane t -> r[t] lane i (8 x 8 floats).
inline void transpose8x8(__m256* r) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

// Panel lines [0, cols) of a 2:4 strip (cols % 8 == 0, columns k0 .. k0 + cols - 1 all < K), every
// lane written: per 8 rows x 8 columns, one vpshufb per row and an 8 x 8 transpose. False when a
// meta byte names a column twice (the caller takes the generic path for the strip).
template <ValueKind V>
bool decode_nm24_lines(const WeightView& w, int64_t n0, int nr, int64_t k0, int cols, float* wp) {
  const NMView& nm = w.nm;
  const size_t vsize = V == ValueKind::f32 ? 4 : 2;
  for (int h = 0; h < 2; ++h) {
    const int rh = nr - 8 * h < 8 ? nr - 8 * h : 8;
    const uint8_t* meta[8];
    const char* vals[8];
    for (int i = 0; i < 8; ++i) {
      const int64_t n = n0 + 8 * h + (i < rh ? i : 0);
      meta[i] = nm.meta + n * nm.meta_stride + k0 / 8;
      vals[i] = static_cast<const char*>(nm.fvalues) + size_t(n * nm.kc + k0 / 2) * vsize;
    }
    for (int c = 0; c < cols; c += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        if (i >= rh) { r[i] = _mm256_setzero_ps(); continue; }
        const uint8_t b = meta[i][c / 8];
        if (kShuffle24.dup[b]) return false;
        const __m128 v = load4<V>(vals[i], c / 2);
        const __m256i ctrl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kShuffle24.ctrl[b]));
        r[i] = _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_castps_si256(_mm256_set_m128(v, v)), ctrl));
      }
      transpose8x8(r);
      for (int t = 0; t < 8; ++t) _mm256_store_ps(wp + (c + t) * NR + 8 * h, r[t]);
    }
  }
  return true;
}

// One strip: 2:4 whole 8-column steps below K on the shuffle path, everything else (other N:M
// patterns, the K tail, repeated indices) zeroed and added through the bit reader.
template <ValueKind V>
void decode_nm_panel(const WeightView& w, int64_t n0, int nr, int64_t k0, int kb, float* wp, NMRowScratch s) {
  const NMView& nm = w.nm;
  int fast = 0;
  if (nm.n == 2 && nm.m == 4 && nm.bits == 2) {
    fast = int((k0 + kb < w.K ? kb : w.K - k0) / 8 * 8);
    if (!decode_nm24_lines<V>(w, n0, nr, k0, fast, wp)) fast = 0;
  }
  if (fast == kb) return;
  const __m256 zero = _mm256_setzero_ps();
  for (int kk = fast; kk < kb; ++kk) _mm256_store_ps(wp + kk * NR, zero), _mm256_store_ps(wp + kk * NR + 8, zero);
  for (int j = 0; j < nr; ++j) add_nm_columns(w, n0 + j, j, k0, k0 + fast, k0 + kb, wp, s);
}

template <ValueKind V>
Status nm_panel_gemm(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  // a row's kept values of one block: at most the whole row (indices as wide as 32 bits reach anywhere)
  const NMRowScratch s{scratch<float, 2>(size_t(w.nm.kc)), scratch<int32_t, 3>(size_t(w.nm.kc))};
  if (!s.vals || !s.cols) return Status::out_of_memory;
  return panel::gemm<Avx2Panel>(a, n_begin, n_end, [&w, s](int64_t n, int nr, int64_t k0, int kb, float* wp) {
    decode_nm_panel<V>(w, n, nr, k0, kb, wp, s);
    return true;
  });
}

}  // namespace

Status int8_panel_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<false>(a, w, n_begin, n_end);
}

Status int4_panel_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<true>(a, w, n_begin, n_end);
}

// Float N:M values only (nm_int8 / nm_int4 keep their sparse-aware rows).
Status nm_panel_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const NMView& nm = w.nm;
  if (nm.n < 1 || nm.m <= nm.n || nm.bits < 1 || nm.bits > 32 || nm.kc < 1 || !nm.meta || !nm.fvalues)
    return Status::invalid_argument;
  switch (nm.values) {
    case ValueKind::f32: return nm_panel_gemm<ValueKind::f32>(a, w, n_begin, n_end);
    case ValueKind::bf16: return nm_panel_gemm<ValueKind::bf16>(a, w, n_begin, n_end);
    case ValueKind::f16: return nm_panel_gemm<ValueKind::f16>(a, w, n_begin, n_end);
    default: return Status::invalid_argument;
  }
}

}  // namespace sparseinfer
