// Small helpers shared by kernels of every ISA group: the output epilogue, a grow-only
// thread-local scratch buffer, the N:M index bit reader, scalar value loads. ISA-free.
//
// Everything here has internal linkage (anonymous namespace) and uses no std:: templates, on
// purpose: the same inline function compiled once with -mavx512f and once without is an ODR
// violation, and the linker may keep the AVX-512 copy for every caller (SIGILL on older CPUs).
// The same rule holds for code in x86/ and arm/ files: see csrc/README.md.
#pragma once

#include <cstdint>
#include <cstdlib>
#if defined(_WIN32)
#include <malloc.h>
#endif

#include "sparseinfer/half.h"
#include "sparseinfer/kernels.h"

namespace sparseinfer {
namespace {

// y[m, n] = acc (+ bias[n]), rounded once to the output dtype.
inline void store_output(const GemmArgs& a, int64_t m, int64_t n, float acc) {
  if (a.bias) acc += a.bias[n];
  const int64_t i = m * a.stride_ym + n;
  switch (a.y_dtype) {
    case DType::f32: static_cast<float*>(a.y)[i] = acc; break;
    case DType::bf16: static_cast<uint16_t*>(a.y)[i] = f32_to_bf16(acc); break;
    default: static_cast<uint16_t*>(a.y)[i] = f32_to_f16(acc); break;
  }
}

// Per-thread scratch that only grows: kernels dequantize a weight row into it. Allocation
// happens on the first call with a given size per thread, never in steady state. `slot`
// separates buffers that are live at the same time (each translation unit has its own).
// 64-byte aligned; nullptr when out of memory (the kernel then returns Status::out_of_memory).
struct ScratchBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  ~ScratchBuffer() { release(); }
  void release() {
#if defined(_WIN32)
    _aligned_free(p);
#else
    std::free(p);
#endif
    p = nullptr, bytes = 0;
  }
};

template <class T, int slot = 0>
inline T* scratch(size_t count) {
  thread_local ScratchBuffer buf;
  const size_t need = (count * sizeof(T) + 64) / 64 * 64;  // never 0: a valid pointer even for count 0
  if (buf.bytes < need) {
    buf.release();
#if defined(_WIN32)
    buf.p = _aligned_malloc(need, 64);
#else
    buf.p = std::aligned_alloc(64, need);
#endif
    if (buf.p) buf.bytes = need;
  }
  return static_cast<T*>(buf.p);
}

// Reads consecutive `bits`-wide fields (bits <= 32) from a little-endian bit stream, one byte at a
// time, so it never reads past the last byte that holds a requested bit.
struct BitReader {
  const uint8_t* p;
  uint64_t buf = 0;
  int have = 0;
  explicit BitReader(const uint8_t* bytes) : p(bytes) {}
  uint32_t get(int bits) {
    while (have < bits) {
      buf |= uint64_t(*p++) << have;
      have += 8;
    }
    const uint32_t v = uint32_t(buf & ((uint64_t(1) << bits) - 1));
    buf >>= bits;
    have -= bits;
    return v;
  }
};

// Element j of a float value array of kind f32 / bf16 / f16, widened to fp32.
inline float load_float_value(const void* base, ValueKind kind, int64_t j) {
  switch (kind) {
    case ValueKind::f32: return static_cast<const float*>(base)[j];
    case ValueKind::bf16: return bf16_to_f32(static_cast<const uint16_t*>(base)[j]);
    default: return f16_to_f32(static_cast<const uint16_t*>(base)[j]);
  }
}

// Dequantized element j of row `row` of an int8 / int4 QuantView: exactly what the Python
// to_dense() computes, code * scale or (code - zero) * scale in fp32.
inline float dequant_int8(const QuantView& q, int64_t row, int64_t j) {
  const int8_t* codes = static_cast<const int8_t*>(q.codes) + row * q.kp;
  return float(codes[j]) * q.scale[row * q.n_groups + j / q.group];
}
inline int int4_code(const QuantView& q, int64_t row, int64_t j) {
  const uint8_t* bytes = static_cast<const uint8_t*>(q.codes) + row * (q.kp / 2);
  return (bytes[j >> 1] >> ((j & 1) * 4)) & 0xF;
}
inline float dequant_int4(const QuantView& q, int64_t row, int64_t j) {
  const int64_t g = row * q.n_groups + j / q.group;
  const int zero = q.zero ? q.zero[g] : 8;
  return float(int4_code(q, row, j) - zero) * q.scale[g];
}

}  // namespace
}  // namespace sparseinfer
