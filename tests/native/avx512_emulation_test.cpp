// Runs the AVX-512 kernels of csrc/x86/avx512/ -- the very sources, built with
// -DSPARSEINFER_AVX512_EMULATION so that avx512_emulation.h stands in for <immintrin.h> -- against
// the scalar kernels of csrc/ref/ on seeded random weights and activations:
//
//   int8 / int4 q8 (vpdpbusd)   bit for bit equal to int8 / int4_q8_gemm_scalar (both register tiles)
//   int8 q8 on compact steps    the same, on the tiles given 2:4 sparsity (build_qtile_compact too)
//   int8 / int4 exact (fp32 x)  ||y - y_scalar|| / ||y_scalar|| <= 1e-5 (summation order only)
//
// Outputs are poisoned with NaN and have padded rows; columns outside [n_begin, n_end) must stay
// NaN. Prints one line per failure and "<P> passed, <F> failed"; exits 1 on any failure.
// Built and run by tests/test_cpu_avx512.py::test_avx512_kernels_under_emulation.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "avx512_emulation.h"  // vpexpandb, to rebuild compact steps as the kernel does
#include "sparseinfer/kernels.h"

using namespace sparseinfer;

namespace {

int passed = 0, failed = 0;

struct Case {
  int bits;           // 8 or 4
  int64_t N, K, M;
  int64_t group;      // 0: per-channel
  bool asym;          // int4 only
  bool bias;
  bool strided;       // x rows K + 3 apart (else K; M > 1 only)
  DType ydt;
};

void fail(const Case& c, const char* what, int64_t m, int64_t n, float got, float want) {
  if (failed < 40)
    std::printf("FAIL %s: bits=%d N=%lld K=%lld M=%lld group=%lld asym=%d bias=%d ydt=%d at (m=%lld, n=%lld): "
                "got %.9g want %.9g\n",
                what, c.bits, (long long)c.N, (long long)c.K, (long long)c.M, (long long)c.group, int(c.asym),
                int(c.bias), int(c.ydt), (long long)m, (long long)n, got, want);
  ++failed;
}

float read_y(const std::vector<uint16_t>& y16, const std::vector<float>& y32, DType dt, int64_t i) {
  if (dt == DType::f32) return y32[i];
  uint32_t b = uint32_t(y16[i]) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

void run_case(const Case& c, std::mt19937& rng) {
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::normal_distribution<float> normal(0.f, 1.f);
  // -- canonical weight (padding columns hold garbage: kernels must not depend on them) ----------
  int64_t g = c.group ? c.group : c.K;
  if (c.bits == 4) g += g & 1;
  const int64_t kp = (c.K + g - 1) / g * g, G = kp / g;
  std::vector<uint8_t> codes(size_t(c.N * (c.bits == 8 ? kp : kp / 2)));
  for (auto& b : codes) b = uint8_t(rng());
  std::vector<float> scale(size_t(c.N * G));
  for (auto& s : scale) s = 0.01f + 0.1f * std::fabs(uni(rng));
  std::vector<uint8_t> zero(size_t(c.N * G));
  for (auto& z : zero) z = uint8_t(rng() % 16);
  QuantView q;
  q.codes = codes.data(), q.scale = scale.data(), q.zero = c.asym ? zero.data() : nullptr;
  q.kp = kp, q.group = g, q.n_groups = G;
  WeightView w;
  w.id = c.bits == 8 ? KernelId::int8 : KernelId::int4;
  w.N = c.N, w.K = c.K, w.q = q;
  const size_t tb = (qtile_bytes(q, c.N, c.bits) + 63) / 64 * 64;
  void* tiles = std::aligned_alloc(64, tb);
  w.qt = build_qtiles(q, c.N, c.bits, tiles);

  // -- activations, bias --------------------------------------------------------------------------
  const int64_t sx = c.strided ? c.K + 3 : c.K;
  std::vector<float> x(size_t(c.M * sx + 3));
  for (auto& v : x) v = normal(rng);
  if (c.M > 2) x[size_t(sx + c.K / 2)] *= 40.f;  // an outlier: a segment with a large max
  std::vector<float> bias(size_t(c.N));
  for (auto& b : bias) b = uni(rng);
  const int64_t cells = c.M * w.qt.nseg;
  std::vector<int8_t> xq(size_t(cells * w.qt.seg_pad));
  std::vector<float> xs(static_cast<size_t>(cells));
  std::vector<int32_t> xsum(static_cast<size_t>(cells));
  quantize_act_scalar(x.data(), c.M, c.K, sx, w.qt, xq.data(), xs.data(), xsum.data(), 0);
  std::vector<int8_t> xqu(xq.size());  // x + 128: the int8 kernels' unsigned operand (QActView::qu)
  quantize_act_scalar(x.data(), c.M, c.K, sx, w.qt, xqu.data(), xs.data(), xsum.data(), 0x80);

  GemmArgs a;
  a.M = c.M, a.N = c.N, a.K = c.K, a.x = x.data(), a.stride_xm = sx, a.bias = c.bias ? bias.data() : nullptr;
  a.y_dtype = c.ydt, a.stride_ym = c.N + 5;
  a.qx.q = xq.data(), a.qx.scale = xs.data(), a.qx.sum = xsum.data(), a.qx.stride_m = w.qt.nseg * w.qt.seg_pad;
  a.qx.qu = reinterpret_cast<const uint8_t*>(xqu.data());
  const size_t ysize = size_t(c.M * a.stride_ym);

  // Column splits: the whole range, the driver's 16-aligned chunks, and an unaligned range.
  struct Range { int64_t lo, hi; };
  std::vector<std::vector<Range>> splits = {{{0, c.N}}};
  if (c.N > 16) splits.push_back({{0, 16}, {16, c.N}});
  if (c.N > 8) splits.push_back({{3, c.N - 2}});

  using Fn = Status (*)(const GemmArgs&, const WeightView&, int64_t, int64_t);
  auto check = [&](Fn fast, Fn ref, const char* name, bool exact_bits, const WeightView& wv) {
    for (const auto& split : splits) {
      std::vector<float> y32(ysize, NAN), r32(ysize, NAN);
      std::vector<uint16_t> y16(ysize, 0x7fc0), r16(ysize, 0x7fc0);
      a.y = c.ydt == DType::f32 ? (void*)y32.data() : (void*)y16.data();
      for (const Range& r : split)
        if (fast(a, wv, r.lo, r.hi) != Status::ok) fail(c, name, -1, r.lo, 0, 0);
      a.y = c.ydt == DType::f32 ? (void*)r32.data() : (void*)r16.data();
      for (const Range& r : split) ref(a, wv, r.lo, r.hi);
      double num = 0, den = 0;
      bool ok = true;
      for (int64_t m = 0; m < c.M && ok; ++m)
        for (int64_t n = 0; n < a.stride_ym && ok; ++n) {
          const int64_t i = m * a.stride_ym + n;
          const float got = read_y(y16, y32, c.ydt, i), want = read_y(r16, r32, c.ydt, i);
          bool inside = false;
          for (const Range& r : split) inside = inside || (n >= r.lo && n < r.hi);
          if (!inside) {
            if (!std::isnan(got)) fail(c, "wrote outside its columns", m, n, got, want), ok = false;
            continue;
          }
          if (std::isnan(got) || std::isnan(want)) {
            fail(c, name, m, n, got, want), ok = false;
          } else if (exact_bits && std::memcmp(&got, &want, 4) != 0) {
            fail(c, name, m, n, got, want), ok = false;
          }
          num += double(got - want) * double(got - want), den += double(want) * double(want);
        }
      if (ok && !exact_bits) {
        const double tol = c.ydt == DType::f32 ? 1e-5 : 1e-2;
        if (std::sqrt(num) > tol * std::sqrt(den) + 1e-30) fail(c, name, -1, -1, float(std::sqrt(num / den)), 0), ok = false;
      }
      if (ok) ++passed;
    }
  };
  const Fn q8_ref = c.bits == 8 ? int8_q8_gemm_scalar : int4_q8_gemm_scalar;
  check(c.bits == 8 ? int8_q8_gemm_vnni_avx512 : int4_q8_gemm_vnni_avx512, q8_ref,
        c.bits == 8 ? "int8_q8_vnni" : "int4_q8_vnni", true, w);
  check(c.bits == 8 ? int8_q8_gemm_vnni4x4_avx512 : int4_q8_gemm_vnni4x4_avx512, q8_ref,
        c.bits == 8 ? "int8_q8_vnni4x4" : "int4_q8_vnni4x4", true, w);
  check(c.bits == 8 ? int8_gemm_avx512 : int4_gemm_avx512, c.bits == 8 ? int8_gemm_scalar : int4_gemm_scalar,
        c.bits == 8 ? "int8_exact" : "int4_exact", false, w);

  // -- compact steps (kernels.h, QTileView::compact): int8 tiles given 2:4 sparsity (2 of every lane's
  // 4 codes of a step set to 0), squeezed, rebuilt byte for byte, and run ------------------------------
  if (qtile_compact_supported(w.qt)) {
    const int64_t nsteps = w.qt.tiles * w.qt.nseg * (w.qt.seg_pad / 4);
    std::vector<uint8_t> sparse(w.qt.codes, w.qt.codes + nsteps * 64);
    for (int64_t lane = 0; lane < nsteps * 16; ++lane) {
      const int64_t p1 = int64_t(rng() % 4), p2 = (p1 + 1 + int64_t(rng() % 3)) % 4;  // 2 distinct positions
      sparse[size_t(lane * 4 + p1)] = sparse[size_t(lane * 4 + p2)] = 0;
    }
    WeightView ws = w;
    ws.id = KernelId::nm_int8;
    ws.qt.codes = sparse.data();
    std::vector<int32_t> wsum(size_t(w.qt.tiles * w.qt.nseg * kQTileRows), 0);  // the sparse codes' sums
    const int64_t steps = w.qt.seg_pad / 4;
    for (int64_t ts = 0; ts < w.qt.tiles * w.qt.nseg; ++ts)
      for (int64_t j = 0; j < steps * 64; ++j)
        wsum[size_t(ts * kQTileRows + (j % 64) / 4)] += 128 * int32_t(int8_t(sparse[size_t(ts * steps * 64 + j)]));
    ws.qt.wsum128 = wsum.data();
    std::vector<uint8_t> packed(qtile_compact_bytes(ws.qt));
    if (!build_qtile_compact(ws.qt, packed.data())) {
      fail(c, "build_qtile_compact refused 2:4 tiles", -1, -1, 0, 0);
    } else {
      bool same = true;  // every step rebuilt as vpexpandb does equals the sparse tiles' step
      for (int64_t i = 0; i < nsteps && same; ++i) {
        const uint8_t* p = ws.qt.compact + i * kCompactStepBytes;
        __mmask64 mask;
        std::memcpy(&mask, p, 8);
        __m256i kept;
        std::memcpy(kept.b, p + 8, 32);
        same = std::memcmp(_mm512_maskz_expand_epi8(mask, _mm512_castsi256_si512(kept)).b, &sparse[size_t(i * 64)],
                           64) == 0;
      }
      if (!same) fail(c, "compact steps do not rebuild the tiles", -1, -1, 0, 0);
      check(int8_q8_compact_vnni_avx512, q8_ref, "int8_q8_compact", true, ws);
      // a lane with 3 non-zero codes is refused, and the view is left as it was
      std::memset(&sparse[size_t((nsteps - 1) * 64 + 60)], 7, 3);
      WeightView bad = ws;
      bad.qt.compact = nullptr;
      if (build_qtile_compact(bad.qt, packed.data()) || bad.qt.compact) fail(c, "3 of 4 kept: not refused", -1, -1, 0, 0);
    }
  }
  std::free(tiles);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  const int64_t shapes[][2] = {{1, 7}, {3, 33}, {17, 1}, {100, 7}, {129, 33}, {256, 64}, {4095, 7}};
  const int64_t batches[] = {1, 2, 3, 7, 17, 64, 100};  // 100: row blocks of 16 (qtile_gemm.h)
  struct Fmt { int bits; int64_t group; bool asym; };
  const Fmt fmts[] = {{8, 0, false}, {8, 16, false}, {8, 128, false}, {8, 100, false}, {4, 32, false},
                      {4, 64, false}, {4, 128, false}, {4, 0, false}, {4, 16, true}, {4, 0, true}, {4, 128, true}};
  int i = 0;
  for (const Fmt& f : fmts)
    for (const auto& s : shapes)
      for (int64_t m : batches) {
        if (s[0] > 1000 && m > 17) continue;
        Case c;
        c.bits = f.bits, c.K = s[0], c.N = s[1], c.M = m;
        c.group = f.group && f.group < c.K ? f.group : 0;
        c.asym = f.asym, c.bias = i % 3 != 2, c.strided = i % 2 == 1;
        c.ydt = i % 5 == 4 ? DType::bf16 : DType::f32;
        ++i;
        run_case(c, rng);
      }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
