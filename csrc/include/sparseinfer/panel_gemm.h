// Exact-mode (fp32 x) GEMM on decoded weight panels: the loop nest shared by the SIMD groups
// (x86/avx512/panel_gemm_avx512.cpp, x86/avx2/panel_gemm_avx2.cpp, arm/neon/panel_gemm_neon.cpp).
// ISA-free; each group includes it with its own flags and supplies a traits class P (internal
// linkage: see kernel_utils.h).
//
//   y[M, N] = x[M, K] . W^T (+ bias)     W: any packed format, decoded by `decode` below
//
// BLIS structure (B = W^T, A = x): per thread column range, for each NC x KC block of W
//   1. `decode` writes the block's strips of P::kNR rows as fp32 [KC][NR] panels (lanes along N;
//      exactly the values to_dense() gives): the whole block is an L2-resident fp32 panel set;
//   2. every batch row runs over it in P::kMR x P::kNR register tiles (x broadcast per k, kMR x
//      kNR / lanes accumulators, no horizontal sums), accumulating in y (fp32) or in an fp32
//      scratch (bf16 / fp16 y, rounded once at the end).
// The decode is paid once per weight element and call, whatever M is: that is the point of the
// path (the GEMV kernels decode per batch-row chunk). Lanes run along N, so K needs no padding.
//
// Traits P provides:
//   kNR, kMR, kKC, kNC     strip width (floats), rows per register tile, K and N block sizes
//   tile<MR>(x, sx, panel, kb, c, ldc, nr, first, bias)
//       c[i * ldc + j] (+)= sum_k x[i * sx + k] * panel[k * kNR + j], i < MR, j < nr; `first`:
//       c is not read (overwritten); bias != nullptr: bias[j] is added before the store.
#pragma once

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace panel {

// P::tile for traits without masked loads / stores (AVX2, NEON): a partial strip (nr < kNR, the last
// one of a column range) goes through a full-width copy, so P::full_tile<MR> (same arguments, no nr)
// sees one plain load / store path.
template <class P, int MR>
inline void tile_through_copy(const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, int nr,
                              bool first, const float* bias) {
  constexpr int NR = P::kNR;
  if (nr == NR) return P::template full_tile<MR>(x, sx, wp, kb, c, ldc, first, bias);
  alignas(64) float ct[MR * NR], bt[NR] = {};
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) ct[i * NR + j] = !first && j < nr ? c[i * ldc + j] : 0.f;
  if (bias)
    for (int j = 0; j < nr; ++j) bt[j] = bias[j];
  P::template full_tile<MR>(x, sx, wp, kb, ct, NR, first, bias ? bt : nullptr);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) c[i * ldc + j] = ct[i * NR + j];
}

// The int8 / int4 layout invariants the quantized decoders rely on (K columns, whole groups, int4
// codes in whole bytes).
inline Status check_quant(const QuantView& q, int64_t K, bool int4) {
  if (q.group <= 0 || q.kp < K || q.n_groups * q.group != q.kp || (int4 && (q.kp & 1))) return Status::invalid_argument;
  return Status::ok;
}

// The end of the scale group of column k, capped at `end`.
inline int64_t group_end(const QuantView& q, int64_t k, int64_t end) {
  const int64_t e = (k / q.group + 1) * q.group;
  return e < end ? e : end;
}

// tile<MR> for the runtime row count mr (1 <= mr <= MR): one instantiation per count.
template <class P, int MR>
inline void run_tile(int mr, const float* x, int64_t sx, const float* wp, int kb, float* c, int64_t ldc, int nr,
                     bool first, const float* bias) {
  if constexpr (MR > 1) {
    if (mr < MR) return run_tile<P, MR - 1>(mr, x, sx, wp, kb, c, ldc, nr, first, bias);
  }
  P::template tile<MR>(x, sx, wp, kb, c, ldc, nr, first, bias);
}

// decode(n, nr, k0, kb, panel): panel[kk * kNR + j] = W[n + j, k0 + kk] for kk < kb, j < nr, and
// finite (zero) for j >= nr. k0 is always a multiple of P::kKC. Returns false on a layout it
// cannot decode.
template <class P, class Decode>
Status gemm(const GemmArgs& a, int64_t n_begin, int64_t n_end, Decode&& decode) {
  constexpr int NR = P::kNR, MR = P::kMR, KC = P::kKC, NC = P::kNC;
  static_assert(NC % NR == 0, "an N block is whole strips");
  float* wp = scratch<float, 0>(size_t(NC) * KC);
  const bool direct = a.y_dtype == DType::f32;  // accumulate in y itself
  float* cbuf = direct ? nullptr : scratch<float, 1>(size_t(a.M) * NC);
  if (!wp || (!direct && !cbuf)) return Status::out_of_memory;
  const int64_t sx = a.stride_xm;

  for (int64_t n0 = n_begin; n0 < n_end; n0 += NC) {
    const int nc = int(n_end - n0 < NC ? n_end - n0 : NC);
    float* c0 = direct ? static_cast<float*>(a.y) + n0 : cbuf;
    const int64_t ldc = direct ? a.stride_ym : NC;
    for (int64_t k0 = 0; k0 < a.K; k0 += KC) {
      const int kb = int(a.K - k0 < KC ? a.K - k0 : KC);
      // 1. decode the block's strips
      for (int s = 0; s * NR < nc; ++s) {
        const int nr = nc - s * NR < NR ? nc - s * NR : NR;
        if (!decode(n0 + s * NR, nr, k0, kb, wp + size_t(s) * KC * NR)) return Status::invalid_argument;
      }
      // 2. all batch rows over it: a tile of x (MR x KC) stays in L1 while the strips go by
      const bool first = k0 == 0, last = k0 + kb >= a.K;
      for (int64_t m0 = 0; m0 < a.M; m0 += MR) {
        const int mr = int(a.M - m0 < MR ? a.M - m0 : MR);
        const float* x = a.x + m0 * sx + k0;
        for (int s = 0; s * NR < nc; ++s) {
          const int nr = nc - s * NR < NR ? nc - s * NR : NR;
          const float* bias = direct && last && a.bias ? a.bias + n0 + s * NR : nullptr;
          run_tile<P, MR>(mr, x, sx, wp + size_t(s) * KC * NR, kb, c0 + m0 * ldc + s * NR, ldc, nr, first, bias);
        }
      }
    }
    if (!direct)
      for (int64_t m = 0; m < a.M; ++m)
        for (int j = 0; j < nc; ++j) store_output(a, m, n0 + j, cbuf[m * NC + j]);
  }
  return Status::ok;
}

}  // namespace panel
}  // namespace
}  // namespace sparseinfer
