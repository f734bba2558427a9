// CSR x fp32 activations, AVX2 + FMA, for float (f32 / bf16 / f16) and int8 (+ per-row scale)
// values (sparseinfer/formats/csr.py). Row-parallel: the driver splits output rows over threads.
//
//   csr_gemv_avx2  few batch rows: per weight row and batch row, a scalar gather-dot over the
//                  entries (x[m, col] from L1); 4 independent sums hide the FMA latency. Scalar
//                  loads measured faster than vgatherdps here. int8 codes are summed unscaled and
//                  the row scale applied once at the end.
//   csr_gemm_avx2  many batch rows: x transposed to xT[K][MB] (sparse_avx2.h); each entry costs one
//                  broadcast and MB/8 FMAs against the contiguous batch row xT[col].
//
// Column indices were range-checked at prepack (bindings.cpp), so no check here.
#include "sparse_avx2.h"

namespace sparseinfer {
namespace {

template <ValueKind V>
inline float csr_value(const void* values, int64_t e) {
  if (V == ValueKind::i8) return float(static_cast<const int8_t*>(values)[e]);
  return sp::load1<V>(values, e);
}

// y[m0 .. m0 + MT, n] (before the int8 row scale) for entries [e0, e1) of one row: each entry's
// column and value are loaded once for MT batch rows (x[m, col] from L1); two sums per batch row
// (four for one row) hide the FMA latency. Scalar on purpose (sp::keep_scalar): vectorized, the
// gathers become vinsertps / vpermd sequences, 2x slower here, as is vgatherdps.
template <ValueKind V, int MT>
void csr_gemv_tile(const GemmArgs& a, int64_t m0, const int32_t* col, const void* values, int64_t e0, int64_t e1,
                   float* out) {
  const float* x[MT];
  for (int t = 0; t < MT; ++t) x[t] = a.x + (m0 + t) * a.stride_xm;
  if (MT == 1) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t e = e0;
    for (; e + 4 <= e1; e += 4) {
      s0 = s0 + csr_value<V>(values, e) * x[0][col[e]];
      s1 = s1 + csr_value<V>(values, e + 1) * x[0][col[e + 1]];
      s2 = s2 + csr_value<V>(values, e + 2) * x[0][col[e + 2]];
      s3 = s3 + csr_value<V>(values, e + 3) * x[0][col[e + 3]];
      sp::keep_scalar(s0);
    }
    for (; e < e1; ++e) s0 += csr_value<V>(values, e) * x[0][col[e]];
    out[0] = (s0 + s1) + (s2 + s3);
    return;
  }
  float s[MT][2] = {};
  int64_t e = e0;
  for (; e + 2 <= e1; e += 2) {
    const float v0 = csr_value<V>(values, e), v1 = csr_value<V>(values, e + 1);
    const int32_t c0 = col[e], c1 = col[e + 1];
    for (int t = 0; t < MT; ++t) {
      s[t][0] += v0 * x[t][c0], s[t][1] += v1 * x[t][c1];
      sp::keep_scalar(s[t][0]);
    }
  }
  if (e < e1) {
    const float v0 = csr_value<V>(values, e);
    for (int t = 0; t < MT; ++t) s[t][0] += v0 * x[t][col[e]];
  }
  for (int t = 0; t < MT; ++t) out[t] = s[t][0] + s[t][1];
}

template <ValueKind V>
void csr_gemv_rows(const GemmArgs& a, const CSRView& c, int64_t n_begin, int64_t n_end) {
  float out[4];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t e0 = c.crow[n], e1 = c.crow[n + 1];
    const float scale = V == ValueKind::i8 ? c.scale[n] : 1.f;
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) {
      csr_gemv_tile<V, 4>(a, m, c.col, c.values, e0, e1, out);
      for (int t = 0; t < 4; ++t) store_output(a, m + t, n, V == ValueKind::i8 ? out[t] * scale : out[t]);
    }
    const int64_t left = a.M - m;
    if (left == 3) csr_gemv_tile<V, 3>(a, m, c.col, c.values, e0, e1, out);
    if (left == 2) csr_gemv_tile<V, 2>(a, m, c.col, c.values, e0, e1, out);
    if (left == 1) csr_gemv_tile<V, 1>(a, m, c.col, c.values, e0, e1, out);
    for (int64_t t = 0; t < left; ++t) store_output(a, m + t, n, V == ValueKind::i8 ? out[t] * scale : out[t]);
  }
}

// ---- gemm: xT ---------------------------------------------------------------------------------

constexpr int64_t kMaxBlock = 64;

template <int NV>
void csr_gemm_block(const GemmArgs& a, const CSRView& c, int64_t n_begin, int64_t n_end, int64_t m0, int64_t rows,
                    const float* xT, int32_t* off, float* vals) {
  const int32_t stride = NV * 8;
  for (int64_t n = n_begin; n < n_end; ++n) {
    if ((n - n_begin) % 32 == 0) sp::prefetch_y(a, m0, rows, n, n + 32 < n_end ? n + 32 : n_end);
    const int64_t e0 = c.crow[n], count = c.crow[n + 1] - e0;
    const int32_t* col = c.col + e0;
    int64_t j = 0;
    const __m256i vs = _mm256_set1_epi32(stride);
    for (; j + 8 <= count; j += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + j),
                          _mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j)), vs));
    for (; j < count; ++j) off[j] = col[j] * stride;
    const float* v;
    if (c.kind == ValueKind::f32) {
      v = static_cast<const float*>(c.values) + e0;
    } else if (c.kind == ValueKind::i8) {
      // code * scale, one rounding each: the values to_dense() produces
      const int8_t* codes = static_cast<const int8_t*>(c.values) + e0;
      const __m256 s = _mm256_set1_ps(c.scale[n]);
      for (j = 0; j + 8 <= count; j += 8) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
        _mm256_storeu_ps(vals + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
      }
      for (; j < count; ++j) vals[j] = float(codes[j]) * c.scale[n];
      v = vals;
    } else {
      sp::widen(c.values, c.kind, e0, count, vals);
      v = vals;
    }
    __m256 acc[NV];
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
    sp::xt_accumulate<NV>(xT, off, v, count, acc);
    sp::store_acc(a, m0, rows, n, acc);
  }
}

}  // namespace

Status csr_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const CSRView& c = w.csr;
  const Status s = sp::check_csr(c);
  if (s != Status::ok) return s;
  switch (c.kind) {
    case ValueKind::f32: csr_gemv_rows<ValueKind::f32>(a, c, n_begin, n_end); break;
    case ValueKind::bf16: csr_gemv_rows<ValueKind::bf16>(a, c, n_begin, n_end); break;
    case ValueKind::f16: csr_gemv_rows<ValueKind::f16>(a, c, n_begin, n_end); break;
    default: csr_gemv_rows<ValueKind::i8>(a, c, n_begin, n_end); break;
  }
  return Status::ok;
}

Status csr_gemm_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const CSRView& c = w.csr;
  const Status s = sp::check_csr(c);
  if (s != Status::ok) return s;
  if (a.K > INT32_MAX / kMaxBlock) return csr_gemv_avx2(a, w, n_begin, n_end);
  int64_t widest = 0;
  for (int64_t n = n_begin; n < n_end; ++n)
    if (c.crow[n + 1] - c.crow[n] > widest) widest = c.crow[n + 1] - c.crow[n];
  const int64_t block = a.M < kMaxBlock ? (a.M + 7) / 8 * 8 : kMaxBlock;
  float* xT = scratch<float, 0>(size_t(a.K * block));
  int32_t* off = scratch<int32_t, 1>(size_t(widest));
  float* vals = scratch<float, 2>(size_t(widest));
  if (!xT || !off || !vals) return Status::out_of_memory;
  for (int64_t m0 = 0; m0 < a.M; m0 += block) {
    const int64_t rows = a.M - m0 < block ? a.M - m0 : block;
    const int64_t nv = (rows + 7) / 8;
    sp::transpose_x(a, m0, rows, nv * 8, xT);
    switch (nv) {
      case 1: csr_gemm_block<1>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
      case 2: csr_gemm_block<2>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
      case 3: csr_gemm_block<3>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
      case 4: csr_gemm_block<4>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
      case 5: csr_gemm_block<5>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
      case 6: csr_gemm_block<6>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
      case 7: csr_gemm_block<7>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
      default: csr_gemm_block<8>(a, c, n_begin, n_end, m0, rows, xT, off, vals); break;
    }
  }
  return Status::ok;
}

}  // namespace sparseinfer
