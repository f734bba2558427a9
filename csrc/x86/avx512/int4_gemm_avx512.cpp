// int4 x fp32 activations (ActMode::fp32, the exact mode), AVX-512, every batch size, on the
// canonical layout: W[n, k] = (code - zero) * scale per group, low nibble = even k.
//
// Batch rows go in chunks of 4, each chunk over every weight row. Whole 32-code blocks (16 bytes)
// are widened once and split into their even / odd codes, which meet the activations split the same
// way (once per call); each code becomes its weight through the group's 16-entry table of
// (code - zero) * scale (vpermps), so four accumulators per batch row run across every group. Group
// and K tails take 16 codes in element order with masked loads, so nothing past K (in x) or past the
// group's bytes (in the codes) is read. At batch 1 on whole 128-code steps, two weight rows share a
// pass (rows_b1). The exact mode, not the fast one: see int4_q8_gemm_vnni_avx512 for the roofline path.
#include "avx512_common.h"

// GCC 12 warns that _mm512_reduce_add_ps, inlined into row_pass, reads an uninitialized __m256d
// inside its own header (a false positive of the header's _mm256_undefined_pd).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace sparseinfer {

namespace {

constexpr int kRows = 4;  // batch rows per pass over a weight row
constexpr int kPrefetchBytes = 1024;  // codes fetched ahead of the row being read

// 16 consecutive codes from `bytes` (element 2j = low nibble of byte j), the bytes beyond
// ceil(count / 2) not read.
inline __m512i load_u4x16(const uint8_t* bytes, int64_t count) {
  const int64_t nb = count >= 16 ? 8 : (count + 1) / 2;
  const __m128i b = _mm_maskz_loadu_epi8(__mmask16((1u << nb) - 1), bytes);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  // b0 b0 b1 b1 ...
  const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  return _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32(0xF));
}

// Codes k..k+31 (16 bytes at `bytes`, all read) dequantized through the group's table (w = table[code]),
// split by parity: even = codes k, k+2, ..., k+30 (the low nibbles), odd = k+1, ..., k+31. One
// byte-widening shuffle per 32 codes; vpermps reads only the low 4 bits of each index, so the low
// nibbles need no mask. The activations are split by parity to match (ParityX).
inline void load_u4x32(const uint8_t* bytes, __m512 table, __m512& even, __m512& odd) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  even = _mm512_permutexvar_ps(v, table);
  odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

// Batch rows m0 .. m0 + MR of x split by parity, once per call: row i's even elements x[0], x[2], ...
// at even(i), its odd ones at odd(i), in the calling thread's scratch (kernel_utils.h; no std::
// containers in ISA-flagged files). `base` is null when that memory is not there.
template <int MR>
struct ParityX {
  float* base;
  int64_t half;
  ParityX(const GemmArgs& a, int64_t m0) : half((a.K + 1) / 2) {
    base = scratch<float, 0>(size_t(MR * 2 * half));
    if (!base) return;
    for (int i = 0; i < MR; ++i) {
      const float* x = a.x + (m0 + i) * a.stride_xm;
      float* e = base + i * 2 * half;
      for (int64_t k = 0; k < a.K; ++k) e[(k & 1) * half + (k >> 1)] = x[k];
    }
  }
  const float* even(int i) const { return base + i * 2 * half; }
  const float* odd(int i) const { return base + i * 2 * half + half; }
};

template <int MR>
void row_pass(const GemmArgs& a, const QuantView& q, const ParityX<MR>& px, int64_t n, int64_t m0) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * (q.kp / 2);
  const float* scale = q.scale + n * q.n_groups;
  const uint8_t* zero = q.zero ? q.zero + n * q.n_groups : nullptr;
  const float* x[MR];
  for (int i = 0; i < MR; ++i) x[i] = a.x + (m0 + i) * a.stride_xm;
  // Four accumulators per batch row across every group: one FMA chain, codes interleaved back into
  // element order per 16, and no prefetch held this kernel to 0.15 of the bandwidth roofline at
  // batch 1 (4096x4096, 2 threads); a sum per group scaled at its end took another quarter.
  __m512 part[MR][4];
  float tail[MR];
  for (int i = 0; i < MR; ++i) {
    tail[i] = 0.f;
    for (int j = 0; j < 4; ++j) part[i][j] = _mm512_setzero_ps();
  }
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t g = 0, k0 = 0; k0 < a.K; ++g, k0 += q.group) {
    const int64_t k1 = k0 + q.group < a.K ? k0 + q.group : a.K;
    const int z = zero ? zero[g] : 8;
    // the group's 16 weight values (code - zero) * scale: to_dense()'s, one fp32 multiply each
    const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(float(z))), _mm512_set1_ps(scale[g]));
    int64_t k = k0;
    if ((k & 1) && k < k1) {  // an odd group length leaves a group starting mid-byte
      const float wv = float(((bytes[k >> 1] >> 4) & 0xF) - z) * scale[g];
      for (int i = 0; i < MR; ++i) tail[i] += x[i][k] * wv;
      ++k;
    }
    if (k + 128 == k1) {  // a whole group of 128 (the usual one): four blocks, no loop (~8 % faster)
      __builtin_prefetch(bytes + (k >> 1) + kPrefetchBytes, 0, 3);
      const int64_t h = k >> 1;
      __m512 wv[8];
      load_u4x32(bytes + h, table, wv[0], wv[1]);
      load_u4x32(bytes + h + 16, table, wv[2], wv[3]);
      load_u4x32(bytes + h + 32, table, wv[4], wv[5]);
      load_u4x32(bytes + h + 48, table, wv[6], wv[7]);
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 8; ++j)
          part[i][j & 3] = _mm512_fmadd_ps(_mm512_loadu_ps((j & 1 ? px.odd(i) : px.even(i)) + h + 16 * (j >> 1)), wv[j],
                                           part[i][j & 3]);
      continue;
    }
    for (; k + 64 <= k1; k += 64) {  // whole 32-code blocks (k even here)
      __builtin_prefetch(bytes + (k >> 1) + kPrefetchBytes, 0, 3);
      __m512 wv[4];
      load_u4x32(bytes + (k >> 1), table, wv[0], wv[1]);
      load_u4x32(bytes + (k >> 1) + 16, table, wv[2], wv[3]);
      const int64_t h = k >> 1;
      for (int i = 0; i < MR; ++i) {
        part[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(px.even(i) + h), wv[0], part[i][0]);
        part[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(px.odd(i) + h), wv[1], part[i][1]);
        part[i][2] = _mm512_fmadd_ps(_mm512_loadu_ps(px.even(i) + h + 16), wv[2], part[i][2]);
        part[i][3] = _mm512_fmadd_ps(_mm512_loadu_ps(px.odd(i) + h + 16), wv[3], part[i][3]);
      }
    }
    if (k + 32 <= k1) {
      __m512 we, wo;
      load_u4x32(bytes + (k >> 1), table, we, wo);
      for (int i = 0; i < MR; ++i) {
        part[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(px.even(i) + (k >> 1)), we, part[i][0]);
        part[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(px.odd(i) + (k >> 1)), wo, part[i][1]);
      }
      k += 32;
    }
    for (; k < k1; k += 16) {  // group and K tails, in element order
      const int64_t left = k1 - k;
      const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 w = _mm512_permutexvar_ps(load_u4x16(bytes + (k >> 1), left), table);
      for (int i = 0; i < MR; ++i) part[i][2] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x[i] + k), w, part[i][2]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[i][0], part[i][1]), _mm512_add_ps(part[i][2], part[i][3]));
    store_output(a, m0 + i, n, _mm512_reduce_add_ps(sum) + tail[i]);
  }
}

// Batch 1, kRowsB1 weight rows at once, in steps of 128 codes, when every group is whole steps and
// K is no shorter than the codes (groups of 128, 256, ..., or one group per row of a multiple of
// 128). The activations of a step are loaded once for the rows, and the rows share the loop: 1.35x
// the one-row loop's codes per second (hot, 1 thread, 1024^2, g128, Xeon with AVX-512). The rows'
// codes are one contiguous stream, prefetched 2 x kRowsB1 rows ahead: 1.2-1.3x from memory.
constexpr int kRowsB1 = 2;

inline bool rows_b1_layout(const GemmArgs& a, const QuantView& q) {
  return a.M == 1 && q.group % 128 == 0 && q.kp == a.K;
}

void rows_b1(const GemmArgs& a, const QuantView& q, const ParityX<1>& px, int64_t n) {
  constexpr int R = kRowsB1;
  const int64_t row_bytes = q.kp / 2, steps_per_group = q.group / 128;
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + n * row_bytes;
  __m512 part[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) part[r][j] = _mm512_setzero_ps();
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t h = 0, step = 0; h < row_bytes; h += 64, ++step) {  // 128 codes: 64 bytes a row
    const int64_t g = step / steps_per_group;
    __m512 xv[8];  // even, odd, even, odd, ...: 16 codes each
    for (int j = 0; j < 8; ++j) xv[j] = _mm512_loadu_ps((j & 1 ? px.odd(0) : px.even(0)) + h + 16 * (j >> 1));
    for (int r = 0; r < R; ++r) {
      const uint8_t* b = bytes + r * row_bytes + h;
      __builtin_prefetch(b + 2 * R * row_bytes, 0, 3);
      const int64_t rg = (n + r) * q.n_groups + g;  // the group's table, as in row_pass
      const float z = float(q.zero ? q.zero[rg] : 8);
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(q.scale[rg]));
      for (int i = 0; i < 4; ++i) {
        __m512 we, wo;
        load_u4x32(b + 16 * i, table, we, wo);
        part[r][(2 * i) & 3] = _mm512_fmadd_ps(xv[2 * i], we, part[r][(2 * i) & 3]);
        part[r][(2 * i + 1) & 3] = _mm512_fmadd_ps(xv[2 * i + 1], wo, part[r][(2 * i + 1) & 3]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[r][0], part[r][1]), _mm512_add_ps(part[r][2], part[r][3]));
    store_output(a, 0, n + r, _mm512_reduce_add_ps(sum));
  }
}

// Weight rows [n_begin, n_end) for batch rows m0 .. m0 + MR (the kernel serves batches of 1-3: one pass).
template <int MR>
Status rows_pass(const GemmArgs& a, const QuantView& q, int64_t n_begin, int64_t n_end, int64_t m0) {
  const ParityX<MR> px(a, m0);
  if (!px.base) return Status::out_of_memory;
  int64_t n = n_begin;
  if constexpr (MR == 1)
    if (rows_b1_layout(a, q))
      for (; n + kRowsB1 <= n_end; n += kRowsB1) rows_b1(a, q, px, n);
  for (; n < n_end; ++n) row_pass<MR>(a, q, px, n, m0);
  return Status::ok;
}

}  // namespace

Status int4_gemm_avx512(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || (q.kp & 1) || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  int64_t m0 = 0;
  for (; m0 + kRows <= a.M; m0 += kRows) {
    const Status s = rows_pass<kRows>(a, q, n_begin, n_end, m0);
    if (s != Status::ok) return s;
  }
  switch (a.M - m0) {
    case 3: return rows_pass<3>(a, q, n_begin, n_end, m0);
    case 2: return rows_pass<2>(a, q, n_begin, n_end, m0);
    case 1: return rows_pass<1>(a, q, n_begin, n_end, m0);
    default: return Status::ok;
  }
}

}  // namespace sparseinfer
