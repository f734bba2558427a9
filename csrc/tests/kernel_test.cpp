// kernel_test: runs the CPU kernels -- without Python or torch -- against reference vectors written
// by csrc/tests/refvectors.py (sparseinfer.pack + backends.reference_linear), so a cross-compiled
// build can be checked under qemu against exactly the numbers the Python tests use.
//
//   kernel_test VECTORS [--isa NAME]... [--only PREFIX] [--threads T] [--verbose]
//                                          run every case (or those whose name starts with PREFIX)
//   kernel_test --features                                          print what dispatch detected
//
// Built from dispatch.cpp, threadpool.cpp and the kernel groups (csrc/tests/build.py); it calls
// the same entry points as the Python binding (run_linear, select_kernel), so dispatch, HWCAP /
// CPUID detection, activation conversion and the thread split are under test too.
//
// Per case (one packed weight, one call) and ISA it checks:
//   1. run_linear with y poisoned (NaN bit patterns), y rows padded (stride N + 2), and, for fp32 x on
//      half the calls, x rows padded with NaN (stride K + 3): every output written and finite, no
//      element of y's padding touched, x never read past K (NaN would reach y), and every element
//      within the accumulation bound below;
//   2. the selected kernel called directly on columns [1, N-1) (N >= 3), fp32: columns 0 and N-1 keep
//      their poison (a kernel writes only its column range: threads share y), the rest as above;
//   3. int8 / int4 weights, and 2:4 + int8 / int4 where the layout has dense row tiles, int8 activations
//      (ActMode::int8, on the layouts bindings.cpp builds for them): written and untouched as in 1, bit for
//      bit the scalar row-tile kernel's result (the contract of ref/qtile_ref.cpp), and within the
//      activation-quantization bound below of the reference.
//
// Also run_stages' ordering (run_stage_checks), the native decode step's attention on every ISA
// (run_attend_checks: decode.h attend_part over fp32 and fp16 caches, and attend_merge), attention over
// whole sequences (run_attend_rows_checks: attend_rows and pack_keys_values, then run_attention), and the
// SIMD activation quantizer against the scalar one on adversarial segments (run_quantizer_checks).
//
// Output, one line each: "FEATURES ...", "ISAS ...", "PASS|FAIL <case> isa=.. kernel=.. ...", and
// "SUMMARY pass=P fail=F". Exit status: 0 all passed, 1 a case failed, 2 bad usage or vector file.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "sparseinfer/decode.h"
#include "sparseinfer/dispatch.h"
#include "sparseinfer/kernel_utils.h"
#include "sparseinfer/threadpool.h"

using namespace sparseinfer;

namespace {

// -- tolerance: an accumulation bound per element (XNNPACK's compute_sum_tolerance) ---------------
// Kernel and reference both compute y = sum_k x_k w_k + bias in fp32 from the same fp32 products
// (weights dequantized exactly as to_dense() does), in different orders. Each side's error is at most
// (K + 2) * 2^-24 * mag, mag = sum_k |x_k w_k| + |bias| (K - 1 additions, one product rounding, the
// group scaling and the bias addition), so |out - ref| <= 2 (K + 3) 2^-24 mag. With bf16 / fp16 x
// both sides then round once to x's dtype: at most one more ulp of the larger value, 2^-7 (bf16) or
// 2^-10 (fp16) relative, plus fp16's smallest subnormal step. A dropped or wrong term is ~mag / K,
// far above 2 (K + 3) 2^-24 mag for every K tested, so the bound catches it. (A normwise bound would
// not do: with N = M = 1 the single output may cancel to far below its terms.)
// int8 activations add, per output, at most (max_k |x[m, k]| / 254) * sum_k |W[n, k]| * (1 + 2^-12):
// each x is replaced by q * sx, sx = amax_s / 127, with |q - x * 127 / amax_s| <= 1/2 (amax_s <= the
// row's max |x|); the fp32 roundings of 127 / amax_s, x * inv and amax_s / 127 add at most
// 762 * 2^-24 < 2^-14 of that, and 2^-12 leaves room. (A worst case: with K = 3 the few rounding
// errors can all align, and err / bound approaches 1.)
constexpr double kEpsF32 = 1.0 / 16777216.0;  // 2^-24

double bound(double mag, int64_t K, DType d, double out, double ref) {
  double b = 2.0 * double(K + 3) * kEpsF32 * mag;
  const double big = std::fabs(out) > std::fabs(ref) ? std::fabs(out) : std::fabs(ref);
  if (d == DType::bf16) b += big / 128.0;
  if (d == DType::f16) b += big / 1024.0 + 1.0 / 16777216.0;
  return b;
}

// -- the vector file ----------------------------------------------------------------------------------
// Little-endian. "SIREFV01", u32 record count, then per record: str name; u32 count + (str key, i64)
// ints; u32 count + (str key, u32 dtype (DType), u32 ndim, i64 dims[ndim], u64 nbytes, bytes) tensors.
// str = u32 length + bytes. One record = one packed weight and one call on it.

struct Tensor {
  DType dtype = DType::unknown;
  std::vector<int64_t> shape;
  std::vector<uint8_t> storage;  // exactly nbytes (so ASan sees any overread); new[] aligns to 16
  size_t nbytes = 0;
  const void* data() const { return storage.data(); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

struct Record {
  std::string name;
  std::map<std::string, int64_t> ints;
  std::map<std::string, Tensor> tensors;
  int64_t get(const std::string& key) const {
    auto it = ints.find(key);
    if (it == ints.end()) {
      std::fprintf(stderr, "kernel_test: %s: missing int '%s'\n", name.c_str(), key.c_str());
      std::exit(2);
    }
    return it->second;
  }
  const Tensor* find(const std::string& key) const {
    auto it = tensors.find(key);
    return it == tensors.end() ? nullptr : &it->second;
  }
  const Tensor& tensor(const std::string& key) const {
    const Tensor* t = find(key);
    if (!t) {
      std::fprintf(stderr, "kernel_test: %s: missing tensor '%s'\n", name.c_str(), key.c_str());
      std::exit(2);
    }
    return *t;
  }
};

struct Reader {
  FILE* f;
  const char* path;
  void read(void* p, size_t n) {
    if (n && std::fread(p, 1, n, f) != n) {
      std::fprintf(stderr, "kernel_test: %s: truncated file\n", path);
      std::exit(2);
    }
  }
  uint32_t u32() { uint32_t v; read(&v, 4); return v; }
  uint64_t u64() { uint64_t v; read(&v, 8); return v; }
  std::string str() {
    const uint32_t n = u32();
    if (n > (1u << 20)) { std::fprintf(stderr, "kernel_test: %s: corrupt string\n", path); std::exit(2); }
    std::string s(n, '\0');
    read(&s[0], n);
    return s;
  }
};

std::vector<Record> load_vectors(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::fprintf(stderr, "kernel_test: cannot open %s\n", path); std::exit(2); }
  Reader r{f, path};
  char magic[8];
  r.read(magic, 8);
  if (std::memcmp(magic, "SIREFV01", 8) != 0) { std::fprintf(stderr, "kernel_test: %s: bad magic\n", path); std::exit(2); }
  std::vector<Record> out(r.u32());
  for (Record& rec : out) {
    rec.name = r.str();
    for (uint32_t i = 0, n = r.u32(); i < n; ++i) {
      std::string key = r.str();
      rec.ints[key] = int64_t(r.u64());
    }
    for (uint32_t i = 0, n = r.u32(); i < n; ++i) {
      std::string key = r.str();
      Tensor t;
      t.dtype = DType(r.u32());
      t.shape.resize(r.u32());
      for (int64_t& d : t.shape) d = int64_t(r.u64());
      t.nbytes = r.u64();
      if (t.nbytes != size_t(t.numel()) * dtype_size(t.dtype)) {
        std::fprintf(stderr, "kernel_test: %s: tensor %s has %zu bytes for its shape\n", rec.name.c_str(), key.c_str(), t.nbytes);
        std::exit(2);
      }
      t.storage.resize(t.nbytes);
      r.read(t.storage.data(), t.nbytes);
      rec.tensors[key] = std::move(t);
    }
  }
  std::fclose(f);
  return out;
}

// -- the WeightView, built the way bindings.cpp's pack_* build it -------------------------------------

ValueKind value_kind(DType d) {
  switch (d) {
    case DType::bf16: return ValueKind::bf16;
    case DType::f16: return ValueKind::f16;
    case DType::i8: return ValueKind::i8;
    default: return ValueKind::f32;
  }
}

QuantView quant_view(const Record& r, const std::string& prefix, bool int4) {
  QuantView q;
  const Tensor& qw = r.tensor(prefix + "qweight");
  const Tensor& scale = r.tensor(prefix + "scale");
  q.codes = qw.data();
  q.scale = static_cast<const float*>(scale.data());
  if (const Tensor* z = r.find(prefix + "zero")) q.zero = static_cast<const uint8_t*>(z->data());
  q.kp = qw.shape[1] * (int4 ? 2 : 1);
  q.n_groups = scale.shape[1];
  q.group = q.kp / q.n_groups;
  return q;
}

WeightView weight_view(const Record& r) {
  WeightView w;
  w.id = KernelId(r.get("kind"));
  w.N = r.get("N"), w.K = r.get("K");
  switch (w.id) {
    case KernelId::int8: w.q = quant_view(r, "", false); break;
    case KernelId::int4: w.q = quant_view(r, "", true); break;
    case KernelId::nm_float: case KernelId::nm_int8: case KernelId::nm_int4: {
      NMView& v = w.nm;
      v.n = int32_t(r.get("n")), v.m = int32_t(r.get("m"));
      v.bits = 1;
      while ((int64_t(1) << v.bits) < v.m) ++v.bits;
      v.kc = (w.K + v.m - 1) / v.m * v.n;
      const Tensor& meta = r.tensor("meta");
      v.meta = static_cast<const uint8_t*>(meta.data()), v.meta_stride = meta.shape[1];
      if (w.id == KernelId::nm_float) {
        const Tensor& vals = r.tensor("values");
        v.values = value_kind(vals.dtype), v.fvalues = vals.data();
      } else {
        w.q = quant_view(r, "values.", w.id == KernelId::nm_int4);
        v.values = w.id == KernelId::nm_int8 ? ValueKind::i8 : ValueKind::i4;
      }
      break;
    }
    case KernelId::csr_float: case KernelId::csr_int8: {
      CSRView& c = w.csr;
      const Tensor& vals = r.tensor("values");
      c.crow = static_cast<const int64_t*>(r.tensor("crow").data());
      c.col = static_cast<const int32_t*>(r.tensor("col").data());
      c.values = vals.data(), c.kind = value_kind(vals.dtype), c.nnz = vals.numel();
      if (const Tensor* s = r.find("scale")) c.scale = static_cast<const float*>(s->data());
      break;
    }
    default:
      std::fprintf(stderr, "kernel_test: %s: unknown kernel id %d\n", r.name.c_str(), int(w.id));
      std::exit(2);
  }
  return w;
}

// -- poisoned buffers -------------------------------------------------------------------------------

// Quiet NaN patterns with a payload no arithmetic produces, so "untouched" is a bit comparison.
constexpr uint32_t kPoisonF32 = 0x7fc0dead;
constexpr uint16_t kPoisonHalf16 = 0x7e5a;   // f16 quiet NaN with payload
constexpr uint16_t kPoisonBf16 = 0x7fda;     // bf16 quiet NaN with payload

// [rows, stride] elements of `dtype`, every element poisoned; exactly that many bytes, so that under
// AddressSanitizer a kernel reading or writing past the last row is caught.
struct Buffer {
  DType dtype;
  int64_t rows, stride;
  std::vector<uint8_t> bytes;  // new[] aligns to 16
  Buffer(DType d, int64_t r, int64_t s) : dtype(d), rows(r), stride(s), bytes(size_t(r * s) * dtype_size(d)) {
    for (int64_t i = 0; i < r * s; ++i) set_poison(i);
  }
  void* data() { return bytes.data(); }
  void set_poison(int64_t i) {
    if (dtype == DType::f32) reinterpret_cast<uint32_t*>(bytes.data())[i] = kPoisonF32;
    else reinterpret_cast<uint16_t*>(bytes.data())[i] = dtype == DType::bf16 ? kPoisonBf16 : kPoisonHalf16;
  }
  bool is_poison(int64_t i) const {
    if (dtype == DType::f32) return reinterpret_cast<const uint32_t*>(bytes.data())[i] == kPoisonF32;
    const uint16_t v = reinterpret_cast<const uint16_t*>(bytes.data())[i];
    return v == (dtype == DType::bf16 ? kPoisonBf16 : kPoisonHalf16);
  }
  double at(int64_t i) const {
    if (dtype == DType::f32) return reinterpret_cast<const float*>(bytes.data())[i];
    const uint16_t v = reinterpret_cast<const uint16_t*>(bytes.data())[i];
    return dtype == DType::bf16 ? bf16_to_f32(v) : f16_to_f32(v);
  }
};

double element(const Tensor& t, int64_t i) {
  switch (t.dtype) {
    case DType::f32: return static_cast<const float*>(t.data())[i];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(t.data())[i]);
    case DType::f16: return f16_to_f32(static_cast<const uint16_t*>(t.data())[i]);
    default: return NAN;
  }
}

// Compares y [M, N] (row stride y.stride) columns [c0, c1) with ref, element by element; "" when all
// is well. `extra` (optional, [M, N]) widens the bound per element; `exact` (optional, same layout
// as y) must match y bit for bit. *worst: the largest |out - ref| / bound seen (<= 1 passes).
std::string compare(const Buffer& y, const Tensor& ref, const Tensor& mag, DType x_dtype, int64_t M, int64_t N,
                    int64_t K, int64_t c0, int64_t c1, double* worst, const std::vector<double>* extra = nullptr,
                    const Buffer* exact = nullptr) {
  char msg[256];
  *worst = 0;
  const size_t esz = dtype_size(y.dtype);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < y.stride; ++n) {
      const int64_t i = m * y.stride + n;
      if (n < c0 || n >= c1) {
        if (!y.is_poison(i)) {
          std::snprintf(msg, sizeof msg, "wrote y[%lld, %lld] outside columns [%lld, %lld) (padding or another range)",
                        (long long)m, (long long)n, (long long)c0, (long long)c1);
          return msg;
        }
        continue;
      }
      const double out = y.at(i), r = element(ref, m * N + n);
      if (y.is_poison(i) || !std::isfinite(out)) {
        std::snprintf(msg, sizeof msg, "y[%lld, %lld] = %g not written or not finite (reference %g)", (long long)m,
                      (long long)n, out, r);
        return msg;
      }
      if (exact && std::memcmp(y.bytes.data() + i * esz, exact->bytes.data() + i * esz, esz) != 0) {
        std::snprintf(msg, sizeof msg, "y[%lld, %lld] = %.9g differs from the scalar kernel's %.9g (bit-exact expected)",
                      (long long)m, (long long)n, out, exact->at(i));
        return msg;
      }
      const double b = bound(element(mag, m * N + n), K, x_dtype, out, r) + (extra ? (*extra)[m * N + n] : 0.0);
      const double ratio = std::fabs(out - r) / (b > 0 ? b : 1e-300);
      if (ratio > *worst) *worst = ratio;
      if (!(std::fabs(out - r) <= b)) {
        std::snprintf(msg, sizeof msg, "y[%lld, %lld] = %.9g, reference %.9g: |diff| %.3g > bound %.3g", (long long)m,
                      (long long)n, out, r, std::fabs(out - r), b);
        return msg;
      }
    }
  return "";
}

// The int8-activation layouts of a weight, as bindings.cpp's ensure_qtiles builds them on a first call:
// row tiles of int8 / int4; for 2:4 + int8 / int4 the dense row tiles (where the layout has them), their
// compact steps (2:4 + int8) and the reordered N:M codes, so that every row of the table can run.
// False when the weight has none (N:M without tiles: its int8-activation calls are not checked here).
struct QTiles {
  std::vector<void*> bufs;
  QTiles() = default;
  QTiles(const QTiles&) = delete;
  QTiles& operator=(const QTiles&) = delete;
  ~QTiles() {
    for (void* b : bufs) std::free(b);
  }
  void* alloc(size_t bytes) {
    void* b = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (b) bufs.push_back(b);
    return b;
  }
  bool build(WeightView& w) {
    if (w.id == KernelId::int8 || w.id == KernelId::int4) {
      const int bits = w.id == KernelId::int8 ? 8 : 4;
      void* buf = alloc(qtile_bytes(w.q, w.N, bits));
      if (buf) w.qt = build_qtiles(w.q, w.N, bits, buf);
      return buf != nullptr;
    }
    if ((w.id != KernelId::nm_int8 && w.id != KernelId::nm_int4) || !nm_qtiles_supported(w)) return false;
    void* tiles = alloc(nm_qtile_bytes(w));
    void* q8 = alloc(nm_q8_prepack_bytes(w));
    if (!tiles || !q8) return false;
    w.qt = build_nm_qtiles(w, tiles);
    w.nm.q8 = nm_q8_prepack(w, q8);
    if (w.id == KernelId::nm_int8) {
      void* compact = alloc(qtile_compact_bytes(w.qt));
      if (!compact || !build_qtile_compact(w.qt, compact)) return false;
    }
    return w.qt.codes != nullptr && w.nm.q8.codes != nullptr;
  }
};

struct Counts { int pass = 0, fail = 0; };

void report(Counts& counts, bool ok, bool verbose, const std::string& line) {
  ok ? ++counts.pass : ++counts.fail;
  if (!ok || verbose) std::printf("%s %s\n", ok ? "PASS" : "FAIL", line.c_str());
}

// One record on one ISA: both checks of the header comment.
void run_case(const Record& r, Isa isa, int threads, bool pad_x, bool verbose, Counts& counts) {
  const WeightView w = weight_view(r);
  const Tensor& x = r.tensor("x");
  const Tensor& ref = r.tensor("y");
  const Tensor& mag = r.tensor("y_mag");
  const Tensor* bias = r.find("bias");
  const int64_t M = x.shape[0], K = w.K, N = w.N;
  const KernelImpl* k = select_kernel(w.id, isa, M);
  char head[384];
  std::snprintf(head, sizeof head, "%s isa=%s kernel=%s M=%lld N=%lld K=%lld x=%s bias=%s threads=%d", r.name.c_str(),
                isa_name(isa), k ? k->name : "none", (long long)M, (long long)N, (long long)K, dtype_name(x.dtype),
                bias ? dtype_name(bias->dtype) : "none", threads);
  if (!k) return report(counts, false, verbose, std::string(head) + ": no kernel selected");

  // x, with NaN-poisoned padding between rows for fp32 x when asked (K + 3 elements per row).
  const int64_t xs = pad_x && x.dtype == DType::f32 ? K + 3 : K;
  Buffer xb(x.dtype, M, xs);
  const size_t esz = dtype_size(x.dtype);
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(static_cast<char*>(xb.data()) + m * xs * esz, static_cast<const char*>(x.data()) + m * K * esz, K * esz);

  // 1. the full call, through the driver.
  Buffer y(x.dtype, M, N + 2);
  LinearCall call{xb.data(), x.dtype, xs, bias ? bias->data() : nullptr, bias ? bias->dtype : DType::f32,
                  y.data(), N + 2, M};
  const KernelImpl* ran = nullptr;
  const Status s = run_linear(call, w, isa, threads, &ran);
  double err = 0;
  std::string bad = s != Status::ok ? std::string("status: ") + status_message(s)
                                    : compare(y, ref, mag, x.dtype, M, N, K, 0, N, &err);
  if (bad.empty() && ran != k) bad = "run_linear ran another kernel";
  char tail[64];
  std::snprintf(tail, sizeof tail, " x_stride=%lld err/bound=%.2f", (long long)xs, err);
  report(counts, bad.empty(), verbose, std::string(head) + tail + (bad.empty() ? "" : ": " + bad));

  // 2. the kernel alone on the inner columns, fp32 in and out.
  if (N < 3) return;
  std::vector<float> xf(size_t(M * xs), NAN);
  std::vector<float> bf(static_cast<size_t>(N));
  convert_to_f32_scalar(xb.data(), x.dtype, M, xs, xs, xf.data());
  if (bias) convert_to_f32_scalar(bias->data(), bias->dtype, 1, N, N, bf.data());
  Buffer yf(DType::f32, M, N);
  GemmArgs a;
  a.M = M, a.N = N, a.K = K, a.x = xf.data(), a.stride_xm = xs, a.bias = bias ? bf.data() : nullptr;
  a.y = yf.data(), a.y_dtype = DType::f32, a.stride_ym = N;
  const Status s2 = k->fn(a, w, 1, N - 1);
  // The reference is in x's dtype: for bf16 / f16 x the bound allows for its rounding.
  bad = s2 != Status::ok ? std::string("status: ") + status_message(s2)
                         : compare(yf, ref, mag, x.dtype, M, N, K, 1, N - 1, &err);
  std::snprintf(tail, sizeof tail, " columns=[1,%lld) err/bound=%.2f", (long long)(N - 1), err);
  report(counts, bad.empty(), verbose, std::string(head) + tail + (bad.empty() ? "" : ": " + bad));
}

// Check 3: int8 activations on `isa`, against the scalar int8-activation kernel and the reference.
void run_int8_act_case(const Record& r, Isa isa, int threads, bool pad_x, bool verbose, Counts& counts) {
  WeightView w = weight_view(r);
  const bool nm = w.id == KernelId::nm_int8 || w.id == KernelId::nm_int4;
  if (w.id != KernelId::int8 && w.id != KernelId::int4 && !(nm && nm_qtiles_supported(w))) return;
  QTiles tiles;
  if (!tiles.build(w)) return report(counts, false, verbose, r.name + ": the int8-activation layouts were not built");
  const Tensor& x = r.tensor("x");
  const Tensor& ref = r.tensor("y");
  const Tensor& mag = r.tensor("y_mag");
  const Tensor& w_abs = r.tensor("w_abs");
  const Tensor* bias = r.find("bias");
  const int64_t M = x.shape[0], K = w.K, N = w.N;
  const uint64_t tile_bits = kReadsQTiles | (w.qt.compact ? uint64_t(kReadsCompactTiles) : 0);
  const KernelImpl* k = select_kernel(w.id, isa, M, act_call_bits(ActMode::int8) | tile_bits);
  char head[384];
  std::snprintf(head, sizeof head, "%s isa=%s act=int8 kernel=%s M=%lld N=%lld K=%lld x=%s bias=%s threads=%d",
                r.name.c_str(), isa_name(isa), k ? k->name : "none", (long long)M, (long long)N, (long long)K,
                dtype_name(x.dtype), bias ? dtype_name(bias->dtype) : "none", threads);
  if (!k) return report(counts, false, verbose, std::string(head) + ": no kernel selected");

  const int64_t xs = pad_x && x.dtype == DType::f32 ? K + 3 : K;
  Buffer xb(x.dtype, M, xs);
  const size_t esz = dtype_size(x.dtype);
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(xb.bytes.data() + m * xs * esz, static_cast<const char*>(x.data()) + m * K * esz, K * esz);
  auto run = [&](Isa on, Buffer& y) {
    LinearCall call{xb.data(), x.dtype, xs, bias ? bias->data() : nullptr, bias ? bias->dtype : DType::f32,
                    y.data(), N + 2, M};
    call.act = ActMode::int8;
    return run_linear(call, w, on, on == isa ? threads : 1, nullptr);
  };
  Buffer y(x.dtype, M, N + 2), y_scalar(x.dtype, M, N + 2);
  const Status s = run(isa, y), s_scalar = run(Isa::scalar, y_scalar);

  // The quantization term of the bound, per element (see the tolerance comment).
  std::vector<double> extra(size_t(M * N));
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t m = 0; m < M; ++m) {
    convert_to_f32_scalar(static_cast<const char*>(x.data()) + m * K * esz, x.dtype, 1, K, K, row.data());
    double amax = 0;
    for (float v : row) amax = std::fabs(v) > amax ? std::fabs(v) : amax;
    for (int64_t n = 0; n < N; ++n) {
      const double q = amax / 254.0 * element(w_abs, n) * (1.0 + 1.0 / 4096.0);
      extra[size_t(m * N + n)] = q + 2.0 * double(K + 3) * kEpsF32 * q;
    }
  }
  // A level without an int8-activation row runs its fp32 kernel (allowed: the mode permits, not
  // requires, int8 activations); then only the scalar kernel's bits are not expected.
  const bool q8 = (k->requires & kCallInt8Act) != 0;
  double err = 0;
  std::string bad = s != Status::ok ? std::string("status: ") + status_message(s)
                    : s_scalar != Status::ok ? std::string("scalar status: ") + status_message(s_scalar)
                    : compare(y, ref, mag, x.dtype, M, N, K, 0, N, &err, &extra, q8 ? &y_scalar : nullptr);
  char tail[96];
  std::snprintf(tail, sizeof tail, " x_stride=%lld %s err/bound=%.2f", (long long)xs,
                q8 ? "bit-exact=scalar" : "fp32-fallback", err);
  report(counts, bad.empty(), verbose, std::string(head) + tail + (bad.empty() ? "" : ": " + bad));
}

// run_stages (threadpool.h), the native decode step's scheduler: stages with 0, 1 and many tasks; each
// task checks that every task of the previous non-empty stage finished (its value written) before it
// started, and writes its own; every value is checked after the run. 1, 2, 3 and 8 threads, 200 runs each.
struct StagesCheck {
  std::vector<std::vector<int64_t>> val;  // [stage][task]; -1 until written
  std::vector<int64_t> prev;              // the previous non-empty stage of each stage (-1: none)
  std::atomic<int> order_errors{0};
};

struct StageTask {
  StagesCheck* c;
  int64_t s;
};

void stage_task(void* p, int64_t i) {
  const StageTask& t = *static_cast<const StageTask*>(p);
  StagesCheck& c = *t.c;
  int64_t seen = 0;
  if (c.prev[size_t(t.s)] >= 0)
    for (int64_t v : c.val[size_t(c.prev[size_t(t.s)])]) {
      if (v < 0) c.order_errors.fetch_add(1);
      seen += v;
    }
  c.val[size_t(t.s)][size_t(i)] = 1000 * t.s + i + seen % 7;
}

void run_stage_checks(bool verbose, Counts& counts) {
  const std::vector<int64_t> tasks = {1, 0, 3, 7, 0, 0, 16, 1, 2, 1, 1, 64, 5, 0};
  for (int threads : {1, 2, 3, 8}) {
    int bad_runs = 0;
    for (int run = 0; run < 200; ++run) {
      StagesCheck c;
      std::vector<StageTask> ctx(tasks.size());
      std::vector<Stage> stages;
      int64_t last = -1;
      for (size_t s = 0; s < tasks.size(); ++s) {
        c.val.emplace_back(size_t(tasks[s]), -1);
        c.prev.push_back(last);
        if (tasks[s] > 0) last = int64_t(s);
        ctx[s] = StageTask{&c, int64_t(s)};
        stages.push_back(Stage{stage_task, &ctx[s], tasks[s]});
      }
      run_stages(stages.data(), int64_t(stages.size()), threads);
      bool ok = c.order_errors.load() == 0;
      for (size_t s = 0; s < tasks.size(); ++s)
        for (int64_t v : c.val[s]) ok = ok && v >= 0;
      bad_runs += !ok;
    }
    report(counts, bad_runs == 0, verbose,
           "stages threads=" + std::to_string(threads) + " runs=200 bad_runs=" + std::to_string(bad_runs));
  }
}

// decode_ops(isa).attend_part / attend_part_f16 against a double-precision reference, for head sizes
// 2-128 (multiples of the vector width and not), 1-8 query heads per KV head and position ranges from
// one position to 300 (not multiples of 16, starting past 0): m, l and o with q, k, v ~ U(-1, 1) and
// scale 1 / sqrt(d), within 1e-5 of |m| + 1, of l and of o's accumulation sum_t e^(s_t - m) |v_t|
// (the float scores and exp_approx err ~1e-6 there; a dropped position or column is ~1 / n of it).
// scores, m, l and o are poisoned (NaN) first, and guard values after o, m and l must stay. Then the
// range split in two and joined by attend_merge against o_ref / l_ref.
void run_attend_checks(const std::vector<Isa>& isas, bool verbose, Counts& counts) {
  const int64_t dims[] = {2, 8, 40, 48, 64, 80, 128};
  const int64_t groups[] = {1, 2, 3, 4, 5, 8};
  const int64_t ranges[][2] = {{0, 1}, {0, 15}, {0, 16}, {3, 40}, {7, 300}, {0, 257}};
  const float nan = std::nanf(""), guard = 12345.0f;
  uint32_t state = 12345;
  const auto uniform = [&state]() {  // U(-1, 1), xorshift
    state ^= state << 13, state ^= state >> 17, state ^= state << 5;
    return float(state >> 8) / float(1u << 23) - 1.0f;
  };
  for (Isa isa : isas) {
    const DecodeOps ops = decode_ops(isa);
    for (const bool half : {false, true})
      for (const int64_t d : dims)
        for (const int64_t G : groups) {
          std::string bad;
          double worst = 0;
          for (const auto& range : ranges) {
            const int64_t t0 = range[0], t1 = range[1], n = t1 - t0;
            std::vector<float> q(size_t(G * d)), k(size_t(t1 * d)), v(size_t(t1 * d));
            std::vector<uint16_t> kh(k.size()), vh(v.size());
            for (float& x : q) x = uniform();
            for (size_t i = 0; i < k.size(); ++i) {  // an fp16 cache holds the values rounded
              k[i] = uniform(), v[i] = uniform();
              kh[i] = f32_to_f16(k[i]), vh[i] = f32_to_f16(v[i]);
              if (half) k[i] = f16_to_f32(kh[i]), v[i] = f16_to_f32(vh[i]);
            }
            const float scale = 1.0f / std::sqrt(float(d));
            std::vector<float> scores(size_t(G * n), nan), m(size_t(G) + 1, nan), l(size_t(G) + 1, nan);
            std::vector<float> o(size_t(G * d) + 1, nan);
            m[size_t(G)] = l[size_t(G)] = o[size_t(G * d)] = guard;
            const auto call = [&](int64_t a, int64_t b, float* mm, float* ll, float* oo) {
              if (half)
                ops.attend_part_f16(q.data(), G, kh.data(), vh.data(), d, a, b, scale, scores.data(), mm, ll, oo);
              else
                ops.attend_part(q.data(), G, k.data(), v.data(), d, a, b, scale, scores.data(), mm, ll, oo);
            };
            call(t0, t1, m.data(), l.data(), o.data());
            if (m[size_t(G)] != guard || l[size_t(G)] != guard || o[size_t(G * d)] != guard) bad += " wrote-past-end";
            // the range in two parts, joined
            const int64_t tm = t0 + n / 2 > t0 ? t0 + n / 2 : t1;
            std::vector<float> pm(size_t(2 * G), nan), pl(size_t(2 * G), nan), po(size_t(2 * G * d), nan);
            call(t0, tm, pm.data(), pl.data(), po.data());
            const int64_t parts = tm < t1 ? 2 : 1;
            if (parts == 2) call(tm, t1, pm.data() + G, pl.data() + G, po.data() + G * d);
            for (int64_t g = 0; g < G; ++g) {
              std::vector<double> s(static_cast<size_t>(n));
              double top = -1e300;
              for (int64_t t = 0; t < n; ++t) {
                double dot = 0;
                for (int64_t i = 0; i < d; ++i) dot += double(q[size_t(g * d + i)]) * k[size_t((t0 + t) * d + i)];
                s[size_t(t)] = dot * scale;
                top = s[size_t(t)] > top ? s[size_t(t)] : top;
              }
              double lr = 0;
              std::vector<double> orf(size_t(d), 0.0), mag(size_t(d), 0.0);
              for (int64_t t = 0; t < n; ++t) {
                const double e = std::exp(s[size_t(t)] - top);
                lr += e;
                for (int64_t i = 0; i < d; ++i) {
                  orf[size_t(i)] += e * v[size_t((t0 + t) * d + i)];
                  mag[size_t(i)] += e * std::fabs(v[size_t((t0 + t) * d + i)]);
                }
              }
              const auto check = [&](double got, double want, double bound, const char* what) {
                const double err = std::fabs(got - want) / bound;
                worst = err > worst ? err : worst;
                if (!(err <= 1.0)) bad += std::string(" ") + what + "@t=" + std::to_string(t0) + ".." + std::to_string(t1);
              };
              check(m[size_t(g)], top, 1e-5 * (1 + std::fabs(top)), "m");
              check(l[size_t(g)], lr, 1e-5 * lr, "l");
              std::vector<float> joined(size_t(d), nan);
              decode_math::attend_merge(pm.data() + g, pl.data() + g, po.data() + g * d, parts, G, d, joined.data());
              for (int64_t i = 0; i < d; ++i) {
                check(o[size_t(g * d + i)], orf[size_t(i)], 1e-5 * mag[size_t(i)] + 1e-30, "o");
                check(joined[size_t(i)], orf[size_t(i)] / lr, 2e-5 * mag[size_t(i)] / lr + 1e-30, "merged");
              }
            }
          }
          char line[160];
          std::snprintf(line, sizeof line, "attend isa=%s cache=%s d=%lld heads=%lld err/bound=%.2f", isa_name(isa),
                        half ? "fp16" : "fp32", (long long)d, (long long)G, worst);
          report(counts, bad.empty(), verbose, std::string(line) + (bad.empty() ? "" : ":" + bad.substr(0, 200)));
        }
  }
}

// decode_ops(isa).attend_rows over pack_keys_values' gather, against a double-precision reference: head sizes
// 1-128 (multiples of every vector width and not), 1-9 rows (whole kHeads groups and a remainder), every
// row seeing the same n keys or each a different prefix (as causal rows do), n from 1 to 130 (not
// multiples of 16), keys gathered through an index (every other key of a longer sequence), q, v and out
// rows strided. out is poisoned (NaN) and the gaps between its rows hold a guard that must stay; each
// output within 1e-5 of its accumulation sum_t p_t |v_t| / sum_t p_t (float scores and exp_approx:
// ~1e-6 there; a dropped key is ~1 / n of it). Then run_attention end to end on one ISA-independent
// shape set: a padding mask (two rows hiding different keys), causal rows, grouped-query heads, 1 and 3
// threads, against the same reference, and a row that sees no key reads zeros.
void run_attend_rows_checks(const std::vector<Isa>& isas, bool verbose, Counts& counts) {
  const int64_t dims[] = {1, 5, 8, 24, 32, 48, 64, 80, 128};
  const int64_t rows_list[] = {1, 3, 4, 5, 9};
  const int64_t ns[] = {1, 15, 16, 17, 46, 130};
  const float nan = std::nanf(""), guard = 12345.0f;
  uint32_t state = 777;
  const auto uniform = [&state]() {  // U(-1, 1), xorshift
    state ^= state << 13, state ^= state >> 17, state ^= state << 5;
    return float(state >> 8) / float(1u << 23) - 1.0f;
  };
  // reference of one row: keys idx[0 .. n) of k / v rows (stride), q row; out err bound via |v|
  const auto reference = [](const float* q, const float* k, const float* v, int64_t stride, const int32_t* idx,
                            int64_t n, int64_t d, float scale, std::vector<double>& o, std::vector<double>& mag) {
    std::vector<double> sc(static_cast<size_t>(n));
    double top = -1e300;
    for (int64_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int64_t e = 0; e < d; ++e) dot += double(q[e]) * k[idx[t] * stride + e];
      sc[size_t(t)] = dot * scale;
      top = sc[size_t(t)] > top ? sc[size_t(t)] : top;
    }
    double l = 0;
    o.assign(size_t(d), 0.0), mag.assign(size_t(d), 0.0);
    for (int64_t t = 0; t < n; ++t) {
      const double p = std::exp(sc[size_t(t)] - top);
      l += p;
      for (int64_t e = 0; e < d; ++e) {
        o[size_t(e)] += p * v[idx[t] * stride + e];
        mag[size_t(e)] += p * std::fabs(v[idx[t] * stride + e]);
      }
    }
    for (int64_t e = 0; e < d; ++e) o[size_t(e)] /= l, mag[size_t(e)] /= l;
  };
  for (Isa isa : isas) {
    const DecodeOps ops = decode_ops(isa);
    for (const int64_t d : dims) {
      std::string bad;
      double worst = 0;
      for (const int64_t g : rows_list)
        for (const int64_t n : ns)
          for (const bool prefixes : {false, true}) {
            const int64_t stride = d + 3, total = 2 * n + 1, np = (n + kAttendPad - 1) / kAttendPad * kAttendPad;
            std::vector<float> q(size_t(g * stride)), k(size_t(total * stride)), v(size_t(total * stride));
            for (float& x : q) x = uniform();
            for (size_t i = 0; i < k.size(); ++i) k[i] = 2 * uniform(), v[i] = uniform();
            std::vector<int32_t> idx(static_cast<size_t>(n));
            for (int64_t t = 0; t < n; ++t) idx[size_t(t)] = int32_t(2 * t + 1);
            std::vector<int64_t> nk(static_cast<size_t>(g));
            for (int64_t i = 0; i < g; ++i) nk[size_t(i)] = prefixes ? 1 + (i * (n - 1)) / (g > 1 ? g - 1 : 1) : n;
            std::vector<float> kt(size_t(d * np), nan), vp(size_t(n * d), nan), scores(size_t(g * np), nan);
            std::vector<float> out(size_t(g * stride), guard);
            for (int64_t i = 0; i < g; ++i)
              for (int64_t e = 0; e < d; ++e) out[size_t(i * stride + e)] = nan;
            const float scale = 1.0f / std::sqrt(float(d));
            ops.pack_keys_values(k.data(), stride, v.data(), stride, idx.data(), n, d, kt.data(), np, vp.data());
            AttendRows a;
            a.q = q.data(), a.q_stride = stride, a.g = g, a.kt = kt.data(), a.np = np;
            a.v = vp.data(), a.d = d, a.nk = nk.data(), a.scale = scale;
            a.scores = scores.data(), a.out = out.data(), a.out_stride = stride;
            ops.attend_rows(a);
            for (int64_t i = 0; i < g; ++i) {
              for (int64_t e = d; e < stride; ++e)
                if (out[size_t(i * stride + e)] != guard) bad += " wrote-between-rows";
              std::vector<double> o, mag;
              reference(q.data() + i * stride, k.data(), v.data(), stride, idx.data(), nk[size_t(i)], d, scale, o, mag);
              for (int64_t e = 0; e < d; ++e) {
                const double err = std::fabs(out[size_t(i * stride + e)] - o[size_t(e)]) / (1e-5 * mag[size_t(e)] + 1e-30);
                worst = err > worst ? err : worst;
                if (!(err <= 1.0)) bad += " g=" + std::to_string(g) + ",n=" + std::to_string(n) + (prefixes ? ",prefixes" : "");
              }
            }
          }
      char line[160];
      std::snprintf(line, sizeof line, "attend_rows isa=%s d=%lld err/bound=%.2f", isa_name(isa), (long long)d, worst);
      report(counts, bad.empty(), verbose, std::string(line) + (bad.empty() ? "" : ":" + bad.substr(0, 200)));
    }
    // run_attention: B = 3 (batch rows 1 and 2 hide different keys: 4 of 37, every other one), H = 6
    // heads over Hkv = 2 or 6, Lq = Lk = 37, D = 24, q / k / v interleaved in one [B][L][3 * H * D] buffer
    for (const bool causal : {false, true})
      for (const int64_t hkv : {int64_t(2), int64_t(6)})
        for (const int threads : {1, 3}) {
          const int64_t B = 3, H = 6, L = 37, D = 24, row = 3 * H * D;
          std::vector<float> qkv(size_t(B * L * row));
          for (float& x : qkv) x = uniform();
          std::vector<uint8_t> mask(size_t(B * L), 1);
          for (int64_t j = L - 4; j < L; ++j) mask[size_t(1 * L + j)] = 0;
          for (int64_t j = 0; j < L; j += 2) mask[size_t(2 * L + j)] = 0;
          std::vector<float> out(size_t(B * L * H * D), nan);
          AttentionCall c;
          c.q = qkv.data(), c.k = qkv.data() + H * D, c.v = qkv.data() + 2 * H * D, c.out = out.data();
          c.B = B, c.H = H, c.Hkv = hkv, c.Lq = L, c.Lk = L, c.D = D;
          c.q_stride[0] = L * row, c.q_stride[1] = D, c.q_stride[2] = row;
          for (int i = 0; i < 3; ++i) c.k_stride[i] = c.v_stride[i] = c.q_stride[i];
          c.mask = mask.data(), c.mask_rows = 1, c.mask_stride[0] = L, c.mask_stride[1] = 0, c.mask_stride[2] = 1;
          c.scale = 1.0f / std::sqrt(float(D)), c.causal = causal;
          std::string bad;
          double worst = 0;
          if (!mask_hides_keys_only(c) || run_attention(c, isa, threads) != Status::ok) bad += " refused";
          for (int64_t b = 0; b < B && bad.empty(); ++b)
            for (int64_t h = 0; h < H; ++h)
              for (int64_t i = 0; i < L; ++i) {
                std::vector<int32_t> idx;
                for (int64_t j = 0; j < L; ++j)
                  if (mask[size_t(b * L + j)] && (!causal || j <= i)) idx.push_back(int32_t(j));
                const float* got = out.data() + ((b * L + i) * H + h) * D;
                if (idx.empty()) {  // batch row 2, causal, row 0: key 0 is hidden
                  for (int64_t e = 0; e < D; ++e)
                    if (got[e] != 0.0f) bad += " not-zero";
                  continue;
                }
                const int64_t hk = h / (H / hkv);
                std::vector<double> o, mag;
                reference(c.q + b * c.q_stride[0] + h * D + i * row, c.k + b * c.k_stride[0] + hk * D,
                          c.v + b * c.v_stride[0] + hk * D, row, idx.data(), int64_t(idx.size()), D, c.scale, o, mag);
                for (int64_t e = 0; e < D; ++e) {
                  const double err = std::fabs(got[e] - o[size_t(e)]) / (1e-5 * mag[size_t(e)] + 1e-30);
                  worst = err > worst ? err : worst;
                  if (!(err <= 1.0)) bad += " b=" + std::to_string(b) + ",h=" + std::to_string(h) + ",i=" + std::to_string(i);
                }
              }
          char line[160];
          std::snprintf(line, sizeof line, "run_attention isa=%s causal=%d kv_heads=%lld threads=%d err/bound=%.2f",
                        isa_name(isa), int(causal), (long long)hkv, threads, worst);
          report(counts, bad.empty(), verbose, std::string(line) + (bad.empty() ? "" : ":" + bad.substr(0, 200)));
        }
  }
}

// The SIMD activation quantizers (x86: quantize_act_avx2, which the AVX2 and AVX-512 levels use)
// against quantize_act_scalar, bit for bit (codes with their padding, scales, sums), on segments of
// 128 over K = 1 .. 1000, rows strided past K: Gaussian x with one segment all zero, one holding an
// inf or NaN, one of zeros and subnormals or normals below 127 / FLT_MAX (codes 0, scale 0: 127 / amax
// would overflow), a large outlier. run_linear's outputs cannot tell these codes apart (a scale below
// 3e-39 multiplies them).
void run_quantizer_checks(const std::vector<Isa>& isas, bool verbose, Counts& counts) {
#ifdef SPARSEINFER_HAVE_AVX2
  bool avx2 = false;
  for (Isa isa : isas) avx2 = avx2 || isa == Isa::avx2 || isa == Isa::avx512;
  if (!avx2) return;
  uint32_t state = 12345;
  auto normal = [&state] {  // Irwin-Hall: close enough to Gaussian, the same on every platform
    double s = 0;
    for (int i = 0; i < 12; ++i) s += double((state = state * 1664525u + 1013904223u) >> 8) / double(1 << 24);
    return float(s - 6.0);
  };
  for (int64_t K : {1, 7, 16, 31, 127, 128, 129, 300, 1000})
    for (int64_t M : {1, 4, 8}) {
      QTileView t;
      t.seg = 128, t.nseg = (K + 127) / 128, t.seg_pad = 128;
      const int64_t sx = K + 5, cells = M * t.nseg;
      std::vector<float> x(size_t(M * sx), std::nanf(""));  // the stride's padding: never read
      for (int64_t m = 0; m < M; ++m) {
        float* row = x.data() + m * sx;
        for (int64_t k = 0; k < K; ++k) row[k] = normal();
        const int64_t seg = (m + 1) % t.nseg, k0 = seg * t.seg, k1 = K < k0 + t.seg ? K : k0 + t.seg;
        for (int64_t k = k0; k < k1; ++k)
          switch (m % 4) {
            case 0: row[k] = 0.f; break;
            case 1: row[k] = k == (k0 + k1) / 2 ? (m % 8 == 1 ? INFINITY : std::nanf("")) : row[k]; break;
            case 2: row[k] = k % 3 ? (m % 8 == 2 ? 1e-40f : 1e-37f) * row[k] : 0.f; break;
            default: row[k] = k == k1 - 1 ? 3e5f : row[k]; break;
          }
      }
      for (const uint8_t flip : {uint8_t(0), uint8_t(0x80)}) {  // x as it is, and x + 128 (QActView::qu)
        std::vector<int8_t> q0(size_t(cells * t.seg_pad), 99), q1(q0), qs(q0);
        std::vector<float> s0(static_cast<size_t>(cells)), s1(static_cast<size_t>(cells));
        std::vector<int32_t> u0(static_cast<size_t>(cells)), u1(static_cast<size_t>(cells));
        quantize_act_scalar(x.data(), M, K, sx, t, q0.data(), s0.data(), u0.data(), flip);
        quantize_act_avx2(x.data(), M, K, sx, t, q1.data(), s1.data(), u1.data(), flip);
        quantize_act_scalar(x.data(), M, K, sx, t, qs.data(), s1.data(), u1.data(), 0);
        bool ok = q0 == q1 && u0 == u1;
        for (size_t i = 0; i < qs.size(); ++i) ok = ok && uint8_t(q0[i]) == (uint8_t(qs[i]) ^ flip);
        for (int64_t i = 0; i < cells; ++i)
          ok = ok && (std::memcmp(&s0[size_t(i)], &s1[size_t(i)], 4) == 0 ||
                      (std::isnan(s0[size_t(i)]) && std::isnan(s1[size_t(i)])));
        report(counts, ok, verbose,
               "quantize_act_avx2 K=" + std::to_string(K) + " M=" + std::to_string(M) + " flip=" +
                   std::to_string(flip) + " bit-exact=scalar");
      }
    }
#else
  (void)isas, (void)verbose, (void)counts;
#endif
}

void print_features() {
  std::printf("FEATURES arch=%s", cpu_arch());
  for (const auto& f : cpu_feature_list()) std::printf(" %s=%d", f.first.c_str(), int(f.second));
  std::printf("\nISAS");
  for (Isa i : available_isas()) std::printf(" %s", isa_name(i));
  std::printf("\nCOMPILED");
  for (Isa i : compiled_isas()) std::printf(" %s", isa_name(i));
  std::printf("\n");
}

int usage() {
  std::fprintf(stderr, "usage: kernel_test VECTORS [--isa NAME]... [--only PREFIX] [--threads T] [--verbose]\n"
                       "       kernel_test --features\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const char* path = nullptr;
  std::vector<Isa> isas;
  int threads = 3;
  bool verbose = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--features") {
      print_features();
      return 0;
    } else if (arg == "--isa" && i + 1 < argc) {
      Isa isa;
      if (!parse_isa(argv[++i], &isa) || !isa_available(isa)) {
        std::fprintf(stderr, "kernel_test: ISA '%s' is not available here\n", argv[i]);
        return 2;
      }
      isas.push_back(isa);
    } else if (arg == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
      if (threads < 1) return usage();
    } else if (arg == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (arg == "--verbose") {
      verbose = true;
    } else if (!path && arg[0] != '-') {
      path = argv[i];
    } else {
      return usage();
    }
  }
  if (!path) return usage();
  if (isas.empty()) isas = available_isas();
  print_features();
  const std::vector<Record> records = load_vectors(path);
  Counts counts;
  for (Isa isa : isas)
    for (size_t i = 0; i < records.size(); ++i) {
      if (records[i].name.compare(0, only.size(), only) != 0) continue;
      // Alternate 1 thread and `threads` (the split into column chunks), and padded / dense x rows.
      run_case(records[i], isa, i % 2 ? threads : 1, i % 4 >= 2, verbose, counts);
      run_int8_act_case(records[i], isa, i % 2 ? threads : 1, i % 4 < 2, verbose, counts);
    }
  if (only.empty()) {
    run_stage_checks(verbose, counts), run_attend_checks(isas, verbose, counts);
    run_attend_rows_checks(isas, verbose, counts);
    run_quantizer_checks(isas, verbose, counts);
  }
  std::printf("SUMMARY records=%zu isas=%zu pass=%d fail=%d\n", records.size(), isas.size(), counts.pass, counts.fail);
  if (counts.pass + counts.fail == 0) {
    std::fprintf(stderr, "kernel_test: no case ran (--only '%s' matches no record)\n", only.c_str());
    return 1;
  }
  return counts.fail ? 1 : 0;
}
