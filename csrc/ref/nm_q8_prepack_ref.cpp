// Prepack of 2:4 + int8 / int4 weights for the int8-activation gemv (x86/avx2/nm_q8_gemv_avx2.cpp),
// built once per weight on its first int8-mode call (bindings.cpp), ISA-free. The canonical tensors
// stay as they are (the exact kernels and the artifact use them); this is a second copy of the
// codes in the order the kernel's register gather produces, plus, for int4, per-segment code sums.
//
// Per weight row, per whole 64-column block b (32 kept values, 8 meta bytes; K / 64 of them):
//   lane L (0, 1) byte p (0..15) of the block holds kept value 32 b + 4 (p % 8) + 2 L + p / 8, i.e.
//   field 2 L + p / 8 of meta byte p % 8: lane 0 the even 2:4 groups, lane 1 the odd ones. That is
//   what one vpsrlvq of the broadcast meta word by (0, 2, 4, 6) per 64-bit lane lines up, so the
//   kernel decodes a block's gather control in 3 ops instead of 6.
//     int8: 32 bytes, lane 0 then lane 1.
//     int4: 16 bytes, byte p = lane-0 code p (low nibble) | lane-1 code p << 4 (high nibble): one
//           128-bit broadcast, one shift of the high lane by 4 and a mask decode all 32.
//   int4 also stores wsum[row][s] = sum over the whole blocks of segment s of (code - zero): the
//   kernel multiplies x + 128 (unsigned) by code - zero (signed), and 128 * wsum undoes the +128.
// Kept values past the last whole block stay in the canonical arrays (the kernel's exact tail).
#include <cstring>

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {

namespace {

bool q8_supported(const WeightView& w) {
  const NMView& nm = w.nm;
  if (nm.n != 2 || nm.m != 4 || (nm.values != ValueKind::i8 && nm.values != ValueKind::i4)) return false;
  const QuantView& q = w.q;
  if (!q.codes || !q.scale || q.group <= 0 || q.kp < nm.kc || w.K < 64) return false;
  // every segment must lie inside one scale group: one group per row, or power-of-two groups of
  // >= 32 kept values (64 columns)
  return q.n_groups == 1 || (q.group % 32 == 0 && (q.group & (q.group - 1)) == 0);
}

// Activation segment (columns): 256 when the groups allow, else the group's column span.
int64_t q8_segment(const WeightView& w) {
  const QuantView& q = w.q;
  if (q.n_groups == 1 || q.group >= w.nm.kc) return 256;
  return 2 * q.group < 256 ? 2 * q.group : 256;
}

size_t align64(size_t b) { return (b + 63) / 64 * 64; }

}  // namespace

size_t nm_q8_prepack_bytes(const WeightView& w) {
  if (!q8_supported(w)) return 0;
  const int64_t nblk = w.K / 64, nseg = (w.K + q8_segment(w) - 1) / q8_segment(w);
  const bool int4 = w.nm.values == ValueKind::i4;
  size_t bytes = align64(size_t(w.N) * size_t(nblk) * (int4 ? 16 : 32));
  if (int4) bytes += align64(size_t(w.N) * size_t(nseg) * sizeof(int32_t));
  return bytes;
}

NMView::Q8 nm_q8_prepack(const WeightView& w, void* buf) {
  NMView::Q8 v;
  if (!q8_supported(w)) return v;
  const QuantView& q = w.q;
  const bool int4 = w.nm.values == ValueKind::i4;
  const int64_t nblk = w.K / 64, bb = int4 ? 16 : 32;
  v.seg = q8_segment(w);
  v.nseg = (w.K + v.seg - 1) / v.seg;
  uint8_t* codes = static_cast<uint8_t*>(buf);
  int32_t* wsum = int4 ? reinterpret_cast<int32_t*>(codes + align64(size_t(w.N) * size_t(nblk) * size_t(bb))) : nullptr;
  const int64_t per_seg = v.seg / 64;
  for (int64_t n = 0; n < w.N; ++n) {
    const int8_t* c8 = static_cast<const int8_t*>(q.codes) + n * q.kp;
    for (int64_t b = 0; b < nblk; ++b) {
      uint8_t* out = codes + (n * nblk + b) * bb;
      if (!int4) {
        for (int L = 0; L < 2; ++L)
          for (int p = 0; p < 16; ++p) out[16 * L + p] = uint8_t(c8[32 * b + 4 * (p % 8) + 2 * L + p / 8]);
      } else {
        for (int p = 0; p < 16; ++p) {
          const int lo = int4_code(q, n, 32 * b + 4 * (p % 8) + p / 8);
          const int hi = int4_code(q, n, 32 * b + 4 * (p % 8) + 2 + p / 8);
          out[p] = uint8_t(lo | (hi << 4));
        }
      }
    }
    if (int4) {
      for (int64_t s = 0; s < v.nseg; ++s) {
        int32_t sum = 0;
        const int64_t b0 = s * per_seg, b1 = b0 + per_seg < nblk ? b0 + per_seg : nblk;
        for (int64_t j = 32 * b0; j < 32 * b1; ++j) {
          const int64_t g = j / q.group;
          sum += int4_code(q, n, j) - (q.zero ? q.zero[n * q.n_groups + g] : 8);
        }
        wsum[n * v.nseg + s] = sum;
      }
    }
  }
  v.codes = codes;
  v.wsum = wsum;
  return v;
}

}  // namespace sparseinfer
