"""Reference vectors for csrc/tests/kernel_test.cpp: packed weights, inputs and expected outputs made
by the Python package itself (``sparseinfer.pack``, ``backends.reference_linear``), so the C++ kernels
-- cross-compiled and run under qemu, or native under ASan -- are checked against the same numbers as
the Python tests.

    python csrc/tests/refvectors.py OUT.bin         # writes the file, prints the record count

File format (little-endian; read by kernel_test.cpp's load_vectors)::

    b"SIREFV01", u32 record count, then per record:
      str name
      u32 count, then (str key, i64 value)                       ints: kind (KernelId), N, K, [n, m]
      u32 count, then (str key, u32 dtype, u32 ndim, i64 dims[ndim], u64 nbytes, bytes)
                                                                   tensors: the packed weight's own
                                                                   tensors (PackedWeight.tensors()
                                                                   names), x [M, K], y [M, N] (the
                                                                   reference), y_mag [M, N] f32
                                                                   (sum_k |x w| + |bias|), w_abs [N]
                                                                   f32 (sum_k |W|), [bias]
    str = u32 length + utf-8 bytes; dtype = the C++ DType enum (f32 0, bf16 1, f16 2, i8 3, u8 4,
    i32 5, i64 6)

One record is one packed weight and one call on it; a few hundred KB to a few MB in all, written
to a temporary directory at test time and never committed.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import torch

MAGIC = b"SIREFV01"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, torch.uint8: 4,
               torch.int32: 5, torch.int64: 6}
KERNEL_IDS = {"int8": 0, "int4": 1, "nm_float": 2, "nm_int8": 3, "nm_int4": 4, "csr_float": 5, "csr_int8": 6}

# (format, pack parameters, dtype of the dense weight handed to pack): every canonical layout and every
# value type the kernels read, as in tests/test_cpu_backend.py.
CASES = [
    ("int8", {"group_size": None}, torch.float32),
    ("int8", {"group_size": 16}, torch.float32),
    ("int4", {"group_size": 32}, torch.float32),
    ("int4", {"group_size": 16, "symmetric": False}, torch.float32),
    ("int4", {"group_size": None, "symmetric": False}, torch.float32),  # odd K: padded to a whole byte
    ("int8", {"group_len": 17}, torch.float32),  # group lengths pack does not make (built directly)
    ("int4", {"group_len": 5}, torch.float32),   # odd: groups start mid-byte; random zero points
    ("2:4", {}, torch.float32),
    ("2:4", {}, torch.bfloat16),
    ("1:4", {}, torch.float16),
    ("3:7", {}, torch.float32),  # 3-bit indices straddle bytes; K % 7 leaves padded kept values
    ("2:4+int8", {"group_size": 16}, torch.float32),
    ("2:4+int4", {"group_size": 16}, torch.float32),
    # groups that let 2:4 + int8 / int4 have dense row tiles (with K a multiple of 64: BIG's K = 192)
    ("2:4+int8", {"group_size": None}, torch.float32),
    ("2:4+int4", {"group_size": 32}, torch.float32),
    ("4:8+int4", {"group_size": None, "symmetric": False}, torch.float32),
    ("csr", {}, torch.float32),
    ("csr", {}, torch.float16),
    ("csr+int8", {}, torch.float32),
]
# Odd shapes: K below, at and above every group / SIMD width (1, 3, 17, 100, 129), N = 1, 7, 33, and
# batches on both sides of the 4-row tiles and of the 16-row GEMV limit.
KS = (1, 3, 17, 100, 129)
NS = (1, 7, 33)
BATCHES = (1, 2, 3, 17)
# Shapes large enough that the driver splits the columns over several threads; the second crosses
# the panel kernels' 256-column N and K blocks with a partial 16-column strip; the third, past 64
# rows, the row-tile kernels' 16-row blocks with a partial one (qtile_gemm.h); the fourth has K a
# multiple of 64, where 2:4 + int8 / int4 get dense row tiles for int8 activations.
BIG = ((1000, 100, (5,)), (300, 270, (7,)), (129, 40, (70,)), (192, 37, (1, 3, 70)))


def case_name(fmt: str, params: dict, wdtype: torch.dtype) -> str:
    parts = [fmt.replace(":", "of")]
    for key, value in params.items():
        parts.append({"group_size": f"g{value or 'row'}", "symmetric": "sym" if value else "asym",
                      "group_len": f"g{value}"}[key])
    parts.append("w" + str(wdtype).removeprefix("torch."))
    return "-".join(parts)


def make_weight(fmt: str, params: dict, wdtype: torch.dtype, n: int, k: int, g: torch.Generator):
    """A packed random weight, as tests/test_cpu_backend.py makes them: groups larger than the row fall
    back to per-channel; CSR weights are ~70% zeros, with one empty row when there are several."""
    import sparseinfer as si

    if "group_len" in params:
        return odd_group_weight(fmt, n, k, params["group_len"], g)
    w = torch.randn(n, k, generator=g)
    if fmt.startswith("csr"):
        w = w * (torch.rand(n, k, generator=g) < 0.3)
        w[0, 0] = 1.5
        if n > 2:
            w[1] = 0
    params = dict(params)
    if ":" in fmt and "+" in fmt:
        nk, m = (int(v) for v in fmt.split("+")[0].split(":"))
        limit = -(-k // m) * nk  # group sizes of quantized N:M values count kept values
    else:
        limit = k
    if (params.get("group_size") or 0) > limit:
        params["group_size"] = None
    return si.pack(w.to(wdtype), fmt, **params)


def odd_group_weight(fmt: str, n: int, k: int, group: int, g: torch.Generator):
    """Random codes, scales (and int4 zero points) with group length `group` (clamped to K); the
    padding past K holds random codes too."""
    from sparseinfer.formats import Int4Weight, Int8Weight

    group = min(group, k)
    n_groups = -(-k // group)
    if fmt == "int4" and n_groups * group % 2:  # whole bytes per row
        n_groups += 1
    kp = n_groups * group
    scale = torch.rand(n, n_groups, generator=g) + 0.25
    if fmt == "int8":
        return Int8Weight(torch.randint(-128, 128, (n, kp), generator=g, dtype=torch.int8), scale, k, group)
    codes = torch.randint(0, 256, (n, kp // 2), generator=g, dtype=torch.uint8)
    return Int4Weight(codes, scale, torch.randint(0, 16, (n, n_groups), generator=g, dtype=torch.uint8), k, group)


def kernel_id(w) -> int:
    from sparseinfer.formats import CSRWeight, Int4Weight, Int8Weight, NMWeight

    if isinstance(w, Int8Weight):
        return KERNEL_IDS["int8"]
    if isinstance(w, Int4Weight):
        return KERNEL_IDS["int4"]
    if isinstance(w, NMWeight):
        return KERNEL_IDS["nm_" + (w.value_format or "float")]
    if isinstance(w, CSRWeight):
        return KERNEL_IDS["csr_int8" if w.quantized else "csr_float"]
    raise TypeError(f"no kernel id for {type(w).__name__}")


def records(seed: int = 0):
    """Yields (name, ints, tensors) for every format x shape x call."""
    from sparseinfer.backends import reference_linear

    g = torch.Generator().manual_seed(seed)
    shapes = [(k, n, BATCHES) for k in KS for n in NS] + list(BIG)
    for fmt, params, wdtype in CASES:
        for k, n, batches in shapes:
            w = make_weight(fmt, params, wdtype, n, k, g)
            ints = {"kind": kernel_id(w), "N": n, "K": k}
            if hasattr(w, "m"):
                ints.update(n=w.n, m=w.m)
            weight_tensors = {name: t.contiguous() for name, t in w.tensors().items()}
            # sum_k |W[n, k]|: scales the activation-quantization error of int8-activation kernels
            weight_tensors["w_abs"] = w.to_dense(torch.float64).abs().sum(dim=1).float()
            for i, m in enumerate(batches):
                # fp32 x for every batch, plus one bf16 or fp16 call (the driver converts them); the
                # bias cycles through none, fp32 and x's dtype.
                for j, dtype in enumerate((torch.float32, torch.bfloat16 if i % 2 == 0 else torch.float16)):
                    x = torch.randn(m, k, generator=g).to(dtype)
                    bias = (None, torch.randn(n, generator=g), torch.randn(n, generator=g).to(dtype))[(i + j) % 3]
                    y = reference_linear(x, w, bias)
                    # sum_k |x w| + |bias| per output: the scale of the rounding error (kernel_test.cpp)
                    mag = x.double().abs() @ w.to_dense(torch.float64).abs().T
                    if bias is not None:
                        mag += bias.double().abs()
                    tensors = {**weight_tensors, "x": x, "y": y, "y_mag": mag.float()}
                    if bias is not None:
                        tensors["bias"] = bias
                    name = f"{case_name(fmt, params, wdtype)}-K{k}-N{n}-M{m}-x{str(dtype).removeprefix('torch.')}"
                    yield name, ints, tensors


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<I", len(b)) + b


def _tensor(t: torch.Tensor) -> bytes:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    head = struct.pack("<II", DTYPE_CODES[t.dtype], t.dim()) + struct.pack(f"<{t.dim()}q", *t.shape)
    return head + struct.pack("<Q", len(data)) + data


def write(path: str | Path, seed: int = 0) -> int:
    """Writes every record to ``path``; returns how many."""
    body = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: a thread pool only adds wake-ups (10x slower here)
    try:
        for name, ints, tensors in records(seed):
            parts = [_str(name), struct.pack("<I", len(ints))]
            parts += [_str(key) + struct.pack("<q", value) for key, value in ints.items()]
            parts.append(struct.pack("<I", len(tensors)))
            parts += [_str(key) + _tensor(t) for key, t in tensors.items()]
            body.append(b"".join(parts))
    finally:
        torch.set_num_threads(threads)
    Path(path).write_bytes(MAGIC + struct.pack("<I", len(body)) + b"".join(body))
    return len(body)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python csrc/tests/refvectors.py OUT.bin")
    print(write(sys.argv[1]))
