"""The exact-mode panel GEMM (sparseinfer/panel_gemm.h) on AVX-512 (panel_gemm_avx512.cpp: 8 x 32
tiles, 32-row strips) and AVX2 (panel_gemm_avx2.cpp: 6 x 16 tiles, 16-row strips), and the AVX-512
row dequantizer of the dense fallback.

The panel kernels decode strips x 256 columns of an int8 / int4 weight into fp32 (rows of codes
transposed as bytes, or row by row for group lengths the AVX-512 whole-strip decoder does not take)
and run register tiles over every batch row; the AVX2 N:M kernel scatters the kept values of each
strip into a zeroed panel (2:4 from meta words, other patterns and tails through the bit reader).
Each call goes through ``_C.linear(..., isa=ISA, act="fp32")`` with the GEMV rows disabled (so M = 1
and 3 reach the panel kernel too), outputs poisoned with NaN, fresh random inputs. Shapes cross
every block edge: N not a multiple of the 32- and 16-row strips nor of the 256-column N block, K not
a multiple of 16 / 64 / 256 nor of the N:M group, M not a multiple of the 8- / 6-row tile.

Tolerance (derived): the kernel multiplies the same fp32 values to_dense() gives, so it differs
from the fp32 reference only in summation order: normwise <= 1e-5 for K <= 1000 (~sqrt(K) * 2^-24
with margin, tests/test_cpu_backend.py), plus the output dtype's rounding for bf16 / fp16.
"""

from __future__ import annotations

import pytest
import torch
from test_cpu_exact_avx2 import odd_group_weight

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import reference_linear
from sparseinfer.backends.cpu import build_native_weight

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason="requires sparseinfer._C")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
BATCHES = [1, 3, 17, 65]
SHAPES = [(1, 1), (33, 7), (45, 64), (300, 17), (1000, 61), (513, 290)]  # (K, N)
# (format, group): pack's groups; ("odd", g) = a weight built directly with group length g, which
# takes the row-by-row decoder (and, for int4, groups starting mid-byte).
CASES = [("int8", None), ("int8", 16), ("int8", 64), ("int8", ("odd", 17)), ("int8", ("odd", 100)),
         ("int4", 32), ("int4", 64), ("int4", 128), ("int4", None), ("int4", ("odd", 5)), ("int4", ("odd", 48))]
# The table rows served before the panel kernels (the GEMV range; float N:M: both sparse-aware rows), per ISA.
GEMV_ROWS = {"avx512": ("int8_gemm_avx512", "int4_gemm_avx512"),
             "avx2": ("int8_gemv_avx2", "int4_gemv_avx2", "nm_gemv_avx2", "nm_gemm_avx2")}
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(C is None or isa not in C.available_isas(),
                                                   reason=f"requires {isa} on this CPU")) for isa in GEMV_ROWS]


@pytest.fixture
def panel_only(request):
    """Disable the GEMV rows of the ISA's table (restored afterwards) so every batch runs the panel kernel."""
    isa = request.node.callspec.params["isa"]
    limits = {r["name"]: r["max_m"] for r in C.kernel_table(isa)}
    for name in GEMV_ROWS[isa]:
        C.set_batch_limit(name, 0)
    yield isa
    for name in GEMV_ROWS[isa]:
        C.set_batch_limit(name, limits[name])


def make_weight(fmt, group, n, k, g):
    if isinstance(group, tuple):
        return odd_group_weight(fmt, n, k, group[1], symmetric=(group[1] % 2 == 1), g=g)
    if group is not None and group > k:
        group = None
    params = {"group_size": group} if fmt == "int8" else {"group_size": group, "symmetric": group != 64}
    return si.pack(torch.randn(n, k, generator=g), fmt, **params)


def check_batches(w, kernel, isa, rng, rel_err):
    """Every batch of BATCHES on `kernel`: fp32 / bf16 / fp16 out, bias or not, thread splits, a row stride."""
    n, k = w.shape
    h = build_native_weight(w)
    for i, m in enumerate(BATCHES):
        assert kernel in C.kernel_candidates(h, m, isa=isa, act="fp32")  # the pick, or a measured candidate
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3] if m > 1 else torch.float32
        bias = torch.randn(n, generator=rng) if i % 2 == 0 else None
        x = torch.randn(m, k + 3 * (i % 2), generator=rng).to(dtype)[:, :k]  # odd rows: row stride k + 3
        out = torch.full((m, n), float("nan"), dtype=dtype)
        C.linear(x, h, out, bias, num_threads=1 + i % 3, isa=isa, act="fp32", kernel=kernel)
        where = f"{kernel} M={m} N={n} K={k} {dtype} bias={bias is not None}"
        assert torch.isfinite(out).all(), f"{where}: unwritten (NaN) outputs"
        assert rel_err(out, reference_linear(x, w, bias)) <= TOL[dtype], where


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=[f"{f}-g{g[1] if isinstance(g, tuple) else g}" for f, g in CASES])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}-N{n}" for k, n in SHAPES])
def test_panel_gemm_matches_reference(case, k, n, isa, rng, rel_err, panel_only):
    fmt, group = case
    check_batches(make_weight(fmt, group, n, k, rng), f"{fmt}_panel_gemm_{isa}", isa, rng, rel_err)


def nm_weight(case, n, k, g):
    """A float N:M weight: values of kind f32 / bf16 / f16; "2:4-swapped": some groups' two indices
    in descending order (the kernel adds each value at its column whatever the order)."""
    pattern, dtype = case
    w = si.pack(torch.randn(n, k, generator=g).to(dtype), pattern.split("-")[0])
    if pattern.endswith("swapped"):  # swap the two indices (and values) of group 0 in every third row
        meta = w.meta.clone()
        meta[::3, 0] = (meta[::3, 0] & 0xF0) | ((meta[::3, 0] & 0x3) << 2) | ((meta[::3, 0] >> 2) & 0x3)
        w.meta.copy_(meta)
        w.values[::3, :2] = w.values[::3, :2].flip(1).clone()
    return w


NM_CASES = [("2:4", torch.float32), ("2:4", torch.bfloat16), ("2:4", torch.float16), ("2:4-swapped", torch.float32),
            ("4:8", torch.float32), ("1:4", torch.float16), ("3:5", torch.float32)]
NM_SHAPES = [(1, 1), (31, 17), (64, 16), (300, 33), (513, 290)]  # (K, N): K past the 32-column 2:4 steps and 256


@pytest.mark.parametrize("isa", [p for p in ISAS if p.values[0] == "avx2"])
@pytest.mark.parametrize("case", NM_CASES, ids=[f"{p}-{str(d)[6:]}" for p, d in NM_CASES])
@pytest.mark.parametrize("k,n", NM_SHAPES, ids=[f"K{k}-N{n}" for k, n in NM_SHAPES])
def test_nm_panel_gemm_matches_reference(case, k, n, isa, rng, rel_err, panel_only):
    w = nm_weight(case, n, k, rng)
    assert w.values.dtype == case[1], "pack kept the value dtype"
    check_batches(w, "nm_panel_gemm_avx2", isa, rng, rel_err)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{g}" for f, g in CASES])
def test_gemv_rows_match_reference(case, k, n, isa, rng, rel_err):
    """The batch-1-to-3 exact kernels (the table rows before the panel GEMM), natively: odd groups and
    groups starting mid-byte, K off every block size, zero points or not, outputs poisoned first."""
    fmt, group = case
    w = make_weight(fmt, group, n, k, rng)
    h = build_native_weight(w)
    kernel = {"avx512": f"{fmt}_gemm_avx512", "avx2": f"{fmt}_gemv_avx2"}[isa]
    for m in (1, 2, 3):
        assert kernel in C.kernel_candidates(h, m, isa=isa, act="fp32")
        x = torch.randn(m, k, generator=rng)
        out = torch.full((m, n), float("nan"))
        C.linear(x, h, out, None, num_threads=1 + m % 2, isa=isa, act="fp32", kernel=kernel)
        assert rel_err(out, reference_linear(x, w, None)) <= TOL[torch.float32], f"{kernel} M={m} N={n} K={k}"


@pytest.mark.parametrize("params", [{"group_size": 128}, {"group_size": 256, "symmetric": False},
                                    {"group_size": None}, {"group_size": 128, "symmetric": False}],
                         ids=["g128", "g256-asym", "per-row", "g128-asym"])
@pytest.mark.parametrize("k, n", [(128, 7), (384, 33), (1024, 2), (1024, 1)])
def test_int4_batch1_row_pairs_match_reference(params, k, n, rng, rel_err):
    """int4_gemm_avx512 at batch 1 on whole 128-code steps (K a multiple of 128, groups of 128, 256 or
    the whole row): pairs of weight rows share a pass; an odd row count leaves one to the one-row
    loop; thread splits start pairs at any row; outputs poisoned first."""
    if "avx512" not in C.available_isas():
        pytest.skip("requires avx512 on this CPU")
    if (params["group_size"] or 0) > k:
        params = {**params, "group_size": None}
    w = si.pack(torch.randn(n, k, generator=rng), "int4", **params)
    h = build_native_weight(w)
    for threads in (1, 2, 3):
        x = torch.randn(1, k, generator=rng)
        out = torch.full((1, n), float("nan"))
        C.linear(x, h, out, None, num_threads=threads, isa="avx512", act="fp32", kernel="int4_gemm_avx512")
        where = f"int4 {params} N={n} K={k} threads={threads}"
        assert torch.isfinite(out).all(), f"{where}: unwritten (NaN) outputs"
        assert rel_err(out, reference_linear(x, w, None)) <= TOL[torch.float32], where


@pytest.mark.parametrize("isa", ISAS)
def test_panel_gemm_large_blocks(isa, rng, rel_err, panel_only):
    """Several 256-column N blocks per thread and K blocks, fp32 output written in place across K blocks."""
    cases = [("int8", {}), ("int4", {"group_size": 64})] + [("2:4", {}), ("4:8", {})] * (isa == "avx2")
    for fmt, params in cases:
        w = si.pack(torch.randn(600, 700, generator=rng), fmt, **params)
        h = build_native_weight(w)
        x = torch.randn(20, 700, generator=rng)
        out = torch.full((20, 600), float("nan"))
        kernel = next(name for name in C.kernel_candidates(h, 20, isa=isa, act="fp32") if "panel_gemm" in name)
        C.linear(x, h, out, None, num_threads=1, isa=isa, act="fp32", kernel=kernel)
        assert rel_err(out, reference_linear(x, w, None)) <= TOL[torch.float32], fmt


@pytest.mark.parametrize("isa", ISAS)
def test_dispatch_uses_gemv_then_panel(isa):
    gemv = {"avx512": {"int8": 3, "int4": 3}, "avx2": {"int8": 8, "int4": 3}}[isa]
    for fmt in ("int8", "int4"):
        h = build_native_weight(si.pack(torch.randn(64, 128), fmt, group_size=64))
        names = [C.kernel_name(h, m, isa=isa, act="fp32") for m in (1, gemv[fmt], gemv[fmt] + 1, 16, 2048)]
        first = f"{fmt}_gemm_avx512" if isa == "avx512" else f"{fmt}_gemv_avx2"
        assert names == [first] * 2 + [f"{fmt}_panel_gemm_{isa}"] * 3
    if isa == "avx2":  # float N:M: the sparse-aware rows are the table's picks, the panel a measured candidate
        h = build_native_weight(si.pack(torch.randn(64, 4096), "2:4"))
        assert C.kernel_name(h, 64, isa="avx2", act="fp32") == "nm_gemm_avx2"
        assert C.kernel_candidates(h, 64, isa="avx2", act="fp32") == ["nm_gemm_avx2", "nm_panel_gemm_avx2"]


@pytest.mark.parametrize("fmt, params", [("int8", {}), ("int8", {"group_size": 16}), ("int4", {"group_size": 32}),
                                         ("int4", {"group_size": 64, "symmetric": False}), ("2:4", {}),
                                         ("2:4+int8", {}), ("2:4+int4", {"group_size": 32}), ("4:8", {})])
@pytest.mark.parametrize("k", [16, 61, 301])
def test_avx512_dequantize_is_to_dense_bit_for_bit(fmt, params, k, rng):
    """_C.dequantize on the active ISA (the AVX-512 row decoder here) gives to_dense()'s exact bits,
    K tails and 2:4 blocks with out-of-order indices (the generic path) included."""
    if C.active_isa() != "avx512":
        pytest.skip("SPARSEINFER_ISA selects another ISA: _C.dequantize would not use the AVX-512 decoder")
    if "int4" in fmt and params["group_size"] > k // (2 if fmt.startswith("2:4") else 1):
        params = {**params, "group_size": None} if fmt == "int4" else {"group_size": 8}
    w = si.pack(torch.randn(37, k, generator=rng), fmt, **params)
    if fmt == "2:4":  # swap the two indices of a group in some rows: still valid, not ascending
        meta = w.meta.clone()
        meta[::3, 0] = (meta[::3, 0] & 0xF0) | ((meta[::3, 0] & 0x3) << 2) | ((meta[::3, 0] >> 2) & 0x3)
        w.meta.copy_(meta)
        w.values[::3, :2] = w.values[::3, :2].flip(1).clone()
    h = build_native_weight(w)
    out = torch.full((37, k), float("nan"))
    C.dequantize(h, 0, 37, out, 2)
    assert torch.equal(out, w.to_dense(torch.float32)), fmt


# -- N:M and CSR on the panels and on the xT GEMM (named in the call: any batch, measured-only rows too)

SPARSE_CASES = [("2:4", {}), ("4:8", {}), ("1:4", {}), ("2:3", {}), ("2:4+int8", {}), ("2:4+int4", {"group_size": 32}),
                ("2:4+int4", {"group_size": 8, "symmetric": False}), ("csr", {}), ("csr+int8", {})]
# (panel GEMM, xT GEMM): the panel GEMM takes float CSR only
SPARSE_KERNELS = {"2:4": ("nm_panel_gemm_avx512", "nm_gemm_avx512"), "4:8": ("nm_panel_gemm_avx512", "nm_gemm_avx512"),
                  "1:4": ("nm_panel_gemm_avx512", "nm_gemm_avx512"), "2:3": ("nm_panel_gemm_avx512", "nm_gemm_avx512"),
                  "2:4+int8": ("nm_int8_panel_gemm_avx512", "nm_int8_gemm_avx512"),
                  "2:4+int4": ("nm_int4_panel_gemm_avx512", "nm_int4_gemm_avx512"),
                  "csr": ("csr_panel_gemm_avx512", "csr_gemm_avx512"), "csr+int8": ("csr_int8_gemm_avx512",)}


def sparse_weight(fmt, params, n, k, g):
    w = torch.randn(n, k, generator=g)
    if fmt.startswith("csr"):
        w = w * (torch.rand(n, k, generator=g) < 0.4)
        w[n // 2] = 0.0  # an empty row
    if "int4" in fmt and params.get("group_size", 0) > (k + 1) // 2:
        params = {**params, "group_size": 8}
    return si.pack(w, fmt, **params)


SPARSE_RUNS = [(f, p, kernel) for f, p in SPARSE_CASES for kernel in SPARSE_KERNELS[f]]
# the xT GEMM's edges too: 16-row vectors (1-4 per block), blocks spread evenly past 64 rows
SPARSE_BATCHES = {"panel": BATCHES, "xT": [1, 3, 17, 33, 65, 130]}


@pytest.mark.parametrize("fmt, params, kernel", SPARSE_RUNS,
                         ids=[f"{f}-{'-'.join(f'{a}{b}' for a, b in p.items())}-{k}" for f, p, k in SPARSE_RUNS])
@pytest.mark.parametrize("k,n", SHAPES[1:] + [(600, 70)], ids=[f"K{k}-N{n}" for k, n in SHAPES[1:] + [(600, 70)]])
def test_sparse_gemm_matches_reference(fmt, params, kernel, k, n, rng, rel_err):
    """N:M (2:4 with vexpandps / meta words, other N:M and K tails generic) and CSR, through the panel
    tile (nonzeros scattered into a zeroed panel) and the xT GEMM (batch rows in zmm lanes, K blocks,
    16 x 16 output transposes); bf16 / fp16 x and out, bias, strided rows, 1-3 threads."""
    w = sparse_weight(fmt, params, n, k, rng)
    h = build_native_weight(w)
    for i, m in enumerate(SPARSE_BATCHES["panel" if "panel" in kernel else "xT"]):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3] if m > 1 else torch.float32
        bias = torch.randn(n, generator=rng) if i % 2 == 0 else None
        x = torch.randn(m, k + 3 * (i % 2), generator=rng).to(dtype)[:, :k]
        out = torch.full((m, n), float("nan"), dtype=dtype)
        C.linear(x, h, out, bias, num_threads=1 + i % 3, isa="avx512", act="fp32", kernel=kernel)
        where = f"{fmt} M={m} N={n} K={k} {dtype} bias={bias is not None}"
        assert torch.isfinite(out).all(), f"{where}: unwritten (NaN) outputs"
        assert rel_err(out, reference_linear(x, w, bias)) <= TOL[dtype], where


def test_sparse_gemm_dispatch():
    """Float N:M and CSR: the AVX2 gemv for a few rows, then the xT GEMM, with the panel GEMM and the
    AVX2 xT GEMM measured candidates; N:M + int8 / int4 (exact): the AVX2 rows, the panel and xT
    GEMMs measured candidates."""
    h = build_native_weight(si.pack(torch.randn(64, 128), "2:4"))
    assert [C.kernel_name(h, m, isa="avx512", act="fp32") for m in (1, 7, 8, 64)] == \
        ["nm_gemv_avx2_avx512"] * 2 + ["nm_gemm_avx512"] * 2
    assert C.kernel_candidates(h, 64, isa="avx512", act="fp32") == ["nm_gemm_avx512", "nm_panel_gemm_avx512",
                                                                    "nm_gemm_avx2"]
    w = si.pack(torch.randn(64, 128) * (torch.rand(64, 128) < 0.5), "csr")
    assert [C.kernel_name(build_native_weight(w), m, isa="avx512", act="fp32") for m in (5, 6)] == \
        ["csr_gemv_avx2_avx512", "csr_gemm_avx512"]
    assert C.kernel_candidates(build_native_weight(w), 64, isa="avx512", act="fp32") == \
        ["csr_gemm_avx512", "csr_gemm_avx2", "csr_panel_gemm_avx512"]
    names = C.kernel_candidates(build_native_weight(si.pack(torch.randn(64, 128), "2:4+int8")), 64, isa="avx512",
                                act="fp32")
    assert names == ["nm_int8_gemm_avx2", "nm_int8_panel_gemm_avx512", "nm_int8_gemm_avx512"], names


def test_sparse_panel_out_of_order_2to4_indices(rng, rel_err):
    """2:4 groups whose two indices are stored descending (valid, summed like the scalar kernel)
    take the generic decoder for their 16 columns."""
    w = si.pack(torch.randn(40, 64, generator=rng), "2:4")
    meta = w.meta.clone()
    meta[::3, 0] = (meta[::3, 0] & 0xF0) | ((meta[::3, 0] & 0x3) << 2) | ((meta[::3, 0] >> 2) & 0x3)
    w.meta.copy_(meta)
    w.values[::3, :2] = w.values[::3, :2].flip(1).clone()
    x = torch.randn(9, 64, generator=rng)
    out = torch.full((9, 40), float("nan"))
    C.linear(x, build_native_weight(w), out, None, 1, "avx512", "fp32", "nm_panel_gemm_avx512")
    assert rel_err(out, reference_linear(x, w, None)) <= TOL[torch.float32]


@pytest.mark.parametrize("isa", [p for p in ISAS if p.values[0] == "avx2"])
def test_nm_panel_gemm_repeated_index_adds(isa, rng, rel_err, panel_only):
    """A 2:4 group naming one column twice (not something pack writes) takes the bit-reader path
    for its strip, which adds both values there, as the other N:M kernels do."""
    w = si.pack(torch.randn(40, 300, generator=rng), "2:4")
    w.meta[5::7, 3] = 0b0101_0000 | (w.meta[5::7, 3] & 0x0F)  # columns 28-31 of some rows: indices (1, 1)
    dense = torch.zeros(40, w.kp).scatter_add_(1, w.indices(), w.kept_values(torch.float32))[:, :300]
    h = build_native_weight(w)
    x = torch.randn(20, 300, generator=rng)
    out = torch.full((20, 40), float("nan"))
    C.linear(x, h, out, None, num_threads=1, isa=isa, act="fp32", kernel="nm_panel_gemm_avx2")
    assert not torch.equal(dense, w.to_dense(torch.float32)), "the weight has repeated indices"
    assert rel_err(out, x @ dense.T) <= TOL[torch.float32]
