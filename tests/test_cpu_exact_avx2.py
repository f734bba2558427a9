"""The AVX2 exact-mode (fp32 activations) int8 / int4 kernels: int{8,4}_gemv_avx2 (small batches,
codes decoded in registers) and int{8,4}_panel_gemm_avx2 (larger batches, fp32 panels decoded once
per call + 6 x 16 FMA tiles, x86/avx2/panel_gemm_avx2.cpp).

Each call goes through ``_C.linear(..., isa="avx2", act="fp32")`` with the output poisoned with NaN;
the batches are chosen so that both kernels of each format run (checked by name). Besides the
groups ``pack`` makes (powers of two, per-channel), weights are built directly with group lengths
that do not divide 8 / 32 / the 256-wide K panels (3, 5, 7, 17, 33, 100), int4 with and without
zero points, and random codes in the row padding past K (which a kernel must ignore).

Tolerance: normwise ||out - ref|| / ||ref|| <= 1e-5 for fp32 x (the same fp32 products, another
summation order), plus one ulp of the output dtype for bf16 / fp16 (tests/test_cpu_backend.py).
"""

from __future__ import annotations

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import reference_linear
from sparseinfer.backends.cpu import build_native_weight
from sparseinfer.formats import Int4Weight, Int8Weight
from test_cpu_backend import DTYPES, SHAPES, TOL, make_x

C = _native._C
pytestmark = pytest.mark.skipif(
    C is None or "avx2" not in C.available_isas(), reason="requires sparseinfer._C with AVX2 on this CPU"
)

BATCHES = [1, 2, 3, 5, 8, 17, 64]  # gemv: 1-3 batch rows per pass, and several passes
BIG_K_BATCHES = [1, 3, 17, 64]

# (format, group, symmetric): group None = per-channel; an int from `pack`'s powers of two, or
# ("odd", g) for a weight built directly with group length g.
CASES = [
    ("int8", None, True),
    ("int8", 16, True),
    ("int8", ("odd", 3), True),
    ("int8", ("odd", 17), True),
    ("int8", ("odd", 100), True),
    ("int4", 32, True),
    ("int4", 16, False),
    ("int4", None, False),
    ("int4", None, True),
    ("int4", ("odd", 5), True),
    ("int4", ("odd", 7), False),
    ("int4", ("odd", 33), False),
    ("int4", ("odd", 100), True),
]
CASE_IDS = [f"{f}-g{g[1] if isinstance(g, tuple) else g}{'' if s else '-asym'}" for f, g, s in CASES]


def odd_group_weight(fmt: str, n: int, k: int, group: int, symmetric: bool, g: torch.Generator):
    """Random codes and scales with group length `group` (clamped to K); the padding past K holds
    random codes too."""
    group = min(group, k)
    n_groups = -(-k // group)
    if fmt == "int4" and n_groups * group % 2:  # whole bytes per row
        n_groups += 1
    kp = n_groups * group
    scale = torch.rand(n, n_groups, generator=g) + 0.25
    if fmt == "int8":
        return Int8Weight(torch.randint(-128, 128, (n, kp), generator=g, dtype=torch.int8), scale, k, group)
    codes = torch.randint(0, 256, (n, kp // 2), generator=g, dtype=torch.uint8)
    zero = None if symmetric else torch.randint(0, 16, (n, n_groups), generator=g, dtype=torch.uint8)
    return Int4Weight(codes, scale, zero, k, group)


def make_case_weight(fmt, group, symmetric, n, k, g):
    if isinstance(group, tuple):
        return odd_group_weight(fmt, n, k, group[1], symmetric, g)
    if group is not None and group > k:
        group = None
    params = {"group_size": group} if fmt == "int8" else {"group_size": group, "symmetric": symmetric}
    return si.pack(torch.randn(n, k, generator=g), fmt, **params)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}-N{n}" for k, n in SHAPES])
def test_exact_avx2_matches_reference(case, k, n, rng, rel_err):
    fmt, group, symmetric = case
    w = make_case_weight(fmt, group, symmetric, n, k, rng)
    handle = build_native_weight(w)
    kernels = set()
    for i, m in enumerate(BIG_K_BATCHES if k > 1000 else BATCHES):
        kernels.add(C.kernel_name(handle, m, isa="avx2", act="fp32"))
        for j, dtype in enumerate(DTYPES):
            strided = (i + j) % 2 == 1
            bias = torch.randn(n, generator=rng) if (i + j) % 3 != 2 else None
            x = make_x(m, k, dtype, strided, rng)
            out = torch.full((m, n), float("nan"), dtype=dtype)
            C.linear(x, handle, out, bias, num_threads=2, isa="avx2", act="fp32")
            ref = reference_linear(x, w, bias)
            where = (f"{fmt} group={group} sym={symmetric} M={m} N={n} K={k} x:{dtype} strided={strided} "
                     f"bias={bias is not None} kernel={C.kernel_name(handle, m, isa='avx2', act='fp32')}")
            unwritten = (~torch.isfinite(out)).nonzero()[:5].tolist()
            assert not unwritten, f"{where}: unwritten (NaN) outputs at {unwritten}"
            err = rel_err(out, ref)
            assert err <= TOL[dtype], f"{where}: rel err {err:.2e} > {TOL[dtype]:.1e}"
    assert kernels == {f"{fmt}_gemv_avx2", f"{fmt}_panel_gemm_avx2"}, kernels


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_exact_avx2_kernel_selection(fmt):
    """gemv for small batches, gemm above, for any M; the int8-activation rows keep priority."""
    h = build_native_weight(si.pack(torch.randn(8, 64), fmt, group_size=32))
    names = [C.kernel_name(h, m, isa="avx2", act="fp32") for m in (1, 2, 3, 9, 16, 17, 64, 1000)]
    assert names[0] == names[1] == f"{fmt}_gemv_avx2"
    assert names[-4:] == [f"{fmt}_panel_gemm_avx2"] * 4
    q8 = [C.kernel_name(h, m, isa="avx2", act="int8") == f"{fmt}_q8_gemm_avx2" for m in (1, 16, 17, 1000)]
    assert q8 == ([True] * 4 if fmt == "int4" else [True, True, False, False])  # int8: exact gemm wins past 16


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 3, 17, 130])
def test_exact_avx2_thread_splits_and_chunks(fmt, m, rng, rel_err):
    """N not a multiple of the 16-row strips, split over 1-3 threads; 130 batch rows are 21 whole
    6-row tiles and a partial one; K = 600 crosses two 256-wide K blocks, with a group (100) straddling
    each edge."""
    w = odd_group_weight(fmt, 203, 600, 100, False, rng)
    handle = build_native_weight(w)
    x = make_x(m, 600, torch.float32, True, rng)
    ref = reference_linear(x, w)
    for threads in (1, 2, 3):
        out = torch.full((m, 203), float("nan"))
        C.linear(x, handle, out, None, num_threads=threads, isa="avx2", act="fp32")
        assert rel_err(out, ref) <= TOL[torch.float32], f"threads={threads}"


def test_exact_avx2_broadcast_rows(rng, rel_err):
    """x rows that alias (row stride 0) through the gemm kernels."""
    for fmt in ("int8", "int4"):
        w = make_case_weight(fmt, 32, True, 40, 300, rng)
        x = torch.randn(1, 300, generator=rng).expand(20, 300)
        out = torch.full((20, 40), float("nan"))
        C.linear(x, build_native_weight(w), out, None, num_threads=2, isa="avx2", act="fp32")
        assert rel_err(out, reference_linear(x.contiguous(), w)) <= TOL[torch.float32]
