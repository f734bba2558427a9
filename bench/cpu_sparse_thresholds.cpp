// Times the gemv and gemm kernels of one sparse family against each other over batch sizes, on one
// thread, calling the kernels directly (no Python, no dispatch): where the gemm kernel starts to win
// is the gemv row's max_m in csrc/dispatch.cpp. Built and run by bench/cpu_sparse_roofline.py
// --thresholds; prints "family M gemv_us gemm_us" per line.
//
//   cpu_sparse_thresholds FAMILY N K M1,M2,... REPS      FAMILY: nm, nm_int8, nm_int4, nm_int8_q8, nm_int4_q8,
//                                                                csr, csr_int8
//
// nm_int*_q8 compares the int8-activation gemv (nm_q8_gemv_avx2) with the exact gemm, the kernel a
// larger batch falls back to in that mode.
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "sparseinfer/kernels.h"

using namespace sparseinfer;

namespace {

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

double best_of(KernelFn fn, const GemmArgs& a, const WeightView& w, int reps) {
  fn(a, w, 0, w.N);  // warm-up: scratch growth
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = thread_seconds();
    fn(a, w, 0, w.N);
    best = std::min(best, thread_seconds() - t0);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s FAMILY N K M1,M2,... REPS\n", argv[0]);
    return 2;
  }
  const std::string family = argv[1];
  const int64_t N = std::atoll(argv[2]), K = std::atoll(argv[3]);
  std::vector<int64_t> batches;
  for (const char* p = argv[4]; *p;) {
    char* end;
    batches.push_back(std::strtoll(p, &end, 10));
    p = *end == ',' ? end + 1 : end;
  }
  const int64_t mmax = *std::max_element(batches.begin(), batches.end());
  const int reps = std::atoi(argv[5]);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  // -- a random 2:4 weight (K % 4 == 0): values, int8 / int4 codes with groups of 128, meta ---------
  const int64_t kc = K / 2, group = 128;
  std::vector<float> vals(size_t(N * kc)), scale(size_t(N * (kc / group)), 0.01f);
  std::vector<int8_t> q8(size_t(N * kc));
  std::vector<uint8_t> q4(size_t(N * kc / 2)), meta(size_t(N * kc / 4));
  for (auto& v : vals) v = uni(rng);
  for (auto& v : q8) v = int8_t(rng() % 255 - 127);
  for (auto& v : q4) v = uint8_t(rng());
  static const uint8_t pairs[6] = {0x4, 0x8, 0xC, 0x9, 0xD, 0xE};  // i0 | i1 << 2 with i0 < i1
  for (auto& b : meta) b = uint8_t(pairs[rng() % 6] | (pairs[rng() % 6] << 4));
  WeightView w;
  w.N = N, w.K = K;
  NMView& nm = w.nm;
  nm.n = 2, nm.m = 4, nm.bits = 2, nm.kc = kc, nm.meta = meta.data(), nm.meta_stride = kc / 4;
  nm.values = ValueKind::f32, nm.fvalues = vals.data();
  w.id = KernelId::nm_float;
  std::vector<uint8_t> pre;
  KernelFn gemv = nm_gemv_avx2, gemm = nm_gemm_avx2;
  if (family.rfind("nm_int", 0) == 0) {
    const bool int4 = family.rfind("nm_int4", 0) == 0;
    w.id = int4 ? KernelId::nm_int4 : KernelId::nm_int8;
    nm.values = int4 ? ValueKind::i4 : ValueKind::i8;
    w.q.codes = int4 ? static_cast<const void*>(q4.data()) : static_cast<const void*>(q8.data());
    w.q.scale = scale.data(), w.q.kp = kc, w.q.group = group, w.q.n_groups = kc / group;
    if (family.size() > 7 && family.substr(7) == "_q8") {
      pre.resize(nm_q8_prepack_bytes(w) + 64);
      nm.q8 = nm_q8_prepack(w, reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(pre.data()) + 63) / 64 * 64));
      gemv = nm_q8_gemv_avx2;
    }
  }
  // -- a random CSR weight at 10% density --------------------------------------------------------------
  std::vector<int64_t> crow(size_t(N + 1));
  std::vector<int32_t> col;
  std::vector<float> cval;
  std::vector<int8_t> cq;
  std::vector<float> cscale(size_t(N), 0.01f);
  if (family.rfind("csr", 0) == 0) {
    for (int64_t n = 0; n < N; ++n) {
      crow[size_t(n)] = int64_t(col.size());
      for (int64_t k = 0; k < K; ++k)
        if (rng() % 10 == 0) col.push_back(int32_t(k)), cval.push_back(uni(rng)), cq.push_back(int8_t(rng() % 255 - 127));
    }
    crow[size_t(N)] = int64_t(col.size());
    const bool q = family == "csr_int8";
    w.id = q ? KernelId::csr_int8 : KernelId::csr_float;
    w.csr.crow = crow.data(), w.csr.col = col.data(), w.csr.nnz = int64_t(col.size());
    w.csr.kind = q ? ValueKind::i8 : ValueKind::f32;
    w.csr.values = q ? static_cast<const void*>(cq.data()) : static_cast<const void*>(cval.data());
    w.csr.scale = cscale.data();
    gemv = csr_gemv_avx2, gemm = csr_gemm_avx2;
  }
  std::vector<float> x(size_t(mmax * K)), y(size_t(mmax * N));
  for (auto& v : x) v = uni(rng);
  for (const int64_t M : batches) {
    GemmArgs a;
    a.M = M, a.N = N, a.K = K, a.x = x.data(), a.stride_xm = K, a.y = y.data(), a.y_dtype = DType::f32, a.stride_ym = N;
    const double tv = best_of(gemv, a, w, reps), tm = best_of(gemm, a, w, reps);
    std::printf("%s %lld %.1f %.1f\n", family.c_str(), static_cast<long long>(M), tv * 1e6, tm * 1e6);
    std::fflush(stdout);
  }
  return 0;
}
