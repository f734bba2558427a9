// int8 x fp32 activations (exact mode), AVX2 + FMA, small batches: W[n, k] = code * scale[n, k / g].
// Loop nest: quant_gemv_avx2.h (4 weight rows per pass, codes decoded once per batch-row block).
// Decode: 8 codes -> vpmovsxbd (straight from memory) -> cvtdq2ps.
#include "quant_gemv_avx2.h"

namespace sparseinfer {

namespace {

struct Int8Rows {
  static constexpr int kStep = 16;
  const int8_t* c[avx2::kGemvRows];
  Int8Rows(const QuantView& q, int64_t n, int rows, int) {
    for (int r = 0; r < rows; ++r) c[r] = static_cast<const int8_t*>(q.codes) + (n + r) * q.kp;
  }
  void begin_group(int, int64_t) {}
  bool aligned(int64_t) const { return true; }
  void step(int r, int64_t k, __m256* w) const {
    w[0] = avx2::load_i8x8(c[r] + k);
    w[1] = avx2::load_i8x8(c[r] + k + 8);
  }
  float code(int r, int64_t k) const { return float(c[r][k]); }
  const float* step_x(const GemmArgs& a, int64_t m) const { return a.x + m * a.stride_xm; }
};

}  // namespace

Status int8_gemv_avx2(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QuantView& q = w.q;
  if (q.group <= 0 || q.kp < a.K || q.n_groups * q.group != q.kp) return Status::invalid_argument;
  return avx2::gemv<Int8Rows>(a, q, n_begin, n_end, 0);
}

}  // namespace sparseinfer
