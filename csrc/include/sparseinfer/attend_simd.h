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
  x = Simd::min(Simd::max(x, Simd::set1(-80.0f)), Simd::set1(88.3f));  // (the floor: exp_approx's)
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

// DecodeOps::attend_rows in vectors (attend_rows, at the end): kRows query rows at a time, their
// scores W keys per vector (each load of transposed keys serves every row), e^(s - max) in lanes, then
// each value row read once for the rows of the group, their accumulators in registers. Register tiles:
// kRows rows x up to kTile vectors (the decode step's value tile: kHeads vectors, 4 x 4 in 32 registers,
// 4 x 2 in AVX2's 16: with 4 x 4 there the compiler reloaded each key vector for every row).
constexpr int kRows = 4;
constexpr int kTile = Simd::kHeads;

// Scores of GS rows over keys [t, t + NB * W): a GS x NB register tile, per head element one load
// of each key vector and one broadcast per row.
template <int GS, int NB>
inline void scores_tile(const float* q, int64_t qs, int64_t d, const float* kt, int64_t np, int64_t t, float scale,
                        float* s) {
  V acc[GS][NB];
  for (int r = 0; r < GS; ++r)
    for (int u = 0; u < NB; ++u) acc[r][u] = Simd::zero();
  for (int64_t e = 0; e < d; ++e) {
    V kv[NB];
    for (int u = 0; u < NB; ++u) kv[u] = Simd::load(kt + e * np + t + u * W);
    for (int r = 0; r < GS; ++r) {
      const V qr = Simd::set1(q[r * qs + e]);
      for (int u = 0; u < NB; ++u) acc[r][u] = Simd::fmadd(qr, kv[u], acc[r][u]);
    }
  }
  const V sc = Simd::set1(scale);
  for (int r = 0; r < GS; ++r)
    for (int u = 0; u < NB; ++u) Simd::store(s + r * np + t + u * W, Simd::mul(acc[r][u], sc));
}

template <int GS>
inline void scores_rows(const float* q, int64_t qs, int64_t d, const float* kt, int64_t np, int64_t keys, float scale,
                        float* s) {
  int64_t t = 0;
  for (; t + kTile * W <= keys; t += kTile * W) scores_tile<GS, kTile>(q, qs, d, kt, np, t, scale, s);
  switch ((keys - t) / W) {  // fewer than kTile vectors left
    case 3: scores_tile<GS, 3>(q, qs, d, kt, np, t, scale, s); break;
    case 2: scores_tile<GS, 2>(q, qs, d, kt, np, t, scale, s); break;
    case 1: scores_tile<GS, 1>(q, qs, d, kt, np, t, scale, s); break;
    default: break;
  }
}

// out rows [GS] columns [c, c + NV * W) = sum over keys t < keys of p[r][t] v_t, times inv[r]
template <int GS, int NV>
inline void values_rows(const AttendRows& a, const float* p, int64_t keys, int64_t c, const float* inv, float* out) {
  const int64_t np = a.np;
  V acc[GS][NV];
  for (int r = 0; r < GS; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = Simd::zero();
  for (int64_t t = 0; t < keys; ++t) {
    V row[NV];
    const float* vt = a.v + t * a.d + c;
    for (int u = 0; u < NV; ++u) row[u] = Simd::load(vt + u * W);
    for (int r = 0; r < GS; ++r) {
      const V pr = Simd::set1(p[r * np + t]);
      for (int u = 0; u < NV; ++u) acc[r][u] = Simd::fmadd(pr, row[u], acc[r][u]);
    }
  }
  for (int r = 0; r < GS; ++r)
    for (int u = 0; u < NV; ++u) Simd::store(out + r * a.out_stride + c + u * W, Simd::mul(acc[r][u], Simd::set1(inv[r])));
}

// Rows [i, i + GS) of a.
template <int GS>
inline void attend_group(const AttendRows& a, int64_t i) {
  const int64_t np = a.np, d = a.d;
  const int64_t* nk = a.nk + i;
  float* scores = a.scores;
  float* out = a.out + i * a.out_stride;
  int64_t keys = 0;  // the most any row of the group sees
  for (int r = 0; r < GS; ++r) keys = nk[r] > keys ? nk[r] : keys;
  const int64_t span = (keys + W - 1) / W * W;  // <= np: np is a multiple of kAttendPad, itself of W
  scores_rows<GS>(a.q + i * a.q_stride, a.q_stride, d, a.kt, np, span, a.scale, scores);
  // The rows' softmax steps interleaved (independent chains: one row's took ~40 cycles of latency
  // per vector). A block that runs past a row's keys is clipped in its lanes (kClip, kKeep windows):
  // scalar loops over the tail put a dependent max and add per key on the path (~100 cycles a row
  // at 46 keys), and scalar stores before a vector load stall its store forwarding.
  alignas(64) static const float kClip[32] = {
      3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f,  // min(x, 3e38): x
      3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f, 3.0e38f,
      -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f,  // -3e38: hidden
      -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f, -3.0e38f};
  alignas(64) static const float kKeep[32] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                              0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  // lanes [0, m) shown, m = keys left in the row from t (0 .. W <= 16): the windows at 16 - m
  const auto shown = [&](int r, int64_t t) {
    const int64_t m = nk[r] - t;
    return m >= W ? W : m < 0 ? 0 : m;
  };
  V top[GS], sum[GS];
  for (int r = 0; r < GS; ++r) top[r] = Simd::set1(-3.0e38f), sum[r] = Simd::zero();
  for (int64_t t = 0; t < span; t += W)
    for (int r = 0; r < GS; ++r) {
      V x = Simd::load(scores + r * np + t);
      const int64_t m = shown(r, t);
      if (m < W) x = Simd::min(x, Simd::load(kClip + 16 - m));
      top[r] = Simd::max(top[r], x);
    }
  V shift[GS];
  for (int r = 0; r < GS; ++r) shift[r] = Simd::set1(Simd::hmax(top[r]));
  for (int64_t t = 0; t < span; t += W)
    for (int r = 0; r < GS; ++r) {
      float* s = scores + r * np + t;
      V e = exp_lanes(Simd::sub(Simd::load(s), shift[r]));
      const int64_t m = shown(r, t);
      if (m < W) e = Simd::mul(e, Simd::load(kKeep + 16 - m));  // exactly 0 past the keys
      Simd::store(s, e);
      sum[r] = Simd::add(sum[r], e);
    }
  float inv[GS];
  for (int r = 0; r < GS; ++r) inv[r] = 1.0f / Simd::hsum(sum[r]);
  int64_t c = 0;
  for (; c + kTile * W <= d; c += kTile * W) values_rows<GS, kTile>(a, scores, keys, c, inv, out);
  switch ((d - c) / W) {  // fewer than kTile vectors left
    case 3: values_rows<GS, 3>(a, scores, keys, c, inv, out); break;
    case 2: values_rows<GS, 2>(a, scores, keys, c, inv, out); break;
    case 1: values_rows<GS, 1>(a, scores, keys, c, inv, out); break;
    default: break;
  }
}

inline void attend_rows(const AttendRows& a) {
  if (a.d % W) return decode_math::attend_rows(a);
  int64_t i = 0;
  for (; i + kRows <= a.g; i += kRows) attend_group<kRows>(a, i);
  for (; i < a.g; ++i) attend_group<1>(a, i);
}

}  // namespace attend_simd
}  // namespace
}  // namespace sparseinfer
