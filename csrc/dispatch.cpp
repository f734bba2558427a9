// Runtime dispatch: detect the CPU once, honour SPARSEINFER_ISA, pick a kernel from the tables,
// and run one call over the thread pool. Compiled with no ISA flags, like ref/.
//
// Adding a kernel (see csrc/README.md): write csrc/<arch>/<isa>/<format>_<op>_<isa>.cpp, declare
// it in kernels.h under SPARSEINFER_HAVE_<ISA>, and add a row to that ISA's table below. Rows are
// tried in order; the first whose id matches, whose max_m admits the batch and whose extra
// feature bits the CPU has wins, else the search goes on at the level below.
#include "sparseinfer/dispatch.h"
#include "sparseinfer/decode.h"

#include <atomic>
#include <cstring>
#include <mutex>

#include "sparseinfer/kernel_utils.h"
#include "sparseinfer/threadpool.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define SPARSEINFER_X86 1
#if defined(__GNUC__) || defined(__clang__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#elif defined(__aarch64__)
#define SPARSEINFER_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#endif

namespace sparseinfer {

// -- names ----------------------------------------------------------------------------------------

const char* status_message(Status s) {
  switch (s) {
    case Status::ok: return "ok";
    case Status::invalid_argument: return "invalid argument (a size or layout invariant does not hold)";
    case Status::unsupported_dtype: return "unsupported dtype for this kernel";
    case Status::no_kernel: return "no kernel for this format on this ISA";
    case Status::out_of_memory: return "out of memory (scratch buffer)";
    default: return "internal error";
  }
}

const char* dtype_name(DType d) {
  static const char* names[] = {"float32", "bfloat16", "float16", "int8", "uint8", "int32", "int64", "unknown"};
  const int i = int(d);
  return i >= 0 && i <= int(DType::unknown) ? names[i] : "unknown";
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::neon: return "neon";
    default: return "unknown";
  }
}

const char* kernel_id_name(KernelId id) {
  static const char* names[] = {"int8", "int4", "nm_float", "nm_int8", "nm_int4", "csr_float", "csr_int8"};
  const int i = int(id);
  return i >= 0 && i < int(KernelId::count) ? names[i] : "unknown";
}

bool parse_isa(const std::string& name, Isa* out) {
  if (name == "scalar" || name == "ref") return *out = Isa::scalar, true;
  if (name == "avx2") return *out = Isa::avx2, true;
  if (name == "avx512") return *out = Isa::avx512, true;
  if (name == "neon") return *out = Isa::neon, true;
  return false;
}

// -- CPU detection --------------------------------------------------------------------------------

namespace {

#if SPARSEINFER_X86 && (defined(__GNUC__) || defined(__clang__))
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));  // no -mxsave needed, unlike _xgetbv
  return (uint64_t(edx) << 32) | eax;
}

// AMX tile data is a dynamically enabled state on Linux (5.16+): a process must ask for it once
// (arch_prctl ARCH_REQ_XCOMP_PERM) before any thread executes a tile instruction, or it gets SIGILL.
bool amx_granted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

uint64_t detect_features() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!osxsave || !avx) return 0;
  // The OS must save the registers too: XCR0 bits 1-2 (XMM, YMM), 5-7 (opmask, ZMM).
  const uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6, os_zmm = (xcr0 & 0xE6) == 0xE6;
  if (__get_cpuid_max(0, nullptr) < 7) return 0;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512cd = b & (1u << 28), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31),
             avx512vnni = c & (1u << 11), avx512vbmi2 = c & (1u << 6);
  const bool amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25);
  const unsigned max_sub = a;
  bool avxvnni = false, avx512bf16 = false;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    avxvnni = a & (1u << 4), avx512bf16 = a & (1u << 5);
  }
  uint64_t f = 0;
  if (os_ymm && avx2 && fma && f16c) f |= kFeatAvx2;
  if (os_ymm && avxvnni) f |= kFeatAvxVnni;
  if ((f & kFeatAvx2) && os_zmm && avx512f && avx512bw && avx512vl && avx512dq && avx512cd) {
    f |= kFeatAvx512;
    if (avx512vnni) f |= kFeatAvx512Vnni;
    if (avx512vbmi2) f |= kFeatAvx512Vbmi2;
    if (avx512bf16) f |= kFeatAvx512Bf16;
    // XCR0 bits 17-18: the OS manages the tile configuration and data
    if (amx_tile && amx_int8 && (xcr0 & 0x60000) == 0x60000 && amx_granted()) f |= kFeatAmxInt8;
  }
  return f;
}
#elif SPARSEINFER_ARM64
uint64_t detect_features() {
  uint64_t f = kFeatNeon;  // ASIMD is part of the aarch64 baseline
#if defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  if (!(hw & (1ul << 1))) f &= ~uint64_t(kFeatNeon);  // HWCAP_ASIMD (in practice set everywhere)
  if (hw & (1ul << 20)) f |= kFeatNeonDot;    // HWCAP_ASIMDDP
  if (hw2 & (1ul << 13)) f |= kFeatNeonI8mm;  // HWCAP2_I8MM
  if (hw2 & (1ul << 14)) f |= kFeatNeonBf16;  // HWCAP2_BF16
#elif defined(__APPLE__)
  auto has = [](const char* name) {
    int v = 0;
    size_t len = sizeof(v);
    return sysctlbyname(name, &v, &len, nullptr, 0) == 0 && v != 0;
  };
  if (has("hw.optional.arm.FEAT_DotProd")) f |= kFeatNeonDot;
  if (has("hw.optional.arm.FEAT_I8MM")) f |= kFeatNeonI8mm;
  if (has("hw.optional.arm.FEAT_BF16")) f |= kFeatNeonBf16;
#endif
  return f;
}
#else
uint64_t detect_features() { return 0; }
#endif

}  // namespace

uint64_t cpu_features() {
  static const uint64_t features = detect_features();  // once (FBGEMM's `static const auto iset`)
  return features;
}

const char* cpu_arch() {
#if SPARSEINFER_X86
  return "x86_64";
#elif SPARSEINFER_ARM64
  return "aarch64";
#else
  return "other";
#endif
}

std::vector<std::pair<std::string, bool>> cpu_feature_list() {
  const uint64_t f = cpu_features();
#if SPARSEINFER_X86
  return {{"avx2", bool(f & kFeatAvx2)},
          {"avx512", bool(f & kFeatAvx512)},
          {"avx_vnni", bool(f & kFeatAvxVnni)},
          {"avx512_vnni", bool(f & kFeatAvx512Vnni)},
          {"avx512_vbmi2", bool(f & kFeatAvx512Vbmi2)},
          {"avx512_bf16", bool(f & kFeatAvx512Bf16)},
          {"amx_int8", bool(f & kFeatAmxInt8)}};
#elif SPARSEINFER_ARM64
  return {{"neon", bool(f & kFeatNeon)},
          {"dotprod", bool(f & kFeatNeonDot)},
          {"i8mm", bool(f & kFeatNeonI8mm)},
          {"bf16", bool(f & kFeatNeonBf16)}};
#else
  (void)f;
  return {};
#endif
}

// -- kernel tables --------------------------------------------------------------------------------

namespace {

constexpr int64_t kAnyM = INT64_MAX;

const KernelImpl kScalarKernels[] = {
    // int8 activations (ActMode::int8) come first: they win whenever the call allows them.
    {KernelId::int8, int8_q8_gemm_scalar, "int8_q8_gemm_scalar", kAnyM, kCallInt8Act},
    {KernelId::int4, int4_q8_gemm_scalar, "int4_q8_gemm_scalar", kAnyM, kCallInt8Act},
    // 2:4 + int8 / int4 on their dense row tiles (build_nm_qtiles): the reference of the SIMD rows below
    {KernelId::nm_int8, int8_q8_gemm_scalar, "nm_int8_q8_tiles_scalar", kAnyM, kCallInt8Act | kReadsQTiles},
    {KernelId::nm_int4, int4_q8_gemm_scalar, "nm_int4_q8_tiles_scalar", kAnyM, kCallInt8Act | kReadsQTiles},
    {KernelId::int8, int8_gemm_scalar, "int8_gemm_scalar", kAnyM, 0},
    {KernelId::int4, int4_gemm_scalar, "int4_gemm_scalar", kAnyM, 0},
    {KernelId::nm_float, nm_gemm_scalar, "nm_gemm_scalar", kAnyM, 0},
    {KernelId::nm_int8, nm_gemm_scalar, "nm_int8_gemm_scalar", kAnyM, 0},
    {KernelId::nm_int4, nm_gemm_scalar, "nm_int4_gemm_scalar", kAnyM, 0},
    {KernelId::csr_float, csr_gemm_scalar, "csr_gemm_scalar", kAnyM, 0},
    {KernelId::csr_int8, csr_gemm_scalar, "csr_int8_gemm_scalar", kAnyM, 0},
};

#ifdef SPARSEINFER_HAVE_AVX2
const KernelImpl kAvx2Kernels[] = {
    // int8 weights, int8 x: pmaddubsw needs a psignb per multiply on AVX2, and from ~32 rows the exact
    // fp32 gemm (which the mode permits, not requires) is faster: q8 / exact time at 4096x4096 was
    // 0.64 (2 rows), 0.97 (16), 1.10 (32), 1.17 (64); 0.99 / 1.33 at 16 / 32 rows on 1536x384 (exact:
    // int8_gemm_avx2, the panel kernel's predecessor).
    {KernelId::int8, int8_q8_gemm_avx2, "int8_q8_gemm_avx2", 16, kCallInt8Act},
    // ... but not on every core: on a Xeon with MKL held to AVX2 it ran 1.06-1.14x MKL at 33 rows where the
    // exact panel kernel ran 0.66-0.93x, so past the limit it stays a measured candidate (MiniLM int8,
    // one sentence: 0.91x -> 1.17-1.37x dense; bench/README.md).
    {KernelId::int8, int8_q8_gemm_avx2, "int8_q8_gemm_avx2_wide", kAnyM, kCallInt8Act | kMeasuredOnly, 17},
    {KernelId::int4, int4_q8_gemm_avx2, "int4_q8_gemm_avx2", kAnyM, kCallInt8Act},
    // fp32 activations (exact): registers-only gemv while re-decoding the codes per 3 batch rows
    // beats decoding them once into fp32 panels (4096x4096, this Zen 1 VM: int8 up to 8, int4 up to 3),
    // then fp32 panels decoded once per call + 6 x 16 FMA tiles (panel_gemm_avx2.cpp).
    {KernelId::int8, int8_gemv_avx2, "int8_gemv_avx2", 8, 0},
    {KernelId::int4, int4_gemv_avx2, "int4_gemv_avx2", 3, 0},
    {KernelId::int8, int8_panel_gemm_avx2, "int8_panel_gemm_avx2", kAnyM, 0},
    {KernelId::int4, int4_panel_gemm_avx2, "int4_panel_gemm_avx2", kAnyM, 0},
    // N:M and CSR (x86/avx2/nm_*, csr_*): gemv while x gathered per batch row beats xT, then gemm;
    // batch limits measured on 4096x4096 here (docs/sparse_cpu.md); `sparseinfer calibrate` re-measures them.
    {KernelId::nm_float, nm_gemv_avx2, "nm_gemv_avx2", 10, 0},
    {KernelId::nm_float, nm_gemm_avx2, "nm_gemm_avx2", kAnyM, 0},
    // float N:M on dense fp32 panels (panel_gemm_avx2.cpp): twice the FMAs, no transposed x; ahead of
    // nm_gemm_avx2 at K = 4096 (1.8-2.2x at M = 64-256) and behind it at K <= 1536 (0.79-1.02x; Zen 4
    // running AVX2, 1 thread, bench/README.md): a measured candidate, chosen per layer shape by the routes.
    {KernelId::nm_float, nm_panel_gemm_avx2, "nm_panel_gemm_avx2", kAnyM, kMeasuredOnly},
    {KernelId::nm_int8, nm_q8_gemv_avx2, "nm_int8_q8_gemv_avx2", 2, kCallInt8Act},
    {KernelId::nm_int8, nm_q8_gemm_avx2, "nm_int8_q8_gemm_avx2", kAnyM, kCallInt8Act},
    {KernelId::nm_int8, nm_gemv_avx2, "nm_int8_gemv_avx2", 10, 0},
    {KernelId::nm_int8, nm_gemm_avx2, "nm_int8_gemm_avx2", kAnyM, 0},
    {KernelId::nm_int4, nm_q8_gemv_avx2, "nm_int4_q8_gemv_avx2", 2, kCallInt8Act},
    // 2:4 + int4 from 3 rows: the weight made dense on int4 row tiles (build_nm_qtiles), twice the
    // multiply-adds at int4_q8_gemm_avx2's rate and no gather: 1.14-3.9x MKL's AVX2 sgemm on the MiniLM
    // shapes at 3-736 rows where the N:M kernel ran 0.71-2.5x, 2.0-6.6x on 4096x4096 at 3-256 rows
    // (N:M 1.3-6.4x; a Xeon with MKL and ATen held to AVX2, 2 threads, hot, bench/README.md). The
    // N:M kernel serves the layouts without tiles (K not a multiple of 64, other N:M). 2:4 + int8 has no
    // such row: its codes need a psignb per multiply here, and on its tiles (int8_q8_gemm_avx2) it ran
    // 0.95-2.1x MKL against the N:M kernel's 0.8-2.2x, behind it at 3 rows on 4096x4096 and at dense's
    // speed past 256 rows, where the routes take dense (bench/README.md).
    {KernelId::nm_int4, int4_q8_gemm_avx2, "nm_int4_q8_tiles_avx2", kAnyM, kCallInt8Act | kReadsQTiles},
    {KernelId::nm_int4, nm_q8_gemm_avx2, "nm_int4_q8_gemm_avx2", kAnyM, kCallInt8Act},
    {KernelId::nm_int4, nm_gemv_avx2, "nm_int4_gemv_avx2", 10, 0},
    {KernelId::nm_int4, nm_gemm_avx2, "nm_int4_gemm_avx2", kAnyM, 0},
    {KernelId::csr_float, csr_gemv_avx2, "csr_gemv_avx2", 3, 0},
    {KernelId::csr_float, csr_gemm_avx2, "csr_gemm_avx2", kAnyM, 0},
    {KernelId::csr_int8, csr_gemv_avx2, "csr_int8_gemv_avx2", 3, 0},
    {KernelId::csr_int8, csr_gemm_avx2, "csr_int8_gemm_avx2", kAnyM, 0},
};
#endif

#ifdef SPARSEINFER_HAVE_AVX512
// x86/avx512/: vpdpbusd for int8 activations (without VNNI they fall back to the AVX2 rows), and
// fp32 activations on the same row tiles' canonical source for the exact mode.
const KernelImpl kAvx512Kernels[] = {
    // 2:4 + int8, int8 x, 1-2 rows (memory-bound): the dense row tiles' GEMV on their compact steps
    // (kernels.h, QTileView::compact), 5 bits a weight read instead of 8: 1.13-1.38x the dense steps
    // on cold layers, Xeon (Emerald Rapids), 2 threads (q8_compact_vnni_avx512.cpp).
    {KernelId::nm_int8, int8_q8_compact_vnni_avx512, "nm_int8_q8_compact_vnni_avx512", 2,
     kCallInt8Act | kFeatAvx512Vnni | kFeatAvx512Vbmi2 | kReadsQTiles | kReadsCompactTiles},
    // and the dense steps at those rows as a measured candidate (the routes time both per layer shape):
    // from L2 the expansion costs more than the bytes it saves, and its cost differs by core
    {KernelId::nm_int8, int8_q8_gemm_vnni_avx512, "nm_int8_q8_dense_steps_vnni_avx512", 2,
     kCallInt8Act | kFeatAvx512Vnni | kFeatAvx512Vbmi2 | kReadsQTiles | kMeasuredOnly},
#ifdef SPARSEINFER_HAVE_AMX
    // AMX (x86/amx/): one 16 x 16 x 64 tile product per instruction where vpdpbusd does 16 x 4, but
    // a batch is padded to 16 rows (and int4 codes are unpacked per call), so the VNNI kernel stays
    // ahead for a few rows. AMX / VNNI time, 1 thread, Xeon with AMX (bench/README.md): int8 0.8-0.9
    // at 1-2 rows, 1.1-1.8 at 8, 1.3-2.3 at 16, 1.6-2.7 at 64-256; int4 0.4-0.7 at 1, 0.7-1.3 at 8,
    // 1.1-1.8 at 16, 1.6-2.2 at 64-256 (4096x4096 and the MiniLM shapes). The small-batch rows
    // run the VNNI kernel under their own name so that `sparseinfer calibrate` can move the crossover.
    {KernelId::int8, int8_q8_gemm_vnni_avx512, "int8_q8_gemv_vnni_avx512", 6, kCallInt8Act | kFeatAmxInt8},
    {KernelId::int8, int8_q8_gemm_amx, "int8_q8_gemm_amx", kAnyM, kCallInt8Act | kFeatAmxInt8},
    {KernelId::int4, int4_q8_gemm_vnni_avx512, "int4_q8_gemv_vnni_avx512", 12, kCallInt8Act | kFeatAmxInt8},
    {KernelId::int4, int4_q8_gemm_amx, "int4_q8_gemm_amx", kAnyM, kCallInt8Act | kFeatAmxInt8},
    {KernelId::nm_int8, int8_q8_gemm_vnni_avx512, "nm_int8_q8_tiles_gemv_vnni_avx512", 6,
     kCallInt8Act | kFeatAmxInt8 | kReadsQTiles},
    {KernelId::nm_int8, int8_q8_gemm_amx, "nm_int8_q8_tiles_amx", kAnyM, kCallInt8Act | kFeatAmxInt8 | kReadsQTiles},
    {KernelId::nm_int4, int4_q8_gemm_vnni_avx512, "nm_int4_q8_tiles_gemv_vnni_avx512", 12,
     kCallInt8Act | kFeatAmxInt8 | kReadsQTiles},
    {KernelId::nm_int4, int4_q8_gemm_amx, "nm_int4_q8_tiles_amx", kAnyM, kCallInt8Act | kFeatAmxInt8 | kReadsQTiles},
#endif
    {KernelId::int8, int8_q8_gemm_vnni_avx512, "int8_q8_gemm_vnni_avx512", kAnyM, kCallInt8Act | kFeatAvx512Vnni},
    {KernelId::int4, int4_q8_gemm_vnni_avx512, "int4_q8_gemm_vnni_avx512", kAnyM, kCallInt8Act | kFeatAvx512Vnni},
#ifdef SPARSEINFER_HAVE_AVX2
    // AVX-512 without VNNI (Skylake-X): the int8 mode still runs int8 math, not the exact rows below
    // (the AVX2 table's 16-row limit was measured against the AVX2 exact gemm; not measured here).
    {KernelId::int8, int8_q8_gemm_avx2, "int8_q8_gemm_avx2", kAnyM, kCallInt8Act},
    {KernelId::int4, int4_q8_gemm_avx2, "int4_q8_gemm_avx2", kAnyM, kCallInt8Act},
#endif
    // 2:4 + int8 / int4, int8 x: the weight made dense on row tiles (twice the multiply-adds, at the
    // VNNI rate, no gather) beat nm_q8_*_avx2 at every batch here, 1.4-7x at 1 row (hot) and 2-12x
    // from 2 to 256 rows (4096^2 and MiniLM shapes, Zen 4, 2 threads); the same bits (build_nm_qtiles).
    {KernelId::nm_int8, int8_q8_gemm_vnni_avx512, "nm_int8_q8_tiles_vnni_avx512", kAnyM,
     kCallInt8Act | kFeatAvx512Vnni | kReadsQTiles},
    {KernelId::nm_int4, int4_q8_gemm_vnni_avx512, "nm_int4_q8_tiles_vnni_avx512", kAnyM,
     kCallInt8Act | kFeatAvx512Vnni | kReadsQTiles},
    // Exact mode: rows decoded in registers (GEMV) for a few batch rows, then fp32 panels decoded
    // once per call + 8 x 32 FMA tiles (panel_gemm_avx512.cpp). Limit: the panel path was ahead from 4
    // rows on 4096x4096 (int8; int4 from 6) and from 2-4 rows on 1536x384 (Zen 4, 1 thread, bench/README.md).
    {KernelId::int8, int8_gemm_avx512, "int8_gemm_avx512", 3, 0},
    {KernelId::int8, int8_panel_gemm_avx512, "int8_panel_gemm_avx512", kAnyM, 0},
    {KernelId::int4, int4_gemm_avx512, "int4_gemm_avx512", 3, 0},
    {KernelId::int4, int4_panel_gemm_avx512, "int4_panel_gemm_avx512", kAnyM, 0},
#ifdef SPARSEINFER_HAVE_AVX2
    // Float N:M and CSR, exact: the AVX2 gemv for a few rows, then the xT GEMM on zmm
    // (sparse_gemm_avx512.cpp: one FMA per kept value and 16 batch rows). Xeon with AVX-512, 1 thread,
    // hot (bench/README.md): 2:4 at 1.0-1.4x torch fp32 from 11 rows where the panel GEMM (2:4 decoded
    // dense, twice the FMAs) ran 0.6-0.9x; ahead of the gemv from 8 rows (2:4) and 4-8 rows (CSR).
    // The FMAs take their xT operand from L1, about 1.4 a cycle against the dense tile's 2.3, so 2:4
    // stays near 1.0-1.3x of a dense GEMM on this ISA; CSR pays off from ~70 % sparsity.
    // The gemv rows carry this level's name: batch limits are set by name (`sparseinfer calibrate`),
    // and the AVX2 level's rows of the same kernels have their own limits.
    {KernelId::nm_float, nm_gemv_avx2, "nm_gemv_avx2_avx512", 7, 0},
    {KernelId::nm_float, nm_gemm_avx512, "nm_gemm_avx512", kAnyM, 0},
    {KernelId::csr_float, csr_gemv_avx2, "csr_gemv_avx2_avx512", 5, 0},
    {KernelId::csr_float, csr_gemm_avx512, "csr_gemm_avx512", kAnyM, 0},
    {KernelId::csr_int8, csr_gemv_avx2, "csr_int8_gemv_avx2_avx512", 5, 0},
    {KernelId::csr_int8, csr_gemm_avx512, "csr_int8_gemm_avx512", kAnyM, 0},
    // Measured candidates (kMeasuredOnly): the routes of cpu_routes.py time them per layer shape.
    {KernelId::nm_float, nm_panel_gemm_avx512, "nm_panel_gemm_avx512", kAnyM, kMeasuredOnly},
    {KernelId::nm_float, nm_gemm_avx2, "nm_gemm_avx2", kAnyM, kMeasuredOnly},
    {KernelId::csr_float, csr_gemm_avx2, "csr_gemm_avx2", kAnyM, kMeasuredOnly},
    {KernelId::csr_float, csr_panel_gemm_avx512, "csr_panel_gemm_avx512", kAnyM, kMeasuredOnly},
    {KernelId::csr_int8, csr_gemm_avx2, "csr_int8_gemm_avx2", kAnyM, kMeasuredOnly},
#endif
    // N:M with int8 / int4 values in exact mode: the table's AVX2 rows, and the panel GEMM and the xT
    // GEMM as measured candidates (bench/README.md).
    {KernelId::nm_int8, nm_panel_gemm_avx512, "nm_int8_panel_gemm_avx512", kAnyM, kMeasuredOnly},
    {KernelId::nm_int4, nm_panel_gemm_avx512, "nm_int4_panel_gemm_avx512", kAnyM, kMeasuredOnly},
    {KernelId::nm_int8, nm_gemm_avx512, "nm_int8_gemm_avx512", kAnyM, kMeasuredOnly},
    {KernelId::nm_int4, nm_gemm_avx512, "nm_int4_gemm_avx512", kAnyM, kMeasuredOnly},
    // int8 activations with the 4 x 64 register tile (qtile_ops_vnni_avx512.h: ahead on Zen 5, behind
    // the table's 8 x 48 tile on the Xeon without AMX); 1-2 rows run the same GEMV in both.
    {KernelId::int8, int8_q8_gemm_vnni4x4_avx512, "int8_q8_gemm_vnni4x4_avx512", kAnyM,
     kCallInt8Act | kFeatAvx512Vnni | kMeasuredOnly, 3},
    {KernelId::int4, int4_q8_gemm_vnni4x4_avx512, "int4_q8_gemm_vnni4x4_avx512", kAnyM,
     kCallInt8Act | kFeatAvx512Vnni | kMeasuredOnly, 3},
    {KernelId::nm_int8, int8_q8_gemm_vnni4x4_avx512, "nm_int8_q8_tiles_vnni4x4_avx512", kAnyM,
     kCallInt8Act | kFeatAvx512Vnni | kReadsQTiles | kMeasuredOnly, 3},
    {KernelId::nm_int4, int4_q8_gemm_vnni4x4_avx512, "nm_int4_q8_tiles_vnni4x4_avx512", kAnyM,
     kCallInt8Act | kFeatAvx512Vnni | kReadsQTiles | kMeasuredOnly, 3},
};
#endif

#ifdef SPARSEINFER_HAVE_NEON
// Every batch size (batch rows in tiles of 4 share each decoded weight row); fp32 accumulation.
const KernelImpl kNeonKernels[] = {
    // int8 activations with sdot; without dotprod, int8-activation calls run the fp32 rows below.
    {KernelId::int8, int8_q8_gemm_dot_neon, "int8_q8_gemm_dot_neon", kAnyM, kCallInt8Act | kFeatNeonDot},
    {KernelId::int4, int4_q8_gemm_dot_neon, "int4_q8_gemm_dot_neon", kAnyM, kCallInt8Act | kFeatNeonDot},
    // 2:4 + int8 / int4, int8 x: the weight made dense on row tiles (build_nm_qtiles) and run by the sdot
    // kernels above, as AVX-512 VNNI does (twice the multiply-adds at sdot's 16 a lane-instruction, no
    // gather; the same bits as the scalar tiles). Not timed on an ARM core: every first use on one
    // measures it against dense (cpu_routes.py). Layouts without tiles run the exact N:M rows below.
    {KernelId::nm_int8, int8_q8_gemm_dot_neon, "nm_int8_q8_tiles_dot_neon", kAnyM,
     kCallInt8Act | kFeatNeonDot | kReadsQTiles},
    {KernelId::nm_int4, int4_q8_gemm_dot_neon, "nm_int4_q8_tiles_dot_neon", kAnyM,
     kCallInt8Act | kFeatNeonDot | kReadsQTiles},
    // Exact mode: the GEMV loops (a weight row decoded per 4 batch rows) up to 3 rows, then fp32 panels
    // decoded once per call + 5 x 16 FMA tiles (panel_gemm_neon.cpp). The limit is AVX-512's (panels ahead
    // from 4 rows there), not measured on an ARM core: `sparseinfer calibrate` re-measures it.
    {KernelId::int8, int8_gemm_neon, "int8_gemm_neon", 3, 0},
    {KernelId::int8, int8_panel_gemm_neon, "int8_panel_gemm_neon", kAnyM, 0},
    {KernelId::int4, int4_gemm_neon, "int4_gemm_neon", 3, 0},
    {KernelId::int4, int4_panel_gemm_neon, "int4_panel_gemm_neon", kAnyM, 0},
    {KernelId::nm_float, nm_gemm_neon, "nm_gemm_neon", kAnyM, 0},
    {KernelId::nm_int8, nm_gemm_neon, "nm_int8_gemm_neon", kAnyM, 0},
    {KernelId::nm_int4, nm_gemm_neon, "nm_int4_gemm_neon", kAnyM, 0},
    {KernelId::csr_float, csr_gemm_neon, "csr_gemm_neon", kAnyM, 0},
    {KernelId::csr_int8, csr_gemm_neon, "csr_int8_gemm_neon", kAnyM, 0},
};
#endif

struct IsaLevel {
  Isa isa;
  uint64_t requires;  // feature bits the CPU must have to run anything of this level
  Isa fallback;       // where to look when this level has no matching row (scalar: none)
  const KernelImpl* kernels;
  size_t count;
  ConvertFn convert;  // nullptr: use the fallback's
  bool compiled;
};

#define SI_TABLE(t) t, sizeof(t) / sizeof(t[0])
const IsaLevel kLevels[int(Isa::count)] = {
    {Isa::scalar, 0, Isa::scalar, SI_TABLE(kScalarKernels), convert_to_f32_scalar, true},
#ifdef SPARSEINFER_HAVE_AVX2
    {Isa::avx2, kFeatAvx2, Isa::scalar, SI_TABLE(kAvx2Kernels), convert_to_f32_avx2, true},
#else
    {Isa::avx2, kFeatAvx2, Isa::scalar, nullptr, 0, nullptr, false},
#endif
#ifdef SPARSEINFER_HAVE_AVX512
    {Isa::avx512, kFeatAvx512 | kFeatAvx2, Isa::avx2, SI_TABLE(kAvx512Kernels), nullptr, true},
#else
    {Isa::avx512, kFeatAvx512 | kFeatAvx2, Isa::avx2, nullptr, 0, nullptr, false},
#endif
#ifdef SPARSEINFER_HAVE_NEON  // the group builds only on aarch64
    {Isa::neon, kFeatNeon, Isa::scalar, SI_TABLE(kNeonKernels), convert_to_f32_neon, true},
#else
    {Isa::neon, kFeatNeon, Isa::scalar, nullptr, 0, nullptr, false},
#endif
};
#undef SI_TABLE

const IsaLevel& level(Isa isa) { return kLevels[int(isa)]; }

}  // namespace

std::vector<Isa> compiled_isas() {
  std::vector<Isa> out;
  for (const IsaLevel& l : kLevels)
    if (l.compiled) out.push_back(l.isa);
  return out;
}

bool isa_available(Isa isa) {
  if (int(isa) < 0 || int(isa) >= int(Isa::count)) return false;
  const IsaLevel& l = level(isa);
  return l.compiled && (cpu_features() & l.requires) == l.requires;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (const IsaLevel& l : kLevels)
    if (isa_available(l.isa)) out.push_back(l.isa);
  return out;
}

namespace {

std::string join_isas(const std::vector<Isa>& isas) {
  std::string s;
  for (Isa i : isas) s += (s.empty() ? "" : ", ") + std::string(isa_name(i));
  return s;
}

struct ActiveIsa {
  Isa isa = Isa::scalar;
  std::string error;  // non-empty: SPARSEINFER_ISA asked for something we cannot honour
};

ActiveIsa resolve_active_isa() {
  ActiveIsa r;
  const std::vector<Isa> avail = available_isas();
  r.isa = avail.back();  // the table is ordered; on x86 avx512 > avx2 > scalar
  const char* env = std::getenv("SPARSEINFER_ISA");
  if (!env || !*env || std::string(env) == "auto") return r;
  Isa want;
  if (!parse_isa(env, &want)) {
    r.error = std::string("SPARSEINFER_ISA='") + env +
              "' is not a known ISA; use one of scalar, avx2, avx512, neon or auto (available here: " +
              join_isas(avail) + ")";
  } else if (!isa_available(want)) {
    const bool built = level(want).compiled;
    r.error = std::string("SPARSEINFER_ISA='") + env + "' is not available here: " +
              (built ? std::string("this ") + cpu_arch() + " CPU does not support it"
                     : std::string("this build has no ") + isa_name(want) + " kernels") +
              " (available: " + join_isas(avail) + ")";
  } else {
    r.isa = want;
  }
  return r;
}

}  // namespace

bool active_isa(Isa* out, std::string* error) {
  static const ActiveIsa active = resolve_active_isa();  // the environment is read once
  if (!active.error.empty()) {
    if (error) *error = active.error;
    return false;
  }
  *out = active.isa;
  return true;
}

// -- activation modes -----------------------------------------------------------------------------

// The one set of names, in sparseinfer/act.py's order (tests/test_act.py checks they agree).
const std::vector<std::string>& act_mode_names() {
  static const std::vector<std::string> names = {"auto", "fp32", "int8"};
  return names;
}

bool parse_act_mode(const std::string& name, ActMode* out) {
  if (name == "auto") return *out = ActMode::auto_, true;
  if (name == "fp32") return *out = ActMode::fp32, true;
  if (name == "int8") return *out = ActMode::int8, true;
  return false;
}

const char* act_mode_name(ActMode mode) {
  switch (mode) {
    case ActMode::auto_: return "auto";
    case ActMode::int8: return "int8";
    default: return "fp32";
  }
}

// auto and int8 select alike: the tables list an int8-activation row only where it beats the exact
// rows after it (batch limits), so "int8 where it is faster" is the first matching row either way.
uint64_t act_call_bits(ActMode mode) { return mode == ActMode::fp32 ? 0 : uint64_t(kCallInt8Act); }

// Batch limits measured on the machine at run time (set_batch_limit) replace the tables' built-in
// ones: per level and row, 0 = the table's max_m, else limit + 1. Relaxed atomics: a call racing a
// change runs either kernel, both correct.
namespace {
constexpr size_t kMaxRowsPerLevel = 64;
std::atomic<int64_t> g_limit_override[int(Isa::count)][kMaxRowsPerLevel];

int64_t row_limit(Isa l, size_t i, const KernelImpl& k) {
  const int64_t v = i < kMaxRowsPerLevel ? g_limit_override[int(l)][i].load(std::memory_order_relaxed) : 0;
  return v ? v - 1 : k.max_m;
}
}  // namespace

// (a kMeasuredOnly row never matches here: `features` lacks that bit)
const KernelImpl* select_kernel(KernelId id, Isa isa, int64_t M, uint64_t call) {
  const uint64_t features = cpu_features() | call;
  for (Isa l = isa;; l = level(l).fallback) {
    const IsaLevel& lv = level(l);
    for (size_t i = 0; i < lv.count; ++i) {
      const KernelImpl& k = lv.kernels[i];
      if (k.id == id && M <= row_limit(l, i, k) && (features & k.requires) == k.requires) return &k;
    }
    if (l == Isa::scalar) return nullptr;
  }
}

const KernelImpl* find_kernel(const char* name, KernelId id, Isa isa, uint64_t call) {
  const uint64_t features = cpu_features() | call | kMeasuredOnly;
  for (Isa l = isa;; l = level(l).fallback) {
    const IsaLevel& lv = level(l);
    for (size_t i = 0; i < lv.count; ++i) {
      const KernelImpl& k = lv.kernels[i];
      if (k.id == id && (features & k.requires) == k.requires && std::strcmp(k.name, name) == 0) return &k;
    }
    if (l == Isa::scalar) return nullptr;
  }
}

std::vector<const KernelImpl*> kernel_candidates(KernelId id, Isa isa, int64_t M, uint64_t call) {
  std::vector<const KernelImpl*> out;
  if (const KernelImpl* pick = select_kernel(id, isa, M, call)) out.push_back(pick);
  // measured-only rows down to the first level that lists the family: a level that has its own
  // rows for it supersedes the alternatives of the levels below (AVX-512's N:M panel over AVX2's)
  const uint64_t features = cpu_features() | call | kMeasuredOnly;
  for (Isa l = isa;; l = level(l).fallback) {
    const IsaLevel& lv = level(l);
    bool listed = false;
    for (size_t i = 0; i < lv.count; ++i) {
      const KernelImpl& k = lv.kernels[i];
      if (k.id != id || (features & k.requires) != k.requires) continue;
      listed = true;
      if ((k.requires & kMeasuredOnly) && M <= row_limit(l, i, k) && M >= k.min_m) out.push_back(&k);
    }
    if (listed || l == Isa::scalar) return out;
  }
}

std::vector<KernelRow> kernel_rows(Isa isa) {
  std::vector<KernelRow> out;
  for (Isa l = isa;; l = level(l).fallback) {
    const IsaLevel& lv = level(l);
    for (size_t i = 0; i < lv.count; ++i) {
      const KernelImpl& k = lv.kernels[i];
      const uint64_t cpu_bits = k.requires & kCpuFeatureBits;
      if ((cpu_features() & cpu_bits) != cpu_bits) continue;  // not on this CPU
      out.push_back({&k, l, row_limit(l, i, k)});
    }
    if (l == Isa::scalar) return out;
  }
}

bool set_batch_limit(const std::string& name, int64_t max_m) {
  bool found = false;
  for (const IsaLevel& lv : kLevels)
    for (size_t i = 0; i < lv.count && i < kMaxRowsPerLevel; ++i)
      if (name == lv.kernels[i].name) {
        g_limit_override[int(lv.isa)][i].store(max_m < 0 ? 0 : max_m + 1, std::memory_order_relaxed);
        found = true;
      }
  return found;
}

DequantizeRowFn active_dequantize_row() {
#ifdef SPARSEINFER_HAVE_AVX512
  Isa isa;
  if (active_isa(&isa, nullptr) && isa == Isa::avx512) return dequantize_row_avx512;
#endif
  return nullptr;
}

DecodeOps decode_ops(Isa isa) {
  switch (isa) {
#ifdef SPARSEINFER_HAVE_AVX512
    case Isa::avx512: return decode_ops_avx512();
#endif
#ifdef SPARSEINFER_HAVE_AVX2
#ifndef SPARSEINFER_HAVE_AVX512
    case Isa::avx512:
#endif
    case Isa::avx2: return decode_ops_avx2();
#endif
#ifdef SPARSEINFER_HAVE_NEON
    case Isa::neon: return decode_ops_neon();
#endif
    default: return decode_ops_scalar();
  }
}

// -- the driver -----------------------------------------------------------------------------------

namespace {

ConvertFn select_convert(Isa isa) {
  for (Isa l = isa;; l = level(l).fallback) {
    if (level(l).convert) return level(l).convert;
    if (l == Isa::scalar) return convert_to_f32_scalar;
  }
}

// The activation quantizer of an ISA level (the same bits on every level: see qtile_ref.cpp).
QuantizeActFn select_quantize(Isa isa) {
#ifdef SPARSEINFER_HAVE_AVX2
  if (isa == Isa::avx512 || isa == Isa::avx2) return quantize_act_avx2;
#endif
  (void)isa;
  return quantize_act_scalar;
}

// Below this many multiply-adds per thread, waking another thread costs more than it saves: a
// fork-join is ~10 us when the helper sleeps, and 1M multiply-adds take ~15-50 us on one core (with
// 64K, calls of ~10 us went to two threads and ran slower than on one, and waited on a busy
// machine: bench/README.md, "Shared cores").
constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;
// Batches of 1-2 split from kMinStreamWorkPerThread (dispatch.h) instead (SmolLM2 decode, 2 threads,
// every layer under 1M: int4-g128 steps 8.9-9.2 -> 6.8-7.1 ms, int8 13.0-13.2 -> 9.4-10.6 ms at 128K,
// interleaved x2).
// Column chunks are multiples of this, so SIMD kernels see whole register tiles except at the end.
constexpr int64_t kColumnAlign = 16;

struct TaskContext {
  const KernelImpl* kernel;
  const GemmArgs* args;
  const WeightView* w;
  int64_t chunk;
  std::atomic<int32_t> status{int32_t(Status::ok)};
};

void run_task(void* p, int64_t task) {
  TaskContext& c = *static_cast<TaskContext*>(p);
  const int64_t n0 = task * c.chunk;
  const int64_t n1 = n0 + c.chunk < c.args->N ? n0 + c.chunk : c.args->N;
  const Status s = c.kernel->fn(*c.args, *c.w, n0, n1);
  if (s != Status::ok) {
    int32_t expected = int32_t(Status::ok);
    c.status.compare_exchange_strong(expected, int32_t(s));
  }
}

// Activation quantization over row chunks (run_linear): elements of x below which one thread does it.
constexpr int64_t kMinQuantizeSplit = int64_t(1) << 16;

struct QuantizeContext {
  QuantizeActFn fn;
  const GemmArgs* args;
  const QTileView* t;
  int8_t* q;
  float* scale;
  int32_t* sum;
  uint8_t flip;  // 0x80: x + 128 (QActView::qu)
  int64_t rows;  // per task
};

void run_quantize_task(void* p, int64_t task) {
  const QuantizeContext& c = *static_cast<const QuantizeContext*>(p);
  const GemmArgs& a = *c.args;
  const int64_t m0 = task * c.rows, m1 = m0 + c.rows < a.M ? m0 + c.rows : a.M;
  const int64_t cells = m0 * c.t->nseg;
  c.fn(a.x + m0 * a.stride_xm, m1 - m0, a.K, a.stride_xm, *c.t, c.q + cells * c.t->seg_pad, c.scale + cells,
       c.sum + cells, c.flip);
}

// The kernel a call runs: the row it names, else the table's pick for its batch and activation mode.
const KernelImpl* call_kernel(const LinearCall& call, const WeightView& w, Isa isa) {
  const uint64_t tiles =
      (w.qt.codes ? uint64_t(kReadsQTiles) : 0) | (w.qt.compact ? uint64_t(kReadsCompactTiles) : 0);
  const uint64_t bits = act_call_bits(call.act) | tiles;
  return call.kernel ? find_kernel(call.kernel, w.id, isa, bits) : select_kernel(w.id, isa, call.M, bits);
}

// Whether kernel k reads x quantized by the driver (the int8-activation kernels on row tiles).
bool takes_quantized_x(const KernelImpl& k, const WeightView& w) {
  return (k.requires & kCallInt8Act) && (w.id == KernelId::int8 || w.id == KernelId::int4 || (k.requires & kReadsQTiles));
}

// Whether kernel k reads the quantized x as x + 128 (QActView::qu): the AVX-512 VNNI kernels on int8
// row tiles, which take the activations as vpdpbusd's unsigned operand and the codes as they are.
bool takes_offset_x(const KernelImpl& k, const WeightView& w) {
#ifdef SPARSEINFER_HAVE_AVX512
  if (w.qt.bits == 8)
    return k.fn == int8_q8_gemm_vnni_avx512 || k.fn == int8_q8_gemm_vnni4x4_avx512 || k.fn == int8_q8_compact_vnni_avx512;
#endif
  (void)k, (void)w;
  return false;
}

// Points qx at the quantized x buffers of a call of kernel k ([M][nseg][seg_pad] codes, [M][nseg]
// scales and sums) and returns the byte the quantizer adds to each code: 0x80 where k reads them as
// x + 128 through qx.qu (takes_offset_x), else 0. One place for both drivers (run_linear, RowCall).
uint8_t bind_quantized_x(const KernelImpl& k, const WeightView& w, int8_t* q, float* scale, int32_t* sum,
                         QActView* qx) {
  const bool offset = takes_offset_x(k, w);
  qx->q = offset ? nullptr : q, qx->scale = scale, qx->sum = sum, qx->stride_m = w.qt.nseg * w.qt.seg_pad;
  qx->qu = offset ? reinterpret_cast<const uint8_t*>(q) : nullptr;
  return offset ? 0x80 : 0;
}

}  // namespace

// Multiply-adds per output column and batch row, to size the thread split.
// A CSR entry costs several dense multiply-adds (its column index, then a gather or a broadcast
// against x transposed): ~12 G entries x rows / s on one core against ~50 G multiply-adds for the
// dense kernels. Counted at face value, a 10 %-sparse MiniLM layer at 33 rows (2M entries x rows,
// 165 us) stayed on one thread.
constexpr int64_t kCsrEntryCost = 4;

int64_t work_per_column(const WeightView& w) {
  switch (w.id) {
    case KernelId::nm_float: case KernelId::nm_int8: case KernelId::nm_int4: return w.nm.kc;
    case KernelId::csr_float: case KernelId::csr_int8: return (w.csr.nnz / w.N + 1) * kCsrEntryCost;
    default: return w.K;
  }
}

int64_t column_chunk(int64_t n, int64_t work, int64_t min_work, int threads) {
  int64_t nt = work / min_work;
  if (nt > threads) nt = threads;
  if (nt > (n + kColumnAlign - 1) / kColumnAlign) nt = (n + kColumnAlign - 1) / kColumnAlign;
  if (nt < 1) nt = 1;
  return ((n + nt - 1) / nt + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
}

Status prepare_row_call(const LinearCall& call, const WeightView& w, Isa isa, RowCall* out) {
  RowCall& r = *out;
  r.kernel = call_kernel(call, w, isa);
  if (!r.kernel) return Status::no_kernel;
  if (call.M != 1 || call.x_dtype != DType::f32 || (call.bias && call.bias_dtype != DType::f32))
    return Status::invalid_argument;
  r.w = &w;
  r.args = GemmArgs{};
  r.args.M = 1, r.args.N = w.N, r.args.K = w.K;
  r.args.x = static_cast<const float*>(call.x), r.args.stride_xm = call.stride_xm;
  r.args.bias = static_cast<const float*>(call.bias);
  r.args.y = call.y, r.args.y_dtype = DType::f32, r.args.stride_ym = call.stride_ym;
  r.quantize_fn = nullptr;
  if (takes_quantized_x(*r.kernel, w)) {
    const QTileView& t = w.qt;
    if (!t.codes) return Status::invalid_argument;  // bindings.cpp builds the tiles first
    r.q.resize(size_t(t.nseg * t.seg_pad)), r.scale.resize(size_t(t.nseg)), r.sum.resize(size_t(t.nseg));
    r.flip = bind_quantized_x(*r.kernel, w, r.q.data(), r.scale.data(), r.sum.data(), &r.args.qx);
    r.quantize_fn = select_quantize(isa);
  }
  return Status::ok;
}

void RowCall::quantize() {
  if (quantize_fn)
    quantize_fn(args.x, 1, args.K, args.stride_xm, w->qt, q.data(), scale.data(), sum.data(), flip);
}

Status RowCall::columns(int64_t n0, int64_t n1) const { return kernel->fn(args, *w, n0, n1); }

Status run_linear(const LinearCall& call, const WeightView& w, Isa isa, int threads, const KernelImpl** kernel) {
  const KernelImpl* k = call_kernel(call, w, isa);
  if (kernel) *kernel = k;
  if (!k) return Status::no_kernel;
  if (call.M <= 0) return Status::ok;
  if (!is_float(call.x_dtype) || (call.bias && !is_float(call.bias_dtype))) return Status::unsupported_dtype;

  GemmArgs a;
  a.M = call.M, a.N = w.N, a.K = w.K;
  a.y = call.y, a.y_dtype = call.x_dtype, a.stride_ym = call.stride_ym;
  // Kernels see fp32 activations and bias: convert once here (per call, grow-only scratch of the
  // calling thread, shared read-only with the workers).
  if (call.x_dtype == DType::f32) {
    a.x = static_cast<const float*>(call.x), a.stride_xm = call.stride_xm;
  } else {
    float* buf = scratch<float, 0>(size_t(a.M) * size_t(a.K));
    if (!buf) return Status::out_of_memory;
    select_convert(isa)(call.x, call.x_dtype, a.M, a.K, call.stride_xm, buf);
    a.x = buf, a.stride_xm = a.K;
  }
  if (call.bias && call.bias_dtype != DType::f32) {
    float* buf = scratch<float, 1>(size_t(a.N));
    if (!buf) return Status::out_of_memory;
    select_convert(isa)(call.bias, call.bias_dtype, 1, a.N, a.N, buf);
    a.bias = buf;
  } else {
    a.bias = static_cast<const float*>(call.bias);
  }

  // int8 activations: quantize x once per call, here, on the calling thread (grow-only scratch,
  // shared read-only with the workers), in the segments of the weight's row tiles. (The N:M int8
  // kernels, which have no row tiles, quantize x themselves: x86/avx2/nm_q8_gemv_avx2.cpp.)
  if (takes_quantized_x(*k, w)) {
    const QTileView& t = w.qt;
    if (!t.codes) return Status::invalid_argument;  // bindings.cpp builds the tiles before such a call
    const size_t cells = size_t(a.M) * size_t(t.nseg);
    int8_t* q = scratch<int8_t, 0>(cells * size_t(t.seg_pad));
    float* scale = scratch<float, 2>(cells);
    int32_t* sum = scratch<int32_t, 0>(cells);
    if (!q || !scale || !sum) return Status::out_of_memory;
    const uint8_t flip = bind_quantized_x(*k, w, q, scale, sum, &a.qx);
    QuantizeContext qc{select_quantize(isa), &a, &t, q, scale, sum, flip, a.M};
    // Rows split over the threads when there are enough (a 256 x 384 x 384 int8 GEMM spent ~15% of
    // its time quantizing x on one thread); the rows' bits do not depend on the split.
    int64_t qt = threads < a.M ? threads : a.M;
    if (a.M * a.K < kMinQuantizeSplit || qt < 1) qt = 1;
    qc.rows = (a.M + qt - 1) / qt;
    parallel_run((a.M + qc.rows - 1) / qc.rows, int(qt), run_quantize_task, &qc);
  }

  // Split the N output columns into one chunk per thread.
  const int64_t chunk = column_chunk(a.N, a.M * work_per_column(w) * a.N,
                                     a.M <= 2 ? kMinStreamWorkPerThread : kMinWorkPerThread, threads);
  const int64_t tasks = (a.N + chunk - 1) / chunk;

  TaskContext ctx;
  ctx.kernel = k, ctx.args = &a, ctx.w = &w, ctx.chunk = chunk;
  parallel_run(tasks, int(tasks), run_task, &ctx);
  return Status(ctx.status.load());
}


// -- attention over whole sequences (dispatch.h, AttentionCall) --------------------------------------

namespace {

// Query rows per task: enough to share each pass over the values (attend_rows reads a value row once
// per 4 rows) and each gathered key (every row block gathers its keys again), few enough that the
// scores stay in L2 (128 rows x 2K keys: 1 MB).
constexpr int64_t kAttendRows = 128;
// Below this many multiply-adds a thread, one thread: attention runs ~15-25 G multiply-adds / s on a
// core (softmax and gathers besides the dot products), so this is ~10-15 us of work, about a fork-join.
constexpr int64_t kMinAttendWorkPerThread = int64_t(1) << 18;

struct AttendContext {
  const AttentionCall* c;
  DecodeOps ops;
  const int32_t* keys;   // [B][Lk]: the keys batch row b may see, in order (all, where there is no mask)
  const int32_t* count;  // [B]: how many
  int64_t blocks, rows;  // query row blocks per (b, h), rows per block
  std::atomic<bool> out_of_memory{false};
};

void attend_task(void* p, int64_t task) {
  AttendContext& x = *static_cast<AttendContext*>(p);
  const AttentionCall& c = *x.c;
  const int64_t blk = task % x.blocks, bh = task / x.blocks, h = bh % c.H, b = bh / c.H;
  const int64_t hk = h / (c.H / c.Hkv), d = c.D;
  const int64_t r0 = blk * x.rows, r1 = r0 + x.rows < c.Lq ? r0 + x.rows : c.Lq, g = r1 - r0;
  const int32_t* keys = x.keys + b * c.Lk;
  // the keys the block's rows may see, and how many of them each row sees (causal: a prefix)
  int64_t n = x.count[b];
  if (c.causal)
    while (n > 0 && keys[n - 1] > r1 - 1) --n;
  const int64_t np = (n + kAttendPad - 1) / kAttendPad * kAttendPad;
  // scratch: keys transposed [d][np], values [n][d], scores [g][np]
  float* kt = scratch<float, 3>(size_t(d * np + n * d + g * np));
  int64_t* nk = scratch<int64_t, 0>(size_t(g));
  if (!kt || !nk) return x.out_of_memory.store(true);
  float* vp = kt + d * np;
  x.ops.pack_keys_values(c.k + b * c.k_stride[0] + hk * c.k_stride[1], c.k_stride[2],
                         c.v + b * c.v_stride[0] + hk * c.v_stride[1], c.v_stride[2], keys, n, d, kt, np, vp);
  for (int64_t i = 0, seen = 0; i < g; ++i) {
    if (c.causal)
      while (seen < n && keys[seen] <= r0 + i) ++seen;
    nk[i] = c.causal ? seen : n;
  }
  AttendRows a;
  a.q = c.q + b * c.q_stride[0] + h * c.q_stride[1] + r0 * c.q_stride[2], a.q_stride = c.q_stride[2];
  a.kt = kt, a.np = np;
  a.v = vp, a.d = d, a.scale = c.scale, a.scores = vp + n * d;
  a.out = c.out + ((b * c.Lq + r0) * c.H + h) * d, a.out_stride = c.H * d;  // out[b, r0 + i, h, :]
  for (int64_t i = 0; i < g;) {  // runs of rows that see some key go to attend_rows; the others get zeros
    if (nk[i] == 0) {
      std::memset(a.out + i * a.out_stride, 0, size_t(d) * sizeof(float));
      ++i;
      continue;
    }
    int64_t j = i + 1;
    while (j < g && nk[j] > 0) ++j;
    AttendRows run = a;
    run.q += i * a.q_stride, run.g = j - i, run.nk = nk + i, run.out += i * a.out_stride;
    x.ops.attend_rows(run);
    i = j;
  }
}

}  // namespace

bool mask_hides_keys_only(const AttentionCall& c) {
  if (!c.mask) return true;
  for (int64_t b = 0; b < c.B; ++b) {
    const uint8_t* first = c.mask + b * c.mask_stride[0];
    for (int64_t i = 1; i < c.mask_rows; ++i) {
      const uint8_t* row = first + i * c.mask_stride[1];
      for (int64_t j = 0; j < c.Lk; ++j)
        if ((row[j * c.mask_stride[2]] != 0) != (first[j * c.mask_stride[2]] != 0)) return false;
    }
  }
  return true;
}

Status run_attention(const AttentionCall& c, Isa isa, int threads) {
  if (c.B < 0 || c.H <= 0 || c.Hkv <= 0 || c.H % c.Hkv || c.Lq < 0 || c.Lk < 0 || c.D <= 0)
    return Status::invalid_argument;
  if (c.B == 0 || c.Lq == 0) return Status::ok;
  AttendContext x;
  x.c = &c, x.ops = decode_ops(isa);
  if (!x.ops.attend_rows || !x.ops.pack_keys_values) return Status::internal_error;
  // the keys each batch row may see (row 0 of its mask), gathered once for every head
  int32_t* keys = scratch<int32_t, 1>(size_t(c.B * c.Lk + c.B));
  if (!keys) return Status::out_of_memory;
  int32_t* count = keys + c.B * c.Lk;
  for (int64_t b = 0; b < c.B; ++b) {
    const uint8_t* row = c.mask ? c.mask + b * c.mask_stride[0] : nullptr;
    int32_t n = 0;
    for (int64_t j = 0; j < c.Lk; ++j)
      if (!row || row[j * c.mask_stride[2]]) keys[b * c.Lk + n++] = int32_t(j);
    count[b] = n;
  }
  x.keys = keys, x.count = count;
  // row blocks: at most kAttendRows rows, and at least 4 tasks a thread where the heads are fewer
  const int64_t heads = c.B * c.H;
  int64_t blocks = (c.Lq + kAttendRows - 1) / kAttendRows;
  const int64_t want = (4 * int64_t(threads) + heads - 1) / heads;
  if (blocks < want) blocks = want < c.Lq ? want : c.Lq;
  x.rows = (c.Lq + blocks - 1) / blocks;
  x.blocks = (c.Lq + x.rows - 1) / x.rows;
  const int64_t work = heads * c.Lq * c.Lk * c.D * 2;  // a one-sentence MiniLM layer: 0.84M
  int64_t nt = work / kMinAttendWorkPerThread;
  if (nt > threads) nt = threads;
  if (nt < 1) nt = 1;
  parallel_run(heads * x.blocks, int(nt), attend_task, &x);
  return x.out_of_memory.load() ? Status::out_of_memory : Status::ok;
}

}  // namespace sparseinfer
