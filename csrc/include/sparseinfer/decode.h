// The math of a batch-1 decoder step between its linear calls (RMSNorm, rotary embedding, attention
// over the KV cache, SiLU gate, residual add), for the native decode step (bindings.cpp, Decoder;
// sparseinfer/lean_llama.py). Per step these are a few thousand flops each, where a torch op costs
// microseconds of dispatch: run from Python they took more of a SmolLM2 step than its kernels. Also
// attention over whole sequences (attend_rows, pack_keys_values: dispatch.cpp, run_attention), which
// shares the decode step's exp and vector types.
//
// One implementation, plain loops written so the compiler vectorizes them (fixed-width partial sums
// for the reductions, a branch-free exp), compiled in each ISA group with that group's flags:
// ref/decode_ref.cpp, x86/avx2/decode_avx2.cpp, x86/avx512/decode_avx512.cpp, arm/neon/decode_neon.cpp.
// The vector groups replace attend_part and attend_rows with attend_simd.h's (which use these loops for
// what they leave).
// The functions have internal linkage (an anonymous namespace) so that each group keeps its own copy.
// Float arithmetic, not transformers' bit for bit: the sums are ordered differently from ATen's.
#pragma once

#include <cstdint>
#include <cstring>

#include "sparseinfer/half.h"
#include "sparseinfer/kernels.h"

namespace sparseinfer {

// Keys per row of attend_rows' transposed keys: a multiple of this (every group's vector width).
constexpr int64_t kAttendPad = 16;

// g query rows of one head over the keys they see, normalised: out row i = sum_t p_it v_t / sum_t p_it,
// p_it = e^(s_it - max_t s_it), s_it = scale * (q_i . k_t), over the first nk[i] >= 1 keys.
struct AttendRows {
  const float* q = nullptr;   // query row i at q + i * q_stride, d floats
  int64_t q_stride = 0, g = 0;
  const float* kt = nullptr;  // the keys transposed, [d][np] (pack_keys_values); np a multiple of kAttendPad
  int64_t np = 0;
  const float* v = nullptr;   // the values, [n][d] (pack_keys_values)
  int64_t d = 0;
  const int64_t* nk = nullptr;  // [g], each <= np
  float scale = 1.0f;
  float* scores = nullptr;      // g * np floats of scratch
  float* out = nullptr;         // row i at out + i * out_stride
  int64_t out_stride = 0;
};

struct DecodeOps {
  // out[i] = w[i] * (x[i] / sqrt(mean(x^2) + eps)), i < n (transformers' LlamaRMSNorm)
  void (*rms_norm)(const float* x, const float* w, float eps, int64_t n, float* out);
  // Rotary embedding of `rows` rows of d values in place: x * cos + swap_halves(x) * sin, where sin
  // carries rotate_half's sign in its first half (lean_llama.py's tables)
  void (*rope)(float* x, int64_t rows, int64_t d, const float* cos, const float* sin);
  // Attention of the G query heads that share one KV head, over cache positions [t0, t1), not yet
  // normalised (the decoder splits a long context into parts over its threads: attend_merge joins
  // them): per head g, with s_t = scale * (q_g . k_t), m[g] = max s_t, l[g] = sum e^(s_t - m[g]) and
  // o[g] = sum e^(s_t - m[g]) v_t. q [G][d]; k, v: the KV head's rows of d floats (position t at t * d);
  // scores: G * (t1 - t0) floats of scratch; o [G][d].
  void (*attend_part)(const float* q, int64_t G, const float* k, const float* v, int64_t d, int64_t t0, int64_t t1,
                      float scale, float* scores, float* m, float* l, float* o);
  // The same over a half-precision cache: k, v as IEEE fp16 bits (each value widened exactly).
  void (*attend_part_f16)(const float* q, int64_t G, const uint16_t* k, const uint16_t* v, int64_t d, int64_t t0,
                          int64_t t1, float scale, float* scores, float* m, float* l, float* o);
  // Attention of a block of query rows over whole sequences (prefill, encoders: dispatch.cpp,
  // run_attention): AttendRows says what.
  void (*attend_rows)(const AttendRows& a);
  // The keys and values such a block sees, gathered: kt[e * np + t] = k[idx[t] * k_stride + e] (the keys
  // transposed; 0 for t in [n, np): read by whole vectors, never used) and vp[t * d + e] = v[idx[t] *
  // v_stride + e], for t < n, e < d. (Every group of rows reads every value row again: from a model's
  // q / k / v output they lie a whole token apart, a page each at BERT-base's sizes.)
  void (*pack_keys_values)(const float* k, int64_t k_stride, const float* v, int64_t v_stride, const int32_t* idx,
                           int64_t n, int64_t d, float* kt, int64_t np, float* vp);
  // out[i] = silu(gate[i]) * up[i]
  void (*silu_mul)(const float* gate, const float* up, int64_t n, float* out);
  // x[i] += y[i]
  void (*add)(float* x, const float* y, int64_t n);
  // y[r] = w[r, :k] . x + (bias ? bias[r] : 0) for rows r in [r0, r1) of the fp32 matrix w [rows, k]
  // (a dense layer, or the dense fallback's fp32 copy of a packed one)
  void (*gemv)(const float* w, int64_t k, const float* x, const float* bias, int64_t r0, int64_t r1, float* y);
};

DecodeOps decode_ops_scalar();
DecodeOps decode_ops_avx2();
DecodeOps decode_ops_avx512();
DecodeOps decode_ops_neon();
// The ops of `isa`'s group (dispatch.cpp), the scalar ones where that group was not built.
DecodeOps decode_ops(Isa isa);

namespace {
namespace decode_math {

constexpr int kLanes = 16;  // partial sums per reduction: one AVX-512 vector, two AVX2 / four NEON vectors

// The sum of the partial sums as a tree (halves added lane-wise): vector adds, where a running sum
// would be kLanes dependent scalar adds (~60 cycles per dot product of a 64-wide attention head).
inline float reduce(float* part) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

// A float operand, or a KV-cache value: fp32, or fp16 bits widened (exactly).
inline float kv_value(float x) { return x; }
inline float kv_value(uint16_t h) { return f16_to_f32(h); }

template <class T>
inline float tail_dot(const float* a, const T* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * kv_value(b[i]);
  return s;
}

template <class T>
inline float dot(const float* a, const T* b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[i + j] * kv_value(b[i + j]);
  return reduce(part) + tail_dot(a + i, b + i, n - i);
}

// e^x within ~2 ulp for x in [-80, 88.3] (clamped there), branch-free so that loops over it
// vectorize: x = r ln2 + f with r integral and |f| <= ln2 / 2, e^f by its Taylor polynomial to f^7.
// The floor keeps results normal: near -87.3 they were subnormal (e^-87.3 ~ 2^-126), and a softmax
// weight that small times a value is a subnormal product each time, microcode-assisted on x86 (scores
// spread over more than 87, as large attention logits make: 5x slower). e^-80 ~ 1.8e-35 stands for 0.
inline float exp_approx(float x) {
  x = x < -80.0f ? -80.0f : x;
  x = x > 88.3f ? 88.3f : x;
  const float round = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (|x log2 e| < 2^22)
  float r = x * 1.44269504088896341f + round;
  r -= round;
  float f = x - r * 0.693145751953125f;  // ln 2 split in two so that r * hi is exact
  f -= r * 1.42860682030941723e-06f;
  float p = 1.0f / 5040;
  p = p * f + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (int32_t(r) + 127) << 23;  // 2^r: r is in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  const float inv = 1.0f / __builtin_sqrtf(dot(x, x, n) / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

inline void rope(float* x, int64_t rows, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t r = 0; r < rows; ++r) {
    float* a = x + r * d;
    float* b = a + half;
    for (int64_t i = 0; i < half; ++i) {
      const float lo = a[i], hi = b[i];
      a[i] = lo * cos[i] + hi * sin[i];
      b[i] = hi * cos[half + i] + lo * sin[half + i];
    }
  }
}

// s[t] = e^(s[t] - top) in place, t < n; returns their sum.
inline float exp_shifted(float* s, int64_t n, float top) {
  float part[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      s[t + j] = exp_approx(s[t + j] - top);
      part[j] += s[t + j];
    }
  float sum = reduce(part);
  for (; t < n; ++t) {
    s[t] = exp_approx(s[t] - top);
    sum += s[t];
  }
  return sum;
}

template <class T>
inline void attend_part(const float* q, int64_t G, const T* k, const T* v, int64_t d, int64_t t0, int64_t t1,
                        float scale, float* scores, float* m, float* l, float* o) {
  const int64_t n = t1 - t0;
  k += t0 * d, v += t0 * d;
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * n;
    float top = -3.0e38f;
    for (int64_t t = 0; t < n; ++t) {
      s[t] = dot(q + g * d, k + t * d, d) * scale;
      top = s[t] > top ? s[t] : top;
    }
    m[g] = top;
    l[g] = exp_shifted(s, n, top);
    for (int64_t i = 0; i < d; ++i) o[g * d + i] = 0.0f;
  }
  for (int64_t t = 0; t < n; ++t)  // each value row read once for the G heads
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * n + t];
      for (int64_t i = 0; i < d; ++i) o[g * d + i] += p * kv_value(v[t * d + i]);
    }
}

// One head's attention from its n parts (attend_part's m, l at [p * stride], o at [p * stride * d]):
// out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p, M = max_p m_p (one part: o_0 / l_0).
inline void attend_merge(const float* m, const float* l, const float* o, int64_t n, int64_t stride, int64_t d,
                         float* out) {
  float top = m[0];
  for (int64_t p = 1; p < n; ++p) top = m[p * stride] > top ? m[p * stride] : top;
  float sum = 0.0f;
  for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
  for (int64_t p = 0; p < n; ++p) {
    const float w = exp_approx(m[p * stride] - top);
    sum += w * l[p * stride];
    for (int64_t i = 0; i < d; ++i) out[i] += w * o[p * stride * d + i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

// DecodeOps::attend_rows in plain loops: scores key-wise (the loop over t vectorizes), then
// exp_shifted, then the values.
inline void attend_rows(const AttendRows& a) {
  const int64_t d = a.d;
  for (int64_t i = 0; i < a.g; ++i) {
    const int64_t n = a.nk[i];
    const float* q = a.q + i * a.q_stride;
    float* s = a.scores + i * a.np;
    for (int64_t t = 0; t < n; ++t) s[t] = 0.0f;
    for (int64_t e = 0; e < d; ++e) {
      const float qe = q[e];
      const float* ke = a.kt + e * a.np;
      for (int64_t t = 0; t < n; ++t) s[t] += qe * ke[t];
    }
    float top = -3.0e38f;
    for (int64_t t = 0; t < n; ++t) {
      s[t] *= a.scale;
      top = s[t] > top ? s[t] : top;
    }
    const float inv = 1.0f / exp_shifted(s, n, top);
    float* y = a.out + i * a.out_stride;
    for (int64_t e = 0; e < d; ++e) y[e] = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = a.v + t * d;
      for (int64_t e = 0; e < d; ++e) y[e] += s[t] * vt[e];
    }
    for (int64_t e = 0; e < d; ++e) y[e] *= inv;
  }
}

inline void pack_keys_values(const float* k, int64_t k_stride, const float* v, int64_t v_stride, const int32_t* idx,
                             int64_t n, int64_t d, float* kt, int64_t np, float* vp) {
  for (int64_t e = 0; e < d; ++e) {  // t innermost: contiguous stores
    float* row = kt + e * np;
    for (int64_t t = 0; t < n; ++t) row[t] = k[idx[t] * k_stride + e];
    for (int64_t t = n; t < np; ++t) row[t] = 0.0f;
  }
  for (int64_t t = 0; t < n; ++t) {
    const float* src = v + idx[t] * v_stride;
    for (int64_t e = 0; e < d; ++e) vp[t * d + e] = src[e];
  }
}

inline void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + exp_approx(-gate[i])) * up[i];
}

inline void add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

inline void gemv(const float* w, int64_t k, const float* x, const float* bias, int64_t r0, int64_t r1, float* y) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {  // four rows share each load of x
    const float* w0 = w + r * k;
    const float *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    float p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= k; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float xv = x[i + j];
        p0[j] += w0[i + j] * xv;
        p1[j] += w1[i + j] * xv;
        p2[j] += w2[i + j] * xv;
        p3[j] += w3[i + j] * xv;
      }
    y[r] = reduce(p0) + tail_dot(w0 + i, x + i, k - i);
    y[r + 1] = reduce(p1) + tail_dot(w1 + i, x + i, k - i);
    y[r + 2] = reduce(p2) + tail_dot(w2 + i, x + i, k - i);
    y[r + 3] = reduce(p3) + tail_dot(w3 + i, x + i, k - i);
  }
  for (; r < r1; ++r) y[r] = dot(w + r * k, x, k);
  if (bias)
    for (r = r0; r < r1; ++r) y[r] += bias[r];
}

inline DecodeOps ops() {
  return DecodeOps{rms_norm, rope, attend_part<float>, attend_part<uint16_t>, attend_rows, pack_keys_values, silu_mul,
                   add, gemv};
}

}  // namespace decode_math
}  // namespace

}  // namespace sparseinfer
