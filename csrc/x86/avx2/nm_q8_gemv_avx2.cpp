// 2:4 structured sparsity with int8 / int4 kept values x int8-quantized activations (ActMode::int8),
// AVX2, decode-sized batches. The fast mode of 2:4+int8 / 2:4+int4 (csrc/README.md, "Activation
// modes"): x is quantized per row and segment by the shared quantizer (quantize_act_avx2: q = rne(x
// 127 / max|x_seg|), the bits of the dense int8 kernels' activations), the kept x bytes are gathered
// in registers and meet the weight codes in pmaddubsw / pmaddwd; per segment one fp32 FMA applies
// weight scale x activation scale. Everything between is exact integer arithmetic, so the error is
// the activation rounding alone, as for the dense int8 / int4 fast kernels.
//
// The codes come from the weight's prepacked copy (NMView::Q8, ref/nm_q8_prepack_ref.cpp): per
// 64-column block (32 kept values, 8 meta bytes), lane 0 holds the even 2:4 groups and lane 1 the
// odd ones, each byte p at field 2L + p / 8 of meta byte p % 8. Per block:
//   control  one vpsrlvq of the broadcast meta word by (0, 2, 4, 6) puts every kept value's 2-bit
//            index in bits 0-1 of its byte; AND 3, OR the byte offset of its group: 3 ops.
//   gather   x rows are stored per block as two 32-byte halves, each with its 4-byte column groups
//            in the order (0 2 4 6 | 1 3 5 7): lane 0 of a half holds even groups, lane 1 odd ones.
//            Two vpshufb + one vpblendd give the 32 kept x bytes in the codes' order.
//   dot      int8: |w| (u8, <= 128) x sign(x, w) (s8) -- no pmaddubsw pair sum can saturate
//            (2 * 128 * 127 < 32767) -- then pmaddwd into int32 per block.
//            int4: (x + 128) (u8) x (code - zero) (s8, -15..15): pair sums <= 2 * 255 * 15, so they
//            add up in int16 over a whole segment (<= 4 blocks); per segment one pmaddwd, and
//            128 * sum(code - zero) (prepacked) comes off exactly in integers.
// Measured here (Zen-class, 256-bit ops split in two): 3.5 ns per int8 block against 4.6 with the
// canonical layout (a byte transpose and a 6-op control per block); the cheap ops on this core are
// vpsrlv*, vpand / vpor and vpblendd, while vpmullw and the immediate-count 16-bit shifts are not.
//
// Kept values past the last whole 64-column block (K % 64 columns) run in exact fp32 through the
// checked decoder (kept values whose column is >= K are skipped). Weights without a prepacked copy
// (other patterns, groups of fewer than 32 kept values) run the exact kernels instead.
#include "sparse_avx2.h"

namespace sparseinfer {
namespace {

constexpr int64_t kBlock = 64;  // columns per gather block (32 kept values)
// Software prefetch distance on the code stream (the meta stream at a quarter of it): 2:4+int8 from
// memory ran 18% faster with it (1024 - 4096 alike), 2:4+int4 the same either way.
constexpr int64_t kPrefetchBytes = 2048;

struct QuantX {
  const uint8_t* q;    // [M][nseg * seg] quantized rows in the gather layout (int4: + 128)
  const float* scale;  // [M][nseg]
  int64_t stride;      // bytes between rows of q
};

// 32 gather controls of one block from its 8 meta bytes.
inline __m256i block_control(const uint8_t* meta8) {
  int64_t m8;
  std::memcpy(&m8, meta8, 8);
  const __m256i shift = _mm256_setr_epi64x(0, 2, 4, 6);
  // byte p of either lane: group 2 (p % 8) + L sits at 4 ((p % 8) % 4) in its 16-byte source lane
  const __m256i base = _mm256_setr_epi8(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12,  //
                                        0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
  const __m256i f = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(m8), shift), _mm256_set1_epi8(3));
  return _mm256_or_si256(f, base);
}

// The 32 kept activation bytes of one block (meta bytes 0-3 index the first half, 4-7 the second).
inline __m256i gather_block(const uint8_t* xq, __m256i ctrl) {
  const __m256i a = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)), ctrl);
  const __m256i b = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)), ctrl);
  return _mm256_blend_epi32(a, b, 0xAA);
}

// 32 prepacked int4 codes (16 bytes: lane 0 in the low nibbles, lane 1 in the high) minus the zero.
// (128-bit ops: on this core a 256-bit op costs two 128-bit ones, and the halves differ anyway)
inline __m256i int4_block(const uint8_t* p, __m256i zero) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low4 = _mm_set1_epi8(0x0F);
  const __m256i codes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(bytes, low4)),
                                                _mm_and_si128(_mm_srli_epi16(bytes, 4), low4), 1);
  return _mm256_sub_epi8(codes, zero);
}

template <bool int4, int MT>
inline void dot_block(const QuantX& qx, int64_t m0, int64_t b, __m256i ctrl, const uint8_t* codes, __m256i zero,
                      __m256i* acc) {
  if (int4) {
    const __m256i w = int4_block(codes + 16 * b, zero);
    for (int t = 0; t < MT; ++t)
      acc[t] = _mm256_add_epi16(acc[t], _mm256_maddubs_epi16(gather_block(qx.q + (m0 + t) * qx.stride + kBlock * b, ctrl), w));
  } else {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * b));
    const __m256i wabs = _mm256_abs_epi8(w);
    for (int t = 0; t < MT; ++t) {
      const __m256i xs = _mm256_sign_epi8(gather_block(qx.q + (m0 + t) * qx.stride + kBlock * b, ctrl), w);
      acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), _mm256_set1_epi16(1)));
    }
  }
}

template <bool int4, int MT>
void q8_tile(const GemmArgs& a, const WeightView& w, const QuantX& qx, int64_t n, int64_t m0, float* out) {
  const NMView& nm = w.nm;
  const QuantView& q = w.q;
  const int64_t nblk = a.K / kBlock, per_seg = nm.q8.seg / kBlock;
  const uint8_t* codes = nm.q8.codes + n * nblk * (int4 ? 16 : 32);
  const float* wscale = q.scale + n * q.n_groups;
  const uint8_t* wzero = q.zero ? q.zero + n * q.n_groups : nullptr;
  const uint8_t* meta = nm.meta + n * nm.meta_stride;
  __m256 facc[MT];
  for (int t = 0; t < MT; ++t) facc[t] = _mm256_setzero_ps();
  for (int64_t s = 0, b = 0; b < nblk; ++s) {
    const int64_t b_end = b + per_seg < nblk ? b + per_seg : nblk;
    const int64_t g = b * 32 / q.group;  // a segment lies inside one weight group
    const __m256i zero = _mm256_set1_epi8(int8_t(wzero ? wzero[g] : 8));
    __m256i acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_si256();
    // two blocks per step: their chains interleave (the FP scheduler of this core holds about one
    // block's worth of 256-bit ops, so independent neighbours in program order matter)
    for (; b + 2 <= b_end; b += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(codes) + (int4 ? 16 : 32) * b + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(meta) + 8 * b + kPrefetchBytes / 4, _MM_HINT_T0);
      const __m256i c0 = block_control(meta + 8 * b), c1 = block_control(meta + 8 * b + 8);
      dot_block<int4, MT>(qx, m0, b, c0, codes, zero, acc);
      dot_block<int4, MT>(qx, m0, b + 1, c1, codes, zero, acc);
    }
    if (b < b_end) {
      dot_block<int4, MT>(qx, m0, b, block_control(meta + 8 * b), codes, zero, acc);
      ++b;
    }
    for (int t = 0; t < MT; ++t) {
      __m256i i32 = acc[t];
      if (int4)  // int16 pair sums -> int32, and the +128 of x undone: 128 * sum(code - zero), in lane 0
        i32 = _mm256_sub_epi32(_mm256_madd_epi16(acc[t], _mm256_set1_epi16(1)),
                               _mm256_setr_epi32(128 * nm.q8.wsum[n * nm.q8.nseg + s], 0, 0, 0, 0, 0, 0, 0));
      facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_set1_ps(wscale[g] * qx.scale[(m0 + t) * nm.q8.nseg + s]),
                                facc[t]);
    }
  }
  float tail[MT] = {};
  const int64_t j0 = nblk * 32;
  if (j0 < nm.kc) {  // columns past the last whole 64-column block: exact, checked against K
    BitReader r(meta + 8 * nblk);
    for (int64_t j = j0; j < nm.kc; ++j) {
      const int64_t col = (j / 2) * 4 + r.get(2);
      if (col >= a.K) continue;
      const float v = int4 ? dequant_int4(q, n, j) : dequant_int8(q, n, j);
      for (int t = 0; t < MT; ++t) tail[t] += v * a.x[(m0 + t) * a.stride_xm + col];
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = sp::hsum(facc[t]) + tail[t];
}

template <bool int4>
void q8_rows(const GemmArgs& a, const WeightView& w, const QuantX& qx, int64_t n_begin, int64_t n_end) {
  float out[4];
  for (int64_t n = n_begin; n < n_end; ++n) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) {
      q8_tile<int4, 4>(a, w, qx, n, m, out);
      for (int t = 0; t < 4; ++t) store_output(a, m + t, n, out[t]);
    }
    const int64_t left = a.M - m;
    if (left == 3) q8_tile<int4, 3>(a, w, qx, n, m, out);
    if (left == 2) q8_tile<int4, 2>(a, w, qx, n, m, out);
    if (left == 1) q8_tile<int4, 1>(a, w, qx, n, m, out);
    for (int64_t t = 0; t < left; ++t) store_output(a, m + t, n, out[t]);
  }
}

}  // namespace

Status nm_q8_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const NMView::Q8& pre = w.nm.q8;
  if (!pre.codes || w.nm.n != 2 || w.nm.m != 4 || pre.seg % kBlock || pre.nseg * pre.seg < a.K)
    return nm_gemv_avx2(a, w, n_begin, n_end);  // no prepacked copy: the exact kernel serves it
  const bool int4 = w.nm.values == ValueKind::i4;
  // -- quantize x (this thread's copy: M x K bytes, small next to the weight rows it meets) ---------
  QTileView seg;
  seg.seg = seg.seg_pad = pre.seg;
  seg.nseg = pre.nseg;
  const int64_t stride = pre.nseg * pre.seg;
  int8_t* xq = scratch<int8_t, 0>(size_t(a.M * stride));
  float* xs = scratch<float, 0>(size_t(a.M * pre.nseg));
  int32_t* sums = scratch<int32_t, 0>(size_t(a.M * pre.nseg));
  if (!xq || !xs || !sums) return Status::out_of_memory;
  quantize_act_avx2(a.x, a.M, a.K, a.stride_xm, seg, xq, xs, sums);
  // gather layout: in each 32-byte half of a block, 4-byte column groups in the order 0 2 4 6 1 3 5 7;
  // int4 multiplies x + 128 (unsigned) by code - zero
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i bias = _mm256_set1_epi8(int4 ? char(0x80) : 0);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t k = 0; k + 32 <= stride; k += 32) {
      __m256i* p = reinterpret_cast<__m256i*>(xq + m * stride + k);
      _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_permutevar8x32_epi32(_mm256_loadu_si256(p), order), bias));
    }
  const QuantX qx{reinterpret_cast<const uint8_t*>(xq), xs, stride};
  if (int4)
    q8_rows<true>(a, w, qx, n_begin, n_end);
  else
    q8_rows<false>(a, w, qx, n_begin, n_end);
  return Status::ok;
}

}  // namespace sparseinfer
