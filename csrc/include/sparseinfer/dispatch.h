// Runtime dispatch: CPU detection (once), the SPARSEINFER_ISA override, the kernel tables, and
// the driver that runs one linear call over the thread pool.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "sparseinfer/kernels.h"

namespace sparseinfer {

// Feature bits of this CPU (kFeat*), detected once.
uint64_t cpu_features();
// (name, present) for every feature the dispatcher knows on this architecture, for reports.
std::vector<std::pair<std::string, bool>> cpu_feature_list();
const char* cpu_arch();

// ISA levels compiled into this build, and those this CPU can also run (scalar first).
std::vector<Isa> compiled_isas();
std::vector<Isa> available_isas();
bool isa_available(Isa isa);
// "scalar" (alias "ref"), "avx2", "avx512", "neon" -> Isa; false if the name is unknown.
bool parse_isa(const std::string& name, Isa* out);

// The ISA that calls without an explicit one use: the best available, or SPARSEINFER_ISA when
// set. Returns false with a message when SPARSEINFER_ISA names an unknown or unavailable ISA
// (read once, at the first call).
bool active_isa(Isa* out, std::string* error);

// One table row: kernel `fn` implements `id` for batches M <= max_m when the CPU has every
// feature bit in `requires` (beyond its ISA level's own).
struct KernelImpl {
  KernelId id;
  KernelFn fn;
  const char* name;  // <format>_<op>_<isa>, reported by explain()
  int64_t max_m;
  uint64_t requires;
  int64_t min_m = 0;  // measured-only rows: timed from this batch (below it they run the pick's code)
};

// The kernel a call runs: the first matching row of `isa`'s table, else of the levels below it.
// `call` holds the call-level bits rows may require besides CPU features (kCallInt8Act).
const KernelImpl* select_kernel(KernelId id, Isa isa, int64_t M, uint64_t call = 0);
// The row named `name` that a call of family `id` on `isa` with `call` bits may run, measured-only
// rows included and batch limits ignored (a call that names its kernel); nullptr if none.
const KernelImpl* find_kernel(const char* name, KernelId id, Isa isa, uint64_t call = 0);
// What a call with M rows may run: select_kernel's pick first, then the kMeasuredOnly rows that
// admit M, from `isa` down to the first level that lists the family (what sparseinfer's measured
// routes time against each other).
std::vector<const KernelImpl*> kernel_candidates(KernelId id, Isa isa, int64_t M, uint64_t call = 0);

// The rows select_kernel tries for `isa` (its table, then its fallbacks'), those this CPU can run,
// with the batch limit in force (built-in, or set by set_batch_limit).
struct KernelRow {
  const KernelImpl* impl;
  Isa isa;
  int64_t max_m;
};
std::vector<KernelRow> kernel_rows(Isa isa);
// Replace the batch limit of the kernel named `name` (measured on this machine: sparseinfer's
// cpu_tuning.py); a negative limit restores the built-in one. False if no row has that name.
bool set_batch_limit(const std::string& name, int64_t max_m);

// Activation modes (kernels.h, ActMode): "auto", "fp32" or "int8" -- the same set as
// sparseinfer/act.py, which also reads SPARSEINFER_ACT (the extension reads no environment for it).
const std::vector<std::string>& act_mode_names();
bool parse_act_mode(const std::string& name, ActMode* out);
const char* act_mode_name(ActMode mode);
// The call-level bits a call in `mode` selects with (kCallInt8Act for auto and int8).
uint64_t act_call_bits(ActMode mode);

// Rows n_begin..n_end of w dequantized into out (fp32, row r at out + (r - n_begin) * stride, stride
// >= K): the values of the Python to_dense(), for the dense fallback (ref/dequantize_ref.cpp).
Status dequantize_rows(const WeightView& w, int64_t n_begin, int64_t n_end, float* out, int64_t stride, int threads);
// The active ISA's row dequantizer for dequantize_rows (nullptr: only the scalar one there).
using DequantizeRowFn = bool (*)(const WeightView& w, int64_t n, float* out);
DequantizeRowFn active_dequantize_row();

// Batches of 1-2 stream each weight byte once, from memory in a model: a second thread pays from
// this many multiply-adds per thread (run_linear; the native decode step's pieces too).
constexpr int64_t kMinStreamWorkPerThread = int64_t(1) << 17;
// Columns per task when n output columns, `work` multiply-adds in all, split over up to `threads`
// threads of at least `min_work` multiply-adds each, in multiples of 16 (whole register tiles but at
// the end): run_linear's split, and the native decode step's pieces.
int64_t column_chunk(int64_t n, int64_t work, int64_t min_work, int threads);

// One call, as bindings.cpp hands it over (already validated).
struct LinearCall {
  const void* x;       // [M, K], unit stride along K
  DType x_dtype;       // f32 / bf16 / f16; y has the same dtype
  int64_t stride_xm;
  const void* bias;    // [N] or nullptr
  DType bias_dtype;    // f32 / bf16 / f16
  void* y;             // [M, N], unit stride along N
  int64_t stride_ym;
  int64_t M;
  ActMode act = ActMode::fp32;  // auto / int8: rows requiring kCallInt8Act may run (int8 / int4 weights)
  const char* kernel = nullptr;  // run this row (find_kernel) instead of the table's pick
};

// Converts x and bias to fp32 when needed, then runs the kernel (the table's pick, or the one the
// call names: no_kernel if that row does not apply) over up to `threads` threads,
// splitting the N output columns. `kernel` (optional) receives the kernel that ran.
Status run_linear(const LinearCall& call, const WeightView& w, Isa isa, int threads, const KernelImpl** kernel);

// A one-row fp32 call taken apart for callers that schedule its pieces themselves (the native decode
// step, bindings.cpp): the kernel and arguments run_linear would use, the int8 activations (when the
// kernel takes them) quantized by quantize() into buffers the call owns, then any columns, on any
// thread. Bits are run_linear's: a column's value does not depend on the split.
struct RowCall {
  const KernelImpl* kernel = nullptr;
  const WeightView* w = nullptr;
  GemmArgs args;
  QuantizeActFn quantize_fn = nullptr;  // nullptr: the kernel reads x as it is
  uint8_t flip = 0;       // 0x80 where the kernel reads x + 128 (args.qx.qu points into q then)
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  void quantize();                             // after x is written, before any columns
  Status columns(int64_t n0, int64_t n1) const;  // y[n0 .. n1)
};
// Sets `out` up for y = W x + bias, x and y fp32 with one row (call.M == 1; the buffers x, y and bias
// point to are read at quantize() / columns() time). no_kernel when the named row does not apply.
Status prepare_row_call(const LinearCall& call, const WeightView& w, Isa isa, RowCall* out);
// Multiply-adds per output column and batch row of w's kernels (how run_linear sizes its split).
int64_t work_per_column(const WeightView& w);

// Attention over whole sequences (an encoder's, or a prompt's), for transformers' attention interface
// (sparseinfer/runtime/attention.py): out[b, i, h, :] = softmax_j(scale * q[b, h, i] . k[b, h', j]) v[b, h', j]
// over the keys j a query may see, h' = h / (H / Hkv) (grouped-query heads share a KV head). Keys a
// query may see: every j with mask[b, 0, 0, j] != 0 (all where mask is null), and with causal also
// j <= i. q, k, v: fp32 with unit stride along D and any other strides (views of one joint q / k / v
// output need no copy); out: fp32 [B, Lq, H, D] contiguous, the layout the output projection reads.
// A query that may see no key gets zeros. Per (b, h) the keys it may see are gathered into
// contiguous rows (the keys transposed) and DecodeOps::attend_rows runs over them.
struct AttentionCall {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  int64_t B = 0, H = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0;
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {};  // elements between batches, heads, rows
  // mask [B][mask_rows][Lk] bytes (nonzero: visible) at these strides (0 broadcasts), or nullptr
  const uint8_t* mask = nullptr;
  int64_t mask_rows = 0, mask_stride[3] = {};
  float scale = 1.0f;
  bool causal = false;
};
// Whether every row of call.mask shows the same keys (a padding mask), the only masks run_attention
// takes (it reads row 0).
bool mask_hides_keys_only(const AttentionCall& call);
Status run_attention(const AttentionCall& call, Isa isa, int threads);

}  // namespace sparseinfer
