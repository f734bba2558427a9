// Exact-mode (fp32 x) GEMM for batches past the GEMV rows, AVX2 + FMA: int8, int4 and N:M weights
// decoded into fp32 panels once per call and multiplied by a 6 x 16 register-blocked FMA tile (the
// BLIS Haswell shape). Loop nest: sparseinfer/panel_gemm.h.
//
// Decoders give exactly to_dense()'s values in [k][16] panels:
//   int8 / int4  16 rows x 16 bytes are loaded row-wise and transposed as bytes, so each k line is
//                one register of 16 codes: widened, converted, times the rows' group scales (one
//                fp32 multiply, as to_dense()). Any group length (a boundary is checked per k).
//   N:M          the panel is zeroed and every kept value is added at (column, row): 2:4 columns 16
//                at a time from a 32-bit meta word (sp::nm24_cols), other patterns and block tails
//                through the bit reader (sp::nm_decode_generic). Added, not stored, like the scalar
//                kernel sums duplicate columns; indices are not trusted (columns outside the block
//                are skipped). The panel holds the zeros too: twice the FMAs of the sparse-aware
//                nm_gemm_avx2 for 2:4, so it is listed only where it measured faster (dispatch.cpp).
#include "sparse_avx2.h"
#include "sparseinfer/panel_gemm.h"

namespace sparseinfer {

namespace {

struct Avx2Panel {
  static constexpr int kNR = 16;   // two ymm of output columns per tile
  static constexpr int kMR = 6;    // batch rows per tile: 12 accumulators + 2 panel loads + 1 broadcast = 15 ymm
  static constexpr int kKC = 256;  // a [256][16] panel is 16 KB: streamed from L2 past an L1-resident 6 x 256 x tile
  static constexpr int kNC = 256;  // a block's panels: 256 KB, half of a Zen 1 / Zen 2 L2 (512 KB)

  // A partial strip (nr < 16, the last one of a column range) goes through a full-width copy, so
  // the accumulators see one plain load / store path. The unroll pragmas are load-bearing: without
  // them GCC 12 -O3 (loop peeling) left the 12 accumulators in memory, a store per FMA, half speed.
  template <int MR>
  static void tile(const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, int nr, bool first,
                   const float* bias) {
    if (nr < kNR) {
      alignas(32) float ct[MR * kNR], bt[kNR] = {};
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < kNR; ++j) ct[i * kNR + j] = !first && j < nr ? c[i * ldc + j] : 0.f;
      if (bias)
        for (int j = 0; j < nr; ++j) bt[j] = bias[j];
      full_tile<MR>(x, sx, wp, kb, ct, kNR, first, bias ? bt : nullptr);
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < nr; ++j) c[i * ldc + j] = ct[i * kNR + j];
      return;
    }
    full_tile<MR>(x, sx, wp, kb, c, ldc, first, bias);
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

Status check_quant(const QuantView& q, int64_t K, bool int4) {
  if (q.group <= 0 || q.kp < K || q.n_groups * q.group != q.kp || (int4 && (q.kp & 1))) return Status::invalid_argument;
  return Status::ok;
}

template <bool Int4>
Status quant_panel_gemm(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (check_quant(w.q, a.K, Int4) != Status::ok) return Status::invalid_argument;
  const QuantView& q = w.q;
  return panel::gemm<Avx2Panel>(a, n_begin, n_end, [&q](int64_t n, int nr, int64_t k0, int kb, float* wp) {
    if constexpr (Int4) decode_int4_panel(q, n, nr, k0, kb, wp);
    else decode_int8_panel(q, n, nr, k0, kb, wp);
    return true;
  });
}

// -- N:M ----------------------------------------------------------------------------------------

// Scratch for one row's kept values of a block: fp32 values and their columns.
struct NMRowScratch {
  float* vals;
  int32_t* cols;
};

// Row j of the strip (weight row n): add every kept value whose column falls in [k0, k0 + kb) at
// panel[(column - k0) * NR + j]. Groups that can reach the block: an index is a `bits`-wide field,
// so group g reaches g*m .. g*m + 2^bits - 1.
void add_nm_row(const WeightView& w, int64_t n, int j, int64_t k0, int kb, float* wp, NMRowScratch s) {
  const NMView& nm = w.nm;
  const uint8_t* meta = nm.meta + n * nm.meta_stride;
  const int64_t end = k0 + kb;
  int64_t lo = k0, hi = end;  // 2:4 columns [lo, hi) on the fast path: whole 32-column steps below K
  if (nm.n == 2 && nm.m == 4 && nm.bits == 2) {
    hi = k0 + (end < w.K ? kb : w.K - k0) / 32 * 32;
    const int64_t j0 = lo / 2, j1 = hi / 2;
    if (j1 > j0) {
      sp::nm_values(w, n, j0, j1, s.vals);
      sp::nm24_cols(meta, j0, j1, NR, s.cols);  // column * NR
      float* p = wp + j - k0 * NR;
      for (int64_t i = 0; i < j1 - j0; ++i) p[s.cols[i]] += s.vals[i];
    }
    lo = hi, hi = end;
  }
  if (lo >= hi) return;
  const int64_t reach = (int64_t(1) << (nm.bits < 31 ? nm.bits : 31)) - 1;
  const int64_t g0 = lo > reach ? (lo - reach) / nm.m : 0;
  int64_t j0 = g0 * nm.n, j1 = (hi + nm.m - 1) / nm.m * nm.n;
  if (j1 > nm.kc) j1 = nm.kc;
  if (j0 >= j1) return;
  sp::nm_values(w, n, j0, j1, s.vals);
  const int64_t cnt = sp::nm_decode_generic(nm, meta, w.K, j0, j1, s.cols, s.vals);
  for (int64_t i = 0; i < cnt; ++i)
    if (s.cols[i] >= lo && s.cols[i] < hi) wp[(s.cols[i] - k0) * NR + j] += s.vals[i];
}

Status check_nm(const WeightView& w) {
  const NMView& nm = w.nm;
  if (nm.n < 1 || nm.m <= nm.n || nm.bits < 1 || nm.bits > 32 || nm.kc < 1 || !nm.meta) return Status::invalid_argument;
  const bool quantized = nm.values == ValueKind::i8 || nm.values == ValueKind::i4;
  if (quantized ? w.q.group <= 0 || w.q.kp < nm.kc || !w.q.codes || !w.q.scale : !nm.fvalues)
    return Status::invalid_argument;
  return Status::ok;
}

}  // namespace

Status int8_panel_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<false>(a, w, n_begin, n_end);
}

Status int4_panel_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return quant_panel_gemm<true>(a, w, n_begin, n_end);
}

Status nm_panel_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  if (check_nm(w) != Status::ok) return Status::invalid_argument;
  // a row's kept values of one block: at most the whole row (indices as wide as 32 bits reach anywhere)
  NMRowScratch s{scratch<float, 2>(size_t(w.nm.kc)), scratch<int32_t, 3>(size_t(w.nm.kc))};
  if (!s.vals || !s.cols) return Status::out_of_memory;
  return panel::gemm<Avx2Panel>(a, n_begin, n_end, [&w, s](int64_t n, int nr, int64_t k0, int kb, float* wp) {
    const __m256 zero = _mm256_setzero_ps();
    for (int kk = 0; kk < kb; ++kk) _mm256_store_ps(wp + kk * NR, zero), _mm256_store_ps(wp + kk * NR + 8, zero);
    for (int j = 0; j < nr; ++j) add_nm_row(w, n + j, j, k0, kb, wp, s);
    return true;
  });
}

}  // namespace sparseinfer
