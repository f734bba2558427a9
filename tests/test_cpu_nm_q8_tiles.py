"""2:4 + int8 / int4 weights in the int8-activation mode on dense row tiles (csrc/ref/qtile_ref.cpp,
build_nm_qtiles; the rows nm_*_q8_tiles_* of csrc/dispatch.cpp): the weight is made dense once (pruned
positions hold code 0 or the zero point) and run by the int8 / int4 row-tile kernels. Every ISA here
must give the scalar row-tile kernel's bits (the integer math and the fp32 steps are the same), which in
turn are those of the N:M int8-activation kernels (test_cpu_sparse_simd.py checks both against a torch
statement of the mode)."""

from __future__ import annotations

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends.cpu import build_native_weight

C = _native._C
pytestmark = pytest.mark.skipif(
    C is None, reason=f"requires the C++ extension sparseinfer._C ({_native._C_ERROR}); {_native.BUILD_HINT}"
)
ISAS = C.available_isas() if C is not None else ["scalar"]

CASES = [
    ("2:4+int8", {"group_size": None}),
    ("2:4+int8", {"group_size": 64}),
    ("2:4+int4", {"group_size": 32}),
    ("2:4+int4", {"group_size": 128, "symmetric": False}),
    ("2:4+int4", {"group_size": None, "symmetric": False}),
]
# (N, K): N not a multiple of the 16-row tile nor of a 2-tile group; K a multiple of 64 (the layout's
# condition) with one or several activation segments of 64 (K = 320), 192 (576) or 256 (1024) columns.
SHAPES = [(1, 64), (17, 128), (50, 320), (40, 576), (97, 1024)]
BATCHES = [1, 3, 17, 65]


def poisoned(m, n, dtype=torch.float32):
    return torch.full((m, n), float("nan"), dtype=dtype)


def call(x, handle, n, isa, bias=None, threads=2):
    out = poisoned(x.shape[0], n, x.dtype)
    C.linear(x, handle, out, bias, num_threads=threads, isa=isa, act="int8")
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_every_isa_gives_the_scalar_row_tile_bits(case, rng):
    fmt, params = case
    for n, k in SHAPES:
        p = dict(params)
        if (p.get("group_size") or 0) > k // 2:
            p["group_size"] = None
        w = si.pack(torch.randn(n, k, generator=rng), fmt, **p)
        handle = build_native_weight(w)
        for i, m in enumerate(BATCHES):
            x = torch.randn(m, k, generator=rng) * (1 + i)
            bias = torch.randn(n, generator=rng) if i % 2 else None
            assert C.kernel_name(handle, m, isa="scalar", act="int8").endswith("_q8_tiles_scalar")
            ref = call(x, handle, n, "scalar", bias)
            assert torch.isfinite(ref).all(), f"{fmt} {p} N={n} K={k} M={m}: unwritten outputs"
            # |x - dequantized x| <= max|x_row| / 254 per element (round to nearest of max / 127 steps),
            # plus the fp32 steps: the elementwise bound of test_cpu_sparse_simd.int8_act_bound
            wd, xd = w.to_dense().double(), x.double()
            exact = xd @ wd.T + (0 if bias is None else bias.double())
            bound = (xd.abs().amax(1, keepdim=True) / 254 * wd.abs().sum(1) * (1 + 2.0**-20)
                     + (k + 4) * 2.0**-23 * (xd.abs() @ wd.abs().T))
            assert ((ref.double() - exact).abs() <= bound).all(), f"{fmt} {p} N={n} K={k} M={m}: outside the bound"
            for isa in ISAS:
                for threads in (1, 3):
                    out = call(x, handle, n, isa, bias, threads)
                    kernel = C.kernel_name(handle, m, isa=isa, act="int8")
                    assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), \
                        f"{fmt} {p} isa={isa} kernel={kernel} N={n} K={k} M={m} threads={threads}"


def test_half_precision_outputs_round_once(rng):
    w = si.pack(torch.randn(40, 256, generator=rng), "2:4+int8")
    handle = build_native_weight(w)
    x = torch.randn(5, 256, generator=rng)
    for dtype in (torch.bfloat16, torch.float16):
        for isa in ISAS:
            out = call(x.to(dtype), handle, 40, isa)
            assert torch.isfinite(out).all() and torch.equal(out, call(x.to(dtype), handle, 40, "scalar")), (dtype, isa)


def test_tiles_are_built_on_the_first_int8_call_only(rng):
    """fp32 calls never build them; the first int8 call builds the dense tiles (N x K bytes of int8
    codes, K / 2 for int4, plus scales), once; kernel_name says before the call what will run."""
    w = si.pack(torch.randn(64, 512, generator=rng), "2:4+int8")
    handle = build_native_weight(w)
    x = torch.randn(8, 512, generator=rng)
    call_fp32 = poisoned(8, 64)
    C.linear(x, handle, call_fp32, num_threads=2, isa="scalar", act="fp32")
    assert handle.tile_bytes == 0
    name = C.kernel_name(handle, 8, isa="scalar", act="int8")
    assert name == "nm_int8_q8_tiles_scalar"
    a = call(x, handle, 64, "scalar")
    size = handle.tile_bytes
    assert size >= 64 * 512
    b = call(x, handle, 64, "scalar")
    assert handle.tile_bytes == size and torch.equal(a, b)


def test_layouts_without_tiles_keep_their_kernels(rng):
    """K not a multiple of 64 (the N:M kernels end such rows in exact fp32) and N:M other than 2:4 get no
    dense tiles: the N:M kernels (or the exact ones) serve them, and no row-tile kernel is named."""
    for fmt, k in (("2:4+int8", 330), ("4:8+int8", 512), ("1:4+int8", 256)):
        w = si.pack(torch.randn(24, k, generator=rng), fmt)
        handle = build_native_weight(w)
        x = torch.randn(9, k, generator=rng)
        ref = x @ w.to_dense().T
        for isa in ISAS:
            assert "_tiles_" not in C.kernel_name(handle, 9, isa=isa, act="int8"), (fmt, isa)
            out = call(x, handle, 24, isa)
            assert (out - ref).norm() <= 0.02 * ref.norm(), (fmt, isa)
        assert handle.tile_bytes == 0 or "2:4" in fmt  # 2:4 may build the N:M kernels' own copy
