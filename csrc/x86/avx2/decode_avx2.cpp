// The decode-step math (sparseinfer/decode.h) compiled with this group's flags.
#include "sparseinfer/decode.h"

namespace sparseinfer {

DecodeOps decode_ops_avx2() { return decode_math::ops(); }

}  // namespace sparseinfer
