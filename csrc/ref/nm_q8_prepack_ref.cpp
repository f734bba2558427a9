// Prepack of 2:4 + int8 / int4 weights for the int8-activation kernels (x86/avx2/nm_q8_gemv_avx2.cpp,
// nm_q8_gemm_avx2.cpp; layout notes in x86/avx2/sparse_avx2.h, namespace q8), built once per weight
// on its first int8-mode call (bindings.cpp), ISA-free. The canonical tensors stay as they are (the
// exact kernels, the kernels' tails and the artifact use them); this is a second copy of the codes
// and the indices in the order the kernels' register gather produces, plus, for int4, segment sums.
//
// Per weight row, per whole 64-column block b (32 kept values; K / 64 of them), kept value
// j = 16 h + 8 L + i (h, L in 0..1, i in 0..7) goes to byte 16 L + 8 h + i of the block's 32 gathered
// activations, i.e. lane L, 64-bit half h of a 256-bit register:
//   meta  8 bytes: j's 2-bit index at bits 4 L + 2 h of byte i. One broadcast, one 128-bit shift
//         of the copy for lane 1 by 4 and an AND leave every index in its control byte, with no
//         variable shift (vpsrlv* costs ~3 cycles per 256-bit op on Zen 1).
//   codes int8: 32 bytes in that order. int4: 16 bytes, byte p = code of position p (low nibble) |
//         code of position 16 + p << 4 (high nibble): one 128-bit shift by 4 and a mask decode all 32.
//   int4 also stores wsum[row][s] = sum over the whole blocks of segment s of (code - zero): the
//   kernel multiplies x + 128 (unsigned) by code - zero (signed), and 128 * wsum undoes the +128.
// Kept values past the last whole block stay in the canonical arrays only (the kernels' exact tail).
#include <cstring>

#include "sparseinfer/kernel_utils.h"

namespace sparseinfer {

namespace {

bool q8_supported(const WeightView& w) {
  const NMView& nm = w.nm;
  if (nm.n != 2 || nm.m != 4 || (nm.values != ValueKind::i8 && nm.values != ValueKind::i4)) return false;
  const QuantView& q = w.q;
  if (!q.codes || !q.scale || q.group <= 0 || q.kp < nm.kc || w.K < 64 || !nm.meta) return false;
  // every segment must lie inside one scale group: one group per row, or power-of-two groups of
  // >= 32 kept values (64 columns)
  return q.n_groups == 1 || (q.group % 32 == 0 && (q.group & (q.group - 1)) == 0);
}

// Activation segment (columns): 64-column blocks, at most 4 and at most a scale group's span (a
// divisor of it: a segment never straddles two groups), at least 2 where the row has 2, in as few
// segments as cover the row's whole blocks with the least padding, since the dense row tiles give
// every segment the same length: 256-column segments made K = 576 or 384 rows 768 or 512 columns long,
// a third more bytes to read.
int64_t q8_segment(const WeightView& w) {
  const QuantView& q = w.q;
  const bool one_group = q.n_groups == 1 || q.group >= w.nm.kc;
  const int64_t blocks = w.K / 64, span = one_group || 2 * q.group >= 256 ? 4 : 2 * q.group / 64;
  auto covered = [blocks](int64_t per) { return (blocks + per - 1) / per * per; };
  int64_t per = span;
  for (int64_t p = span - 1; p >= (blocks > 1 ? 2 : 1); --p)
    if ((one_group || span % p == 0) && covered(p) < covered(per)) per = p;
  return 64 * per;
}

size_t align64(size_t b) { return (b + 63) / 64 * 64; }

// Kept value (within the block) at gathered position p = 16 L + 8 h + i.
inline int kept_at(int p) { return 16 * ((p >> 3) & 1) + 8 * (p >> 4) + (p & 7); }

}  // namespace

int64_t nm_q8_segment(const WeightView& w) { return q8_supported(w) ? q8_segment(w) : 0; }

size_t nm_q8_prepack_bytes(const WeightView& w) {
  if (!q8_supported(w)) return 0;
  const int64_t nblk = w.K / 64, nseg = (w.K + q8_segment(w) - 1) / q8_segment(w);
  const bool int4 = w.nm.values == ValueKind::i4;
  size_t bytes = align64(size_t(w.N) * size_t(nblk) * (int4 ? 16 : 32));
  bytes += align64(size_t(w.N) * size_t(nblk) * 8);
  if (int4) bytes += align64(size_t(w.N) * size_t(nseg) * sizeof(int32_t));
  return bytes;
}

NMView::Q8 nm_q8_prepack(const WeightView& w, void* buf) {
  NMView::Q8 v;
  if (!q8_supported(w)) return v;
  const QuantView& q = w.q;
  const NMView& nm = w.nm;
  const bool int4 = nm.values == ValueKind::i4;
  const int64_t nblk = w.K / 64, bb = int4 ? 16 : 32;
  v.seg = q8_segment(w);
  v.nseg = (w.K + v.seg - 1) / v.seg;
  uint8_t* codes = static_cast<uint8_t*>(buf);
  uint8_t* meta = codes + align64(size_t(w.N) * size_t(nblk) * size_t(bb));
  int32_t* wsum = int4 ? reinterpret_cast<int32_t*>(meta + align64(size_t(w.N) * size_t(nblk) * 8)) : nullptr;
  const int64_t per_seg = v.seg / 64;
  for (int64_t n = 0; n < w.N; ++n) {
    const int8_t* c8 = static_cast<const int8_t*>(q.codes) + n * q.kp;
    const uint8_t* mrow = nm.meta + n * nm.meta_stride;
    for (int64_t b = 0; b < nblk; ++b) {
      uint8_t* out = codes + (n * nblk + b) * bb;
      const int64_t j0 = 32 * b;
      if (!int4) {
        for (int p = 0; p < 32; ++p) out[p] = uint8_t(c8[j0 + kept_at(p)]);
      } else {
        for (int p = 0; p < 16; ++p)
          out[p] = uint8_t(int4_code(q, n, j0 + kept_at(p)) | (int4_code(q, n, j0 + kept_at(16 + p)) << 4));
      }
      uint8_t* m = meta + (n * nblk + b) * 8;
      std::memset(m, 0, 8);
      for (int p = 0; p < 32; ++p) {
        const int64_t j = j0 + kept_at(p);
        const int idx = (mrow[j / 4] >> (2 * (j % 4))) & 3;
        const int L = p >> 4, h = (p >> 3) & 1, i = p & 7;
        m[i] = uint8_t(m[i] | (idx << (4 * L + 2 * h)));
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
  v.meta = meta;
  v.wsum = wsum;
  return v;
}

}  // namespace sparseinfer
