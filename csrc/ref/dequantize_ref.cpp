// Dequantize output rows of any packed weight into fp32, for the dense fallback (sparseinfer/
// backends/cpu_routes.py: a tile of rows at a time, then torch's GEMM on it). The values are
// exactly those of the Python to_dense(): the same helpers as the scalar kernels, one fp32
// multiply per element. Scalar, no ISA flags: the active ISA's row decoder (dispatch.cpp,
// active_dequantize_row) takes the rows of the formats it has first. Rows are split over threads
// by parallel_run.
#include <atomic>

#include "ref_common.h"
#include "sparseinfer/dispatch.h"
#include "sparseinfer/threadpool.h"

namespace sparseinfer {
namespace {

// Row n of w into out[0, K); false on a layout this routine does not know.
bool dequantize_row(const WeightView& w, int64_t n, float* out) {
  const int64_t K = w.K;
  switch (w.id) {
    case KernelId::int8:
      for (int64_t k = 0; k < K; ++k) out[k] = dequant_int8(w.q, n, k);
      return true;
    case KernelId::int4:
      for (int64_t k = 0; k < K; ++k) out[k] = dequant_int4(w.q, n, k);
      return true;
    case KernelId::nm_float: case KernelId::nm_int8: case KernelId::nm_int4: {
      const NMView& nm = w.nm;
      for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
      BitReader meta(nm.meta + n * nm.meta_stride);
      for (int64_t j = 0, base = 0, in_group = 0; j < nm.kc; ++j) {
        const int64_t col = base + meta.get(nm.bits);
        if (++in_group == nm.n) in_group = 0, base += nm.m;
        if (col >= K) continue;  // the zero padding of the last group
        switch (nm.values) {
          case ValueKind::i8: out[col] = dequant_int8(w.q, n, j); break;
          case ValueKind::i4: out[col] = dequant_int4(w.q, n, j); break;
          default: out[col] = load_float_value(nm.fvalues, nm.values, n * nm.kc + j); break;
        }
      }
      return true;
    }
    case KernelId::csr_float: case KernelId::csr_int8: {
      const CSRView& c = w.csr;
      for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
      for (int64_t e = c.crow[n]; e < c.crow[n + 1]; ++e)
        out[c.col[e]] = c.kind == ValueKind::i8 ? float(static_cast<const int8_t*>(c.values)[e]) * c.scale[n]
                                                : load_float_value(c.values, c.kind, e);
      return true;
    }
    default: return false;
  }
}

struct DequantizeTask {
  const WeightView* w;
  DequantizeRowFn fast;  // the active ISA's, tried first (nullptr: none)
  int64_t n_begin, n_end, rows_per_task, stride;
  float* out;
  std::atomic<bool> failed{false};
};

void dequantize_task(void* p, int64_t task) {
  DequantizeTask& t = *static_cast<DequantizeTask*>(p);
  const int64_t r0 = t.n_begin + task * t.rows_per_task;
  const int64_t r1 = r0 + t.rows_per_task < t.n_end ? r0 + t.rows_per_task : t.n_end;
  for (int64_t n = r0; n < r1; ++n)
    if (!(t.fast && t.fast(*t.w, n, t.out + (n - t.n_begin) * t.stride)) &&
        !dequantize_row(*t.w, n, t.out + (n - t.n_begin) * t.stride))
      t.failed.store(true);
}

}  // namespace

Status dequantize_rows(const WeightView& w, int64_t n_begin, int64_t n_end, float* out, int64_t stride, int threads) {
  if (n_begin < 0 || n_end > w.N || n_begin > n_end || stride < w.K) return Status::invalid_argument;
  if ((w.id == KernelId::csr_int8 && !w.csr.scale) || w.csr.kind == ValueKind::i4) return Status::invalid_argument;
  const int64_t rows = n_end - n_begin;
  if (rows == 0) return Status::ok;
  // at least 256K elements per task: below that a helper's wake-up costs more than it saves
  int64_t rows_per_task = ((int64_t(1) << 18) + w.K - 1) / (w.K > 0 ? w.K : 1);
  if (rows_per_task < 1) rows_per_task = 1;
  DequantizeTask t;
  t.w = &w, t.fast = active_dequantize_row(), t.n_begin = n_begin, t.n_end = n_end, t.rows_per_task = rows_per_task, t.stride = stride, t.out = out;
  parallel_run((rows + rows_per_task - 1) / rows_per_task, threads, dequantize_task, &t);
  return t.failed.load() ? Status::no_kernel : Status::ok;
}

}  // namespace sparseinfer
