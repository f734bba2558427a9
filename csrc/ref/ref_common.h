// Building blocks of the scalar kernels. Each scalar kernel dequantizes one weight row at a time
// into fp32 scratch -- exactly the values Python's to_dense() produces -- and then takes its dot
// product with every row of x, so the decode cost is paid once per weight row, not per batch row.
#pragma once

#include <cstdint>

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {
namespace {
namespace ref {

// Dense dot product with 8 independent accumulators: breaks the add dependency chain and lets the
// compiler use the baseline vector unit (SSE2 / ASIMD) without -ffast-math.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int i = 0; i < 8; ++i) acc[i] += a[k + i] * b[k + i];
  float tail = 0.f;
  for (; k < n; ++k) tail += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Sparse dot: sum_j x[cols[j]] * vals[j].
inline float gather_dot(const float* x, const int32_t* cols, const float* vals, int64_t count) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 4 <= count; j += 4)
    for (int i = 0; i < 4; ++i) acc[i] += x[cols[j + i]] * vals[j + i];
  float tail = 0.f;
  for (; j < count; ++j) tail += x[cols[j]] * vals[j];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail;
}

// y[:, n] for one dequantized dense weight row.
inline void dense_row_epilogue(const GemmArgs& a, int64_t n, const float* wrow) {
  for (int64_t m = 0; m < a.M; ++m) store_output(a, m, n, dot(a.x + m * a.stride_xm, wrow, a.K));
}

// y[:, n] for one sparse weight row given as (column, value) pairs.
inline void sparse_row_epilogue(const GemmArgs& a, int64_t n, const int32_t* cols, const float* vals,
                                int64_t count) {
  for (int64_t m = 0; m < a.M; ++m) store_output(a, m, n, gather_dot(a.x + m * a.stride_xm, cols, vals, count));
}

}  // namespace ref
}  // namespace
}  // namespace sparseinfer
