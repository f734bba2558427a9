// Kernel interface of the C++ CPU backend: what every kernel takes, returns and promises.
//
//   y[M, N] = x[M, K] . W^T + bias        W: one canonical packed weight (sparseinfer/formats/*.py)
//
// Three thin layers (see docs/architecture.md):
//   bindings.cpp  checks dtypes, shapes, strides, int32 ranges; builds a WeightView once (prepack)
//   dispatch.cpp  picks the kernel (ISA x format x batch), converts x/bias to fp32, splits N over threads
//   kernels       ref/*.cpp, x86/avx2/*.cpp, ... : raw pointers in, a Status out, no allocation
//                 beyond a grow-only thread-local scratch, no exceptions, no Python.
//
// Contract every kernel can rely on (checked by bindings.cpp before any kernel runs):
//   * 1 <= M, N, K <= INT32_MAX, so SIMD code may count within a row with 32-bit integers;
//     offsets across rows are int64.
//   * x is fp32 with unit stride along K and row stride stride_xm >= 0 (dispatch converts
//     bf16/fp16 activations once per call); bias is fp32 [N] or nullptr.
//   * y has unit stride along N, row stride stride_ym >= N when M > 1 (rows never overlap), and
//     the activation dtype; the kernel accumulates in fp32 and rounds once (store_output).
//   * Every pointer in the WeightView is valid for the sizes it states and every CSR column is
//     in [0, K) (validated at prepack). N:M indices are NOT trusted: a kernel must ignore kept
//     values whose column is >= K (they are the zero padding of the last group).
//   * A kernel computes output columns [n_begin, n_end) for all M rows and touches nothing else:
//     several threads run the same kernel on disjoint column ranges at once.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparseinfer {

// -- error codes --------------------------------------------------------------------------------
// Kernels never throw; bindings.cpp turns a code into a message that names the shapes.
enum class Status : int32_t {
  ok = 0,
  invalid_argument = 1,   // a size/pointer invariant of the contract above does not hold
  unsupported_dtype = 2,  // no kernel for this value / activation dtype
  no_kernel = 3,          // no kernel registered for this format on this ISA (nor on its fallbacks)
  out_of_memory = 4,      // the per-thread scratch could not grow
  internal_error = 5,
};
const char* status_message(Status s);

// -- element types ------------------------------------------------------------------------------
enum class DType : int32_t { f32 = 0, bf16, f16, i8, u8, i32, i64, unknown };
const char* dtype_name(DType d);
namespace {  // internal linkage in every group, see kernel_utils.h
inline bool is_float(DType d) { return d == DType::f32 || d == DType::bf16 || d == DType::f16; }
inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::f32: case DType::i32: return 4;
    case DType::bf16: case DType::f16: return 2;
    case DType::i8: case DType::u8: return 1;
    case DType::i64: return 8;
    default: return 0;
  }
}
}  // namespace

// -- instruction sets ---------------------------------------------------------------------------
// Ordered: a kernel missing at one level falls back to the level below (avx512 -> avx2 -> scalar,
// neon -> scalar). A level is "available" when its group was compiled in AND the CPU supports it.
enum class Isa : int32_t { scalar = 0, avx2, avx512, neon, count };
const char* isa_name(Isa isa);

// CPU feature bits beyond an ISA level's baseline. A kernel compiled with extra per-file flags
// (e.g. -mavx512vnni) declares them in its table entry and is only picked when the CPU has them.
enum Feature : uint64_t {
  kFeatAvx2 = 1ull << 0,        // with FMA, F16C and OS support for YMM state
  kFeatAvx512 = 1ull << 1,      // F + BW + VL + DQ + CD, with OS support for ZMM/opmask state
  kFeatAvxVnni = 1ull << 2,     // VEX-encoded vpdpbusd (Alder Lake, Zen 5)
  kFeatAvx512Vnni = 1ull << 3,  // Cascade Lake, Ice Lake, Zen 4
  kFeatAvx512Bf16 = 1ull << 4,  // Cooper Lake, Sapphire Rapids, Zen 4
  kFeatAmxInt8 = 1ull << 5,    // AMX-TILE + AMX-INT8 with the tile state granted by the OS (Sapphire Rapids)
  kFeatAvx512Vbmi2 = 1ull << 6, // vpexpandb (Ice Lake, Zen 4)
  kFeatNeon = 1ull << 8,        // aarch64 ASIMD (always present on aarch64)
  kFeatNeonDot = 1ull << 9,     // sdot / udot
  kFeatNeonI8mm = 1ull << 10,   // smmla
  kFeatNeonBf16 = 1ull << 11,   // bfdot / bfmmla
  // Not a CPU feature: the driver adds this bit to the mask it selects with when the call allows
  // int8 activations (ActMode::int8). A row that requires it reads GemmArgs::qx, not x.
  kCallInt8Act = 1ull << 32,
  // Not a CPU feature either: set when the weight has row tiles (WeightView::qt) where its family
  // may lack them (N:M: build_nm_qtiles). A row of such a family that requires it runs a row-tile
  // kernel, on the x the driver quantizes in the tiles' segments (as for int8 / int4).
  kReadsQTiles = 1ull << 33,
  // Not a feature: select_kernel passes over a row with this bit; only a call that names the kernel
  // (LinearCall::kernel: the measured routes of sparseinfer/backends/cpu_routes.py) runs it. For a
  // kernel that wins on some shapes and loses on others at the same batch size.
  kMeasuredOnly = 1ull << 34,
  // Not a feature: the weight's row tiles have (or, on first use, can have) their compact steps
  // (QTileView::compact). Rows that read them require kReadsQTiles too.
  kReadsCompactTiles = 1ull << 35,
};
// The bits of a row's requirements that are CPU features (the ones above say what a call or weight has).
constexpr uint64_t kCpuFeatureBits = (1ull << 32) - 1;

// Activation precision of a call to an int8 / int4 weight (per call; sparseinfer/act.py):
//   fp32  exact: the kernel multiplies fp32 x by the dequantized weight (error ~1e-6 relative)
//   int8  permission to quantize: the driver quantizes x once per call, per segment of the weight's
//         row tiles (QActView), and the kernel takes integer dot products (vpdpbusd / pmaddubsw);
//         the error bound is in csrc/README.md ("Activation modes").
//   auto  the default: selects as int8 does (an int8-activation row is listed only where it is faster)
enum class ActMode : int32_t { fp32 = 0, int8 = 1, auto_ = 2 };

// -- packed weights -----------------------------------------------------------------------------
// Views (non-owning) of the canonical tensors; bindings.cpp keeps the tensors alive.

// int8 / int4 codes with per-group scales. Also the quantized values of N:M+int8 / N:M+int4,
// whose rows have kc (not K) entries.
struct QuantView {
  const void* codes = nullptr;    // int8 [rows, kp], or uint8 [rows, kp / 2]: low nibble = even k
  const float* scale = nullptr;   // [rows, n_groups]
  const uint8_t* zero = nullptr;  // int4: [rows, n_groups] in 0..15; nullptr = symmetric (zero 8)
  int64_t kp = 0;                 // padded row length in elements (multiple of group)
  int64_t group = 0;              // elements per scale
  int64_t n_groups = 0;           // kp / group
};

// How the kept values of N:M and CSR are stored.
enum class ValueKind : int32_t { f32 = 0, bf16, f16, i8, i4 };

struct NMView {
  int32_t n = 0, m = 0;            // n kept out of every m along K
  int32_t bits = 0;                // ceil(log2 m): bits per index in meta
  int64_t kc = 0;                  // kept values per row = ceil(K / m) * n
  const uint8_t* meta = nullptr;   // [rows, meta_stride]: little-endian bit stream per row
  int64_t meta_stride = 0;         // bytes per meta row = ceil(kc * bits / 8)
  ValueKind values = ValueKind::f32;
  // 2:4 + int8 / int4, int8 activations: codes and indices reordered for nm_q8_*_avx2 (ref/nm_q8_prepack_ref.cpp),
  // built with the weight's row tiles on its first int8-mode call (bindings.cpp); codes == nullptr until then.
  struct Q8 {
    const uint8_t* codes = nullptr;  // [rows][K / 64 blocks][32 bytes int8 | 16 bytes int4]
    const uint8_t* meta = nullptr;   // [rows][K / 64 blocks][8 bytes]: the blocks' indices, reordered like the codes
    const int32_t* wsum = nullptr;   // int4: [rows][nseg], sum over a segment's whole blocks of code - zero
    int64_t seg = 0, nseg = 0;       // activation segment (columns; never straddles a scale group), count
  } q8;
  const void* fvalues = nullptr;   // float kinds: [rows, kc] of f32 / bf16 / f16
  // i8 / i4 kinds: WeightView::q holds the values, a QuantView of shape (rows, kc)
};

struct CSRView {
  const int64_t* crow = nullptr;   // [N + 1], crow[0] = 0, non-decreasing
  const int32_t* col = nullptr;    // [nnz], each in [0, K)
  const void* values = nullptr;    // [nnz]: f32 / bf16 / f16, or i8 codes
  ValueKind kind = ValueKind::f32;
  const float* scale = nullptr;    // i8: per-row scale [N]
  int64_t nnz = 0;
};

// Row tiles of an int8 / int4 weight for the int8-activation kernels (ref/qtile_ref.cpp builds
// them once per weight, from the QuantView). 16 output rows are interleaved so that one 64-byte
// load feeds 16 lanes: a 32-bit lane holds 4 consecutive codes of one row (int8), or 8 (int4: low
// nibbles k..k+3, high nibbles k+4..k+7), i.e. exactly what one broadcast 4-byte group of int8
// activations meets in vpdpbusd / pmaddubsw. K is cut into segments of `seg` elements (the unit
// of activation quantization, 128 for the usual groups; a segment never straddles a scale group),
// each zero-padded to seg_pad. Rows past N are zero-filled (scale 0); their outputs are never stored.
struct QTileView {
  const uint8_t* codes = nullptr;  // [tiles][nseg][seg_pad / epl][16 rows][4 bytes], epl = 32 / bits
                                   //   int8: the canonical int8 codes; int4: 0..15 as above
  const float* scale = nullptr;    // [tiles][n_groups][16]
  const uint8_t* zero = nullptr;   // int4 asymmetric: [tiles][n_groups][16]; nullptr: 8 (int4), 0 (int8)
  int32_t bits = 0;                // 8 or 4; 0: not built
  int64_t tiles = 0;               // ceil(N / 16)
  int64_t seg = 0, seg_pad = 0;    // elements per segment; padded to a multiple of 8
  int64_t nseg = 0;                // segments per row = ceil(Kp / seg)
  int64_t segs_per_group = 0;      // group / seg (>= 1): segment s uses scale group s / segs_per_group
  int64_t n_groups = 0;
  // int8 codes with 2:4 sparsity squeezed out, for batches of 1-2 (memory-bound), where every lane's
  // 4 codes of a step hold at most 2 non-zero ones (a pruned position holds 0). Built on first use
  // (build_qtile_compact); nullptr until then. Per step ([tiles][nseg][seg_pad / 4] as above)
  // kCompactStepBytes = a mask (u64, little-endian: bit b set = byte b of the 64-byte step is kept,
  // 2 per lane) + the 32 kept codes in byte order; a kernel rebuilds the step with vpexpandb.
  const uint8_t* compact = nullptr;
  // int8: 128 x the sum of each row's codes over each segment, [tiles][nseg][16]: the correction of the
  // AVX-512 VNNI kernels, which take x + 128 as vpdpbusd's unsigned operand (QActView::qu).
  const int32_t* wsum128 = nullptr;
};
constexpr int64_t kQTileRows = 16;
constexpr int64_t kCompactStepBytes = 40;

// One id per kernel family; a table row maps (ISA, id, batch) to a function.
enum class KernelId : int32_t { int8 = 0, int4, nm_float, nm_int8, nm_int4, csr_float, csr_int8, count };
const char* kernel_id_name(KernelId id);

struct WeightView {
  KernelId id = KernelId::count;
  int64_t N = 0, K = 0;  // true shape of the dense weight
  QuantView q;           // int8, int4, nm_int8, nm_int4
  NMView nm;             // nm_*
  CSRView csr;           // csr_*
  QTileView qt;          // int8, int4: built on first use of an int8-activation kernel
};

// -- one call -----------------------------------------------------------------------------------
// Activations quantized by the driver (once per call, before the threads split N) for rows that
// require kCallInt8Act: per row m and segment s (QTileView::seg elements of x, zero-padded to
// seg_pad), x[m, k] ~= q[m, s, k - s * seg] * scale[m, s], q in -127..127, sum = the sum of q.
struct QActView {
  const int8_t* q = nullptr;       // [M][nseg][seg_pad]
  const float* scale = nullptr;    // [M][nseg]; 0 for an all-zero segment
  const int32_t* sum = nullptr;    // [M][nseg]
  int64_t stride_m = 0;            // elements between rows of q = nseg * seg_pad
  const uint8_t* qu = nullptr;     // instead of q: the codes + 128 as unsigned bytes (quantized with flip
                                   // 0x80), for the AVX-512 VNNI int8 kernels (their unsigned operand)
};

struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const float* x = nullptr;      // fp32 [M, K], unit stride along K
  int64_t stride_xm = 0;         // elements between rows of x (may be 0: broadcast rows)
  const float* bias = nullptr;   // fp32 [N] or nullptr
  void* y = nullptr;             // [M, N] in y_dtype (f32 / bf16 / f16), unit stride along N
  DType y_dtype = DType::f32;
  int64_t stride_ym = 0;         // elements between rows of y
  QActView qx;                   // int8-activation rows only (see kCallInt8Act)
};

// Every kernel has this signature: columns [n_begin, n_end) of y, all M rows.
using KernelFn = Status (*)(const GemmArgs& args, const WeightView& w, int64_t n_begin, int64_t n_end);

// Activation conversion: src [rows, cols] (row stride src_stride elements, unit column stride)
// of dtype f32 / bf16 / f16 -> dst fp32 [rows, cols] contiguous.
using ConvertFn = void (*)(const void* src, DType dtype, int64_t rows, int64_t cols, int64_t src_stride,
                           float* dst);

// Activation quantization: fp32 x [rows, K] (row stride stride_x) -> QActView buffers, segments
// as in `t` (symmetric, round to nearest even, scale = max|x| / 127 per segment). Every byte of q
// (padding included) is stored XOR `flip`: 0x80 writes x + 128 as unsigned bytes (QActView::qu);
// sum is of the signed codes either way.
using QuantizeActFn = void (*)(const float* x, int64_t rows, int64_t K, int64_t stride_x, const QTileView& t,
                               int8_t* q, float* scale, int32_t* sum, uint8_t flip);

// Row tiles (ref/qtile_ref.cpp, ISA-free): the bytes build_qtiles needs, and the build itself into
// `buf` (64-byte aligned, qtile_bytes(q, N, bits) long). bits = 8 or 4.
size_t qtile_bytes(const QuantView& q, int64_t N, int bits);
QTileView build_qtiles(const QuantView& q, int64_t N, int bits, void* buf);
// Compact steps of built int8 row tiles (QTileView::compact). build_qtile_compact writes
// qtile_compact_bytes(t) bytes into buf and sets t.compact; false (t unchanged) when t is not int8
// or some lane's 4 codes of a step hold more than 2 non-zero ones.
bool qtile_compact_supported(const QTileView& t);
size_t qtile_compact_bytes(const QTileView& t);
bool build_qtile_compact(QTileView& t, void* buf);

// -- kernels, by ISA group ----------------------------------------------------------------------
// ref/: scalar, compiled with no ISA flags, always built. Each handles every M, every value dtype.
Status int8_gemm_scalar(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_gemm_scalar(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status nm_gemm_scalar(const GemmArgs&, const WeightView&, int64_t, int64_t);    // float, int8, int4 values
Status csr_gemm_scalar(const GemmArgs&, const WeightView&, int64_t, int64_t);   // float, int8 values
void convert_to_f32_scalar(const void*, DType, int64_t, int64_t, int64_t, float*);
// int8 activations (kCallInt8Act): the plain integer math the SIMD versions must reproduce bit for bit.
Status int8_q8_gemm_scalar(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_q8_gemm_scalar(const GemmArgs&, const WeightView&, int64_t, int64_t);
void quantize_act_scalar(const float*, int64_t, int64_t, int64_t, const QTileView&, int8_t*, float*, int32_t*,
                         uint8_t);
// ref/nm_q8_prepack_ref.cpp: the NMView::Q8 copy of a 2:4 + int8 / int4 weight (0 bytes: a layout the
// int8-activation N:M kernels do not take; the exact kernels serve it).
size_t nm_q8_prepack_bytes(const WeightView&);
NMView::Q8 nm_q8_prepack(const WeightView&, void* buf);
int64_t nm_q8_segment(const WeightView&);  // activation segment of that copy; 0: not supported
// Row tiles of a 2:4 + int8 / int4 weight made dense (pruned positions add nothing), in the segments
// above, for the int8 / int4 row-tile kernels: the same integers and the same fp32 steps as
// nm_q8_*_avx2, so the same bits (ref/qtile_ref.cpp). Supported: the layouts of that copy, K % 64 == 0.
bool nm_qtiles_supported(const WeightView&);
size_t nm_qtile_bytes(const WeightView&);
QTileView build_nm_qtiles(const WeightView&, void* buf);

// x86/avx2/, x86/avx512/, arm/neon/: declare <format>_<op>_<isa> functions here under
// #ifdef SPARSEINFER_HAVE_<ISA> and list them in that ISA's table in dispatch.cpp.
#ifdef SPARSEINFER_HAVE_AVX2
// int8 / int4, fp32 activations (exact): gemv = rows of codes decoded in registers, a few batch
// rows per decode (small batches); larger batches: the panel kernels below.
Status int8_gemv_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_gemv_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
// fp32 activations (exact), batches past the GEMV rows: panels decoded once per call into fp32 and
// 6 x 16 FMA tiles (sparseinfer/panel_gemm.h); N:M panels hold the zeros (dense FMA count).
Status int8_panel_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_panel_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status nm_panel_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
// N:M (float / int8 / int4 values) and CSR (float / int8 values), fp32 activations (exact):
// gemv = x gathered per batch row (few rows), gemm = x transposed, batch rows in vector lanes.
Status nm_gemv_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status nm_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status csr_gemv_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status csr_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
// 2:4 + int8 / int4 values, int8 activations (kCallInt8Act), quantized by the kernel itself with
// quantize_act_avx2 in segments that fit the N:M weight's groups (the driver's stage serves int8 / int4).
// gemv: 4 weight rows per register tile (few batch rows); gemm: 4 batch rows per tile. Same bits.
Status nm_q8_gemv_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status nm_q8_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
void convert_to_f32_avx2(const void*, DType, int64_t, int64_t, int64_t, float*);
// int8 activations on row tiles, pmaddubsw + pmaddwd (no VNNI), every batch size.
Status int8_q8_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_q8_gemm_avx2(const GemmArgs&, const WeightView&, int64_t, int64_t);
void quantize_act_avx2(const float*, int64_t, int64_t, int64_t, const QTileView&, int8_t*, float*, int32_t*, uint8_t);
#endif
#ifdef SPARSEINFER_HAVE_AVX512
// int8 activations on row tiles, vpdpbusd (files built with -mavx512vnni: rows require kFeatAvx512Vnni).
Status int8_q8_gemm_vnni_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_q8_gemm_vnni_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
// The same with the 4 x 64 register tile (measured candidates; qtile_ops_vnni_avx512.h).
Status int8_q8_gemm_vnni4x4_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_q8_gemm_vnni4x4_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
// The int8 GEMV (1-2 rows) on compact steps (QTileView::compact), rebuilt by vpexpandb (file built
// with -mavx512vnni -mavx512vbmi2: rows require kFeatAvx512Vbmi2 too).
Status int8_q8_compact_vnni_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
// fp32 activations (exact mode), every batch size.
Status int8_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
// fp32 activations (exact), batches past the GEMV rows: panels decoded once per call into fp32 and
// 8 x 32 FMA tiles (sparseinfer/panel_gemm.h).
Status int8_panel_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_panel_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
// N:M (float / int8 / int4 values) and float CSR on the same panels: the weight decoded dense, so
// twice the FMAs of 2:4 but at the tile's rate (measured-only rows: kMeasuredOnly).
Status nm_panel_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status csr_panel_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
// N:M (float / int8 / int4 values) and CSR (float / int8), many batch rows: x transposed, batch rows
// in zmm lanes, one FMA per kept value and 16 rows (sparse_gemm_avx512.cpp): half the FMAs of 2:4.
Status nm_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status csr_gemm_avx512(const GemmArgs&, const WeightView&, int64_t, int64_t);
// Row n of an int8 / int4 / N:M weight as fp32 (to_dense()'s values) into out[0, K); false: another
// format, or a layout it does not take (the scalar dequantize_row then serves it).
bool dequantize_row_avx512(const WeightView&, int64_t n, float* out);
// (activations are quantized by quantize_act_avx2 at this level too: the step is not the bottleneck)
#endif
#ifdef SPARSEINFER_HAVE_AMX
// int8 activations on the same row tiles, AMX tdpbssd / tdpbsud on 32 x 32 blocks (x86/amx/;
// rows require kFeatAmxInt8). The same bits as the scalar and VNNI kernels.
Status int8_q8_gemm_amx(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_q8_gemm_amx(const GemmArgs&, const WeightView&, int64_t, int64_t);
#endif
#ifdef SPARSEINFER_HAVE_NEON
// arm/neon/: aarch64 baseline ASIMD, fp32 activations, every batch size.
Status int8_gemm_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_gemm_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);
// fp32 activations (exact), batches past the GEMV rows: fp32 panels decoded once per call, 5 x 16 FMA
// tiles (sparseinfer/panel_gemm.h).
Status int8_panel_gemm_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_panel_gemm_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status nm_gemm_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);    // float, int8, int4 values
Status csr_gemm_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);   // float, int8 values
void convert_to_f32_neon(const void*, DType, int64_t, int64_t, int64_t, float*);
// int8 activations on row tiles, sdot (files built with -march=armv8.2-a+dotprod: rows require kFeatNeonDot).
Status int8_q8_gemm_dot_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);
Status int4_q8_gemm_dot_neon(const GemmArgs&, const WeightView&, int64_t, int64_t);
#endif

}  // namespace sparseinfer
