// Row tiles and int8 activations (ActMode::int8), ISA-free: the tile builder (run once per weight),
// the scalar activation quantizer, and the scalar int8-activation kernels -- the plain statement of
// the integer math every SIMD version (x86/*/int*_q8_gemm_*.cpp) reproduces bit for bit.
//
// For output n, batch row m and segment s (seg elements of K, one weight scale group or a part
// of one):
//
//   dot  = sum_k code[n, k] * q[m, k]            exact int32 (|dot| <= seg_pad * 255 * 127)
//   y   += fma(float(dot - z[n] * sum_q[m, s]),   zero point folded in exactly, in integers
//              scale_w[n, g(s)] * scale_x[m, s],  one fp32 product
//              y)                                 one fused multiply-add per segment, in order
//
// z is the int4 zero point (8 when symmetric); int8 codes are signed and z = 0. A SIMD kernel may
// keep the codes offset (int8 as u8 = code + 128 for vpdpbusd) as long as it subtracts the
// offset in the same integer step.
#include <cmath>
#include <cstring>
#include <vector>

#include "ref_common.h"

namespace sparseinfer {

namespace {

constexpr int64_t kSegTarget = 128;  // activation block for groups that are multiples of it

// Segment geometry for a QuantView. Segments are the unit of activation quantization and never
// straddle two scale groups: 128 elements when the group is a multiple of 128; per-channel rows
// (one group) are cut into 128s as well (the last one partial); other groups are one segment
// each, split by a divisor when longer than kSegMax so that the int32 dot products cannot
// overflow (|dot| <= seg_pad * 255 * 127 < 2^31 needs seg_pad < 66,000).
constexpr int64_t kSegMax = 4096;

// seg > 0: that segment (it must divide the group, or the row when there is one group); 0: the rule above.
QTileView qtile_geometry(const QuantView& q, int64_t N, int bits, int64_t seg = 0) {
  QTileView t;
  t.bits = bits;
  t.tiles = (N + kQTileRows - 1) / kQTileRows;
  t.n_groups = q.n_groups;
  if (seg > 0) {
    t.seg = seg;
  } else if (q.n_groups == 1) {
    t.seg = q.kp < kSegTarget ? q.kp : kSegTarget;
  } else if (q.group % kSegTarget == 0) {
    t.seg = kSegTarget;
  } else {
    t.seg = q.group;
    for (int64_t d = kSegMax; t.seg > kSegMax; --d)
      if (q.group % d == 0) t.seg = d;
  }
  t.seg_pad = (t.seg + 7) / 8 * 8;
  t.nseg = (q.kp + t.seg - 1) / t.seg;
  t.segs_per_group = q.n_groups == 1 ? t.nseg : q.group / t.seg;
  return t;
}

size_t align64(size_t v) { return (v + 63) / 64 * 64; }

// Steps of 64 bytes (16 rows x 4 bytes) in all of t's row tiles.
int64_t qtile_steps(const QTileView& t) { return t.tiles * t.nseg * (t.seg_pad / (32 / t.bits)); }

struct QTileSizes {
  size_t codes, scale, zero, wsum;
};

QTileSizes qtile_sizes(const QTileView& t, bool asymmetric) {
  QTileSizes s;
  s.codes = align64(size_t(qtile_steps(t) * 64));
  s.scale = align64(size_t(t.tiles * t.n_groups * kQTileRows) * sizeof(float));
  s.zero = asymmetric ? align64(size_t(t.tiles * t.n_groups * kQTileRows)) : 0;
  s.wsum = t.bits == 8 ? align64(size_t(t.tiles * t.nseg * kQTileRows) * sizeof(int32_t)) : 0;
  return s;
}

size_t tile_bytes(const QuantView& q, int64_t N, int bits, int64_t seg) {
  const QTileSizes s = qtile_sizes(qtile_geometry(q, N, bits, seg), bits == 4 && q.zero);
  return s.codes + s.scale + s.zero + s.wsum;
}

QTileView build_tiles(const QuantView& q, int64_t N, int bits, int64_t seg, void* buf) {
  QTileView t = qtile_geometry(q, N, bits, seg);
  const bool asym = bits == 4 && q.zero;
  const QTileSizes sz = qtile_sizes(t, asym);
  uint8_t* codes = static_cast<uint8_t*>(buf);
  float* scale = reinterpret_cast<float*>(codes + sz.codes);
  uint8_t* zero = asym ? codes + sz.codes + sz.scale : nullptr;
  int32_t* wsum = sz.wsum ? reinterpret_cast<int32_t*>(codes + sz.codes + sz.scale + sz.zero) : nullptr;
  std::memset(buf, 0, sz.codes + sz.scale + sz.zero + sz.wsum);  // padding rows / columns: code 0, scale 0

  const int64_t epl = 32 / bits;  // elements per 4-byte lane per step
  const int64_t steps = t.seg_pad / epl;
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    for (int64_t r = 0; r < kQTileRows; ++r) {
      const int64_t n = tile * kQTileRows + r;
      if (n >= N) break;
      for (int64_t g = 0; g < t.n_groups; ++g) {
        scale[(tile * t.n_groups + g) * kQTileRows + r] = q.scale[n * q.n_groups + g];
        if (zero) zero[(tile * t.n_groups + g) * kQTileRows + r] = q.zero[n * q.n_groups + g];
      }
      for (int64_t s = 0; s < t.nseg; ++s) {
        uint8_t* seg_out = codes + ((tile * t.nseg + s) * steps) * 64 + r * 4;
        for (int64_t i = 0; i < t.seg; ++i) {  // i: position in the segment; k = column in the row
          const int64_t k = s * t.seg + i, step = i / epl, lane = i % epl;
          if (k >= q.kp) break;  // the partial last segment of a per-channel row
          uint8_t* byte = seg_out + step * 64;
          if (bits == 8) {
            byte[lane] = static_cast<const uint8_t*>(q.codes)[n * q.kp + k];
            wsum[(tile * t.nseg + s) * kQTileRows + r] += 128 * int32_t(int8_t(byte[lane]));
          } else {  // int4: lane elements 0..3 in the low nibbles of bytes 0..3, 4..7 in the high ones
            const uint8_t c = uint8_t(int4_code(q, n, k));
            byte[lane & 3] |= lane < 4 ? c : uint8_t(c << 4);
          }
        }
      }
    }
  }
  t.codes = codes, t.scale = scale, t.zero = zero, t.wsum128 = wsum;
  return t;
}

// The dense equivalent of an N:M + int8 / int4 weight (kept values at their columns; pruned positions
// hold code 0, or the group's zero point for int4, so they add exactly nothing to any segment's
// integer sum), as a QuantView over the columns: the group spans group * m / n columns.
struct DenseNM {
  QuantView q;
  int64_t seg = 0;
  std::vector<uint8_t> codes, zero;
  std::vector<float> scale;
};

bool dense_nm(const WeightView& w, DenseNM& d) {
  if (!nm_qtiles_supported(w)) return false;
  d.seg = nm_q8_segment(w);
  const QuantView& q = w.q;
  const NMView& nm = w.nm;
  const bool int4 = nm.values == ValueKind::i4;
  const int64_t kd = w.K, span = q.n_groups == 1 ? kd : q.group * nm.m / nm.n;
  d.q.kp = kd, d.q.group = span, d.q.n_groups = (kd + span - 1) / span;
  if (d.q.n_groups > q.n_groups) return false;
  d.scale.resize(size_t(w.N * d.q.n_groups));
  if (q.zero) d.zero.resize(d.scale.size());
  for (int64_t n = 0; n < w.N; ++n)
    for (int64_t g = 0; g < d.q.n_groups; ++g) {
      d.scale[size_t(n * d.q.n_groups + g)] = q.scale[n * q.n_groups + g];
      if (q.zero) d.zero[size_t(n * d.q.n_groups + g)] = q.zero[n * q.n_groups + g];
    }
  d.codes.assign(size_t(w.N * (int4 ? kd / 2 : kd)), 0);
  for (int64_t n = 0; n < w.N; ++n) {
    uint8_t* row = d.codes.data() + n * (int4 ? kd / 2 : kd);
    if (int4)  // every position starts at its group's zero point (pruned = zero contribution)
      for (int64_t k = 0; k < kd; ++k) {
        const uint8_t z = q.zero ? q.zero[n * q.n_groups + k / span] : 8;
        row[k / 2] = uint8_t(row[k / 2] | (z << ((k & 1) * 4)));
      }
    BitReader rd(nm.meta + n * nm.meta_stride);
    for (int64_t j = 0; j < nm.kc; ++j) {
      const int64_t col = (j / nm.n) * nm.m + int64_t(rd.get(nm.bits));
      if (col >= w.K) continue;  // zero padding of the last group
      if (int4) {
        const uint8_t c = uint8_t(int4_code(q, n, j)), shift = uint8_t((col & 1) * 4);
        row[col / 2] = uint8_t((row[col / 2] & ~(0xF << shift)) | (c << shift));
      } else {
        row[col] = static_cast<const uint8_t*>(q.codes)[n * q.kp + j];
      }
    }
  }
  d.q.codes = d.codes.data(), d.q.scale = d.scale.data(), d.q.zero = q.zero ? d.zero.data() : nullptr;
  return true;
}

}  // namespace

size_t qtile_bytes(const QuantView& q, int64_t N, int bits) { return tile_bytes(q, N, bits, 0); }

QTileView build_qtiles(const QuantView& q, int64_t N, int bits, void* buf) { return build_tiles(q, N, bits, 0, buf); }

bool qtile_compact_supported(const QTileView& t) { return t.codes && t.bits == 8; }

size_t qtile_compact_bytes(const QTileView& t) {
  return qtile_compact_supported(t) ? align64(size_t(qtile_steps(t) * kCompactStepBytes)) : 0;
}

bool build_qtile_compact(QTileView& t, void* buf) {
  if (!qtile_compact_supported(t)) return false;
  const int64_t steps = qtile_steps(t);
  uint8_t* out = static_cast<uint8_t*>(buf);
  for (int64_t i = 0; i < steps; ++i) {
    const uint8_t* step = t.codes + i * 64;
    uint8_t* o = out + i * kCompactStepBytes;
    uint64_t mask = 0;  // per lane: its non-zero codes, then its first zero ones, 2 in all
    for (int lane = 0; lane < 16; ++lane) {
      unsigned keep = 0, n = 0;
      for (int b = 0; b < 4; ++b)
        if (step[lane * 4 + b]) keep |= 1u << b, ++n;
      for (int b = 0; b < 4 && n < 2; ++b)
        if (!(keep & (1u << b))) keep |= 1u << b, ++n;
      if (n > 2) return false;
      mask |= uint64_t(keep) << (lane * 4);
    }
    for (int b = 0; b < 8; ++b) o[b] = uint8_t(mask >> (8 * b));  // little-endian, as the kernel loads it
    for (int b = 0, j = 8; b < 64; ++b)
      if ((mask >> b) & 1) o[j++] = step[b];
  }
  std::memset(out + steps * kCompactStepBytes, 0, qtile_compact_bytes(t) - size_t(steps * kCompactStepBytes));
  t.compact = out;
  return true;
}

// K % 64: the N:M kernels' columns past the last whole 64-column block are exact fp32, not int8 math.
bool nm_qtiles_supported(const WeightView& w) { return nm_q8_segment(w) > 0 && w.K % 64 == 0; }

size_t nm_qtile_bytes(const WeightView& w) {
  DenseNM d;
  if (!dense_nm(w, d)) return 0;
  return tile_bytes(d.q, w.N, w.nm.values == ValueKind::i4 ? 4 : 8, d.seg);
}

QTileView build_nm_qtiles(const WeightView& w, void* buf) {
  DenseNM d;
  if (!dense_nm(w, d)) return QTileView();
  return build_tiles(d.q, w.N, w.nm.values == ValueKind::i4 ? 4 : 8, d.seg, buf);
}

void quantize_act_scalar(const float* x, int64_t rows, int64_t K, int64_t stride_x, const QTileView& t, int8_t* q,
                         float* scale, int32_t* sum, uint8_t flip) {
  const int64_t row_q = t.nseg * t.seg_pad;
  for (int64_t m = 0; m < rows; ++m) {
    const float* xr = x + m * stride_x;
    for (int64_t s = 0; s < t.nseg; ++s) {
      int8_t* qs = q + m * row_q + s * t.seg_pad;
      const int64_t k0 = s * t.seg, k1 = k0 + t.seg < K ? k0 + t.seg : K;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = std::fabs(xr[k]);
        finite = finite && v <= 3.4028235e38f;  // false for inf and NaN
        amax = v > amax ? v : amax;
      }
      std::memset(qs, flip, size_t(t.seg_pad));
      int32_t total = 0;
      if (!finite) {
        // inf / NaN: the whole segment's contribution becomes NaN (0 * NaN), as it would in fp32
        scale[m * t.nseg + s] = std::nanf("");
      } else if (!(127.f / amax <= 3.4028235e38f)) {  // zero, or below 127 / FLT_MAX (0 * inf is NaN): codes 0
        scale[m * t.nseg + s] = 0.f;
      } else {
        const float inv = 127.f / amax;
        for (int64_t k = k0; k < k1; ++k) {
          float v = xr[k] * inv;
          v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);  // the product may round past 127
          const int32_t c = int32_t(std::nearbyint(v));        // round to nearest even, as cvtps2dq
          qs[k - k0] = int8_t(uint8_t(c) ^ flip);
          total += c;
        }
        scale[m * t.nseg + s] = amax / 127.f;
      }
      sum[m * t.nseg + s] = total;
    }
  }
}

namespace {

Status q8_gemm_scalar(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  const QTileView& t = w.qt;
  if (!t.codes || !a.qx.q || t.nseg * t.seg_pad != a.qx.stride_m) return Status::invalid_argument;
  const int64_t epl = 32 / t.bits, steps = t.seg_pad / epl;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t tile = n / kQTileRows, r = n % kQTileRows;
    for (int64_t m = 0; m < a.M; ++m) {
      float y = 0.f;
      for (int64_t s = 0; s < t.nseg; ++s) {
        const uint8_t* wseg = t.codes + ((tile * t.nseg + s) * steps) * 64 + r * 4;
        const int8_t* xq = a.qx.q + m * a.qx.stride_m + s * t.seg_pad;
        int32_t dot = 0;
        for (int64_t j = 0; j < steps; ++j)
          for (int b = 0; b < 4; ++b) {
            const uint8_t byte = wseg[j * 64 + b];
            if (t.bits == 8) {
              dot += int32_t(int8_t(byte)) * xq[j * 4 + b];
            } else {
              dot += int32_t(byte & 15) * xq[j * 8 + b] + int32_t(byte >> 4) * xq[j * 8 + 4 + b];
            }
          }
        const int64_t g = s / t.segs_per_group, at = (tile * t.n_groups + g) * kQTileRows + r;
        const int32_t z = t.bits == 8 ? 0 : (t.zero ? t.zero[at] : 8);
        const float sx = a.qx.scale[m * t.nseg + s];
        y = std::fmaf(float(dot - z * a.qx.sum[m * t.nseg + s]), t.scale[at] * sx, y);
      }
      store_output(a, m, n, y);
    }
  }
  return Status::ok;
}

}  // namespace

Status int8_q8_gemm_scalar(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return w.qt.bits == 8 ? q8_gemm_scalar(a, w, n_begin, n_end) : Status::invalid_argument;
}

Status int4_q8_gemm_scalar(const GemmArgs& a, const WeightView& w, int64_t n_begin, int64_t n_end) {
  return w.qt.bits == 4 ? q8_gemm_scalar(a, w, n_begin, n_end) : Status::invalid_argument;
}

}  // namespace sparseinfer
