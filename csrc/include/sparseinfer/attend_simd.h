// decode.h's attend_part in vectors, for the AVX2, AVX-512 and NEON groups (decode_avx2.cpp,
// decode_avx512.cpp, decode_neon.cpp: one algorithm over a vector type, `Simd`, that each of them
// defines before including this header). The plain loops leave a horizontal sum per score and keep
// the value accumulators in memory; at a long context attention then cost several times a SmolLM2
// step's weights. Here:
// - scores W positions at a time: W dot products accumulated lane-wise, then one transposing sum
//   (Simd::sums) gives the W scores in one vector;
// - e^(s - max) in vector lanes, with exp_approx's arithmetic (the same bits);
// - values: each row read once for up to Simd::kHeads query heads, their accumulators in registers.
// Head sizes that are not a multiple of W take the plain loops. A half-precision cache is widened as
// it is loaded (F16C / AVX-512F vcvtph2ps, NEON fcvtl: exact).
#pragma once

#include <cstdint>

#include "sparseinfer/decode.h"

namespace sparseinfer {
namespace {
namespace attend_simd {

using V = Simd::V;
constexpr int W = Simd::W;

// decode_math::exp_approx in W lanes (the same operations, so the same bits).
inline V exp_lanes(V x) {
  x = Simd::min(Simd::max(x, Simd::set1(-87.3f)), Simd::set1(88.3f));
  const V round = Simd::set1(12582912.0f);
  V r = Simd::add(Simd::mul(x, Simd::set1(1.44269504088896341f)), round);
  r = Simd::sub(r, round);
  V f = Simd::sub(x, Simd::mul(r, Simd::set1(0.693145751953125f)));
  f = Simd::sub(f, Simd::mul(r, Simd::set1(1.42860682030941723e-06f)));
  V p = Simd::set1(1.0f / 5040);
  const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  for (float ci : c) p = Simd::add(Simd::mul(p, f), Simd::set1(ci));
  return Simd::mul(p, Simd::pow2(r));
}

inline V load_kv(const float* p) { return Simd::load(p); }
inline V load_kv(const uint16_t* p) { return Simd::load_f16(p); }

// Values of positions [0, n) into o[g * d + c ...] for heads g < GS, columns [c, c + NV * W).
template <int NV, int GS, class T>
inline void values_tile(const float* p, int64_t n, const T* v, int64_t d, int64_t c, float* o) {
  V acc[GS][NV];
  for (int g = 0; g < GS; ++g)
    for (int u = 0; u < NV; ++u) acc[g][u] = Simd::zero();
  for (int64_t t = 0; t < n; ++t) {
    V row[NV];
    for (int u = 0; u < NV; ++u) row[u] = load_kv(v + t * d + c + u * W);
    for (int g = 0; g < GS; ++g) {
      const V pg = Simd::set1(p[g * n + t]);
      for (int u = 0; u < NV; ++u) acc[g][u] = Simd::fmadd(pg, row[u], acc[g][u]);
    }
  }
  for (int g = 0; g < GS; ++g)
    for (int u = 0; u < NV; ++u) Simd::store(o + g * d + c + u * W, acc[g][u]);
}

template <int NV, class T>
inline void values_heads(int64_t gs, const float* p, int64_t n, const T* v, int64_t d, int64_t c, float* o) {
  static_assert(Simd::kHeads == 2 || Simd::kHeads == 4, "kHeads: 2 or 4");
  if (gs == 1) return values_tile<NV, 1, T>(p, n, v, d, c, o);
  if (gs == 2) return values_tile<NV, 2, T>(p, n, v, d, c, o);
  if constexpr (Simd::kHeads == 4) {
    if (gs == 3) return values_tile<NV, 3, T>(p, n, v, d, c, o);
    return values_tile<NV, 4, T>(p, n, v, d, c, o);
  }
}

template <class T>
inline void attend_part(const float* q, int64_t G, const T* k, const T* v, int64_t d, int64_t t0, int64_t t1,
                        float scale, float* scores, float* m, float* l, float* o) {
  if (d % W) return decode_math::attend_part(q, G, k, v, d, t0, t1, scale, scores, m, l, o);
  const int64_t n = t1 - t0;
  k += t0 * d, v += t0 * d;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * d;
    float* s = scores + g * n;
    V top = Simd::set1(-3.0e38f);
    int64_t t = 0;
    for (; t + W <= n; t += W) {  // W positions: W dot products lane-wise, then one transposing sum
      V acc[W];
      for (int j = 0; j < W; ++j) acc[j] = Simd::zero();
      for (int64_t i = 0; i < d; i += W) {
        const V qi = Simd::load(qg + i);
        for (int j = 0; j < W; ++j) acc[j] = Simd::fmadd(qi, load_kv(k + (t + j) * d + i), acc[j]);
      }
      const V sv = Simd::mul(Simd::sums(acc), Simd::set1(scale));
      Simd::store(s + t, sv);
      top = Simd::max(top, sv);
    }
    float mx = Simd::hmax(top);
    for (; t < n; ++t) {
      s[t] = decode_math::dot(qg, k + t * d, d) * scale;
      mx = s[t] > mx ? s[t] : mx;
    }
    m[g] = mx;
    V sum = Simd::zero();
    const V shift = Simd::set1(mx);
    for (t = 0; t + W <= n; t += W) {
      const V e = exp_lanes(Simd::sub(Simd::load(s + t), shift));
      Simd::store(s + t, e);
      sum = Simd::add(sum, e);
    }
    float total = Simd::hsum(sum);
    for (; t < n; ++t) {
      s[t] = decode_math::exp_approx(s[t] - mx);
      total += s[t];
    }
    l[g] = total;
  }
  for (int64_t g0 = 0; g0 < G; g0 += Simd::kHeads) {  // value rows once per kHeads heads
    const int64_t gs = G - g0 < Simd::kHeads ? G - g0 : Simd::kHeads;
    const float* p = scores + g0 * n;
    float* og = o + g0 * d;
    int64_t c = 0;
    for (; c + 4 * W <= d; c += 4 * W) values_heads<4, T>(gs, p, n, v, d, c, og);
    switch ((d - c) / W) {
      case 3: values_heads<3, T>(gs, p, n, v, d, c, og); break;
      case 2: values_heads<2, T>(gs, p, n, v, d, c, og); break;
      case 1: values_heads<1, T>(gs, p, n, v, d, c, og); break;
      default: break;
    }
  }
}

}  // namespace attend_simd
}  // namespace
}  // namespace sparseinfer
