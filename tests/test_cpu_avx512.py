"""The int8-activation mode (ActMode::int8) and the AVX-512 kernels of the C++ CPU backend.

* Every ISA's int8-activation kernel gives the bits of the scalar one (``int*_q8_gemm_scalar``,
  the plain statement of the integer math), on every shape, format and batch: the integer dot
  products are exact and the fp32 epilogue is the same sequence of roundings everywhere.
* The scalar one is within a derived bound of the exact product (below).
* The AVX-512 sources themselves are checked on any machine by compiling them against scalar
  stand-ins for their intrinsics (tests/native/): where the CPU has AVX-512 they also run for
  real through ``_C`` in the tests above and in tests/test_cpu_backend.py.

Outputs are preallocated and poisoned with NaN, so an element a kernel forgets shows up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import reference_linear
from sparseinfer.backends.cpu import build_native_weight

C = _native._C
pytestmark = pytest.mark.skipif(
    C is None, reason=f"requires the C++ extension sparseinfer._C ({_native._C_ERROR}); {_native.BUILD_HINT}"
)
ISAS = C.available_isas() if C is not None else ["scalar"]
ROOT = Path(__file__).resolve().parents[1]

# (format, pack parameters): per-channel and grouped int8; int4 with the groups of real models,
# per-channel, and asymmetric (per-row-and-group zero points).
FORMATS = [
    ("int8", {"group_size": None}),
    ("int8", {"group_size": 32}),
    ("int8", {"group_size": 64}),
    ("int8", {"group_size": 128}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 64}),
    ("int4", {"group_size": 128}),
    ("int4", {"group_size": None}),
    ("int4", {"group_size": 32, "symmetric": False}),
    ("int4", {"group_size": None, "symmetric": False}),
]
FORMAT_IDS = [f"{f}-g{p['group_size']}{'-asym' if p.get('symmetric') is False else ''}" for f, p in FORMATS]
KS = [1, 3, 17, 100, 129, 4095]
NS = [1, 7, 33]
BATCHES = [1, 2, 3, 17, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_weight(fmt, params, n, k, g):
    params = dict(params)
    if (params.get("group_size") or 0) > k:
        params["group_size"] = None
    return si.pack(torch.randn(n, k, generator=g), fmt, **params)


def make_x(m, k, dtype, strided, g):
    if strided:  # rows 3 elements apart from where a contiguous tensor would put them
        return torch.randn(m, k + 3, generator=g)[:, 1 : k + 1].to(dtype)
    return torch.randn(m, k, generator=g).to(dtype)


def run(x, handle, n, bias=None, isa=None, act="int8", threads=2):
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)
    C.linear(x, handle, out, bias, num_threads=threads, isa=isa, act=act)
    return out


def int8_act_bound(x, w, out_dtype, exact):
    """Elementwise bound on |y_int8act - y| with y = exact = x @ W_q.T + bias in float64 (W_q =
    w.to_dense(), what the reference multiplies by).

    The driver quantizes each segment s of a row of x (<= 128 elements, never straddling a weight
    scale group) as q = round(x / d_s), d_s = max|x_s| / 127, so |x_k - q_k d_s| <= d_s / 2
    <= max_k |x_k| / 254 =: e. Integer dot products and the zero-point term are exact, so
    |sum_k W_nk (x_k - xhat_k)| <= e * sum_k |W_nk|. The fp32 epilogue (one product and one FMA per
    segment, then the bias) and the reference's own fp32 sums add at most K * 2^-23 * sum_k |x_k W_nk|
    (a loose Higham-style bound: both sides err by <= (K + 2) u * sum |x W| with u = 2^-24), and
    representing x_k d_s in fp32 another 2^-22 relative. Rounding to bf16 / fp16 outputs adds half an
    ulp of |y| (bounded by 2^-8 / 2^-11 relative, taken twice for room; fp16 also its subnormal step)."""
    xf, wd = x.double(), w.to_dense().double()
    e = xf.abs().amax(dim=1, keepdim=True) / 254.0
    quant = e * wd.abs().sum(dim=1)[None, :]
    fp32 = (w.shape[1] + 4) * 2.0**-23 * (xf.abs() @ wd.abs().T)
    bound = quant * (1 + 2.0**-20) + fp32
    ref = exact.abs()
    if out_dtype == torch.bfloat16:
        bound = bound + 2 * 2.0**-8 * (ref + bound)
    elif out_dtype == torch.float16:
        bound = bound + 2 * 2.0**-11 * (ref + bound) + 2.0**-24
    return bound


# -- every ISA against the scalar int8-activation kernel, bit for bit --------------------------------

@pytest.mark.parametrize("case", FORMATS, ids=FORMAT_IDS)
def test_int8_act_bitwise_equal_across_isas_and_within_bound(case, rng):
    fmt, params = case
    for k in KS:
        for n in NS:
            w = make_weight(fmt, params, n, k, rng)
            handle = build_native_weight(w)
            for i, m in enumerate([1, 17] if k > 1000 else BATCHES):
                dtype = DTYPES[(i + k) % 3]
                strided = (i + n) % 2 == 1
                bias = torch.randn(n, generator=rng) if (i + k) % 3 != 1 else None
                x = make_x(m, k, dtype, strided, rng)
                where = f"{fmt} {params} M={m} N={n} K={k} x:{dtype} strided={strided} bias={bias is not None}"
                ref_bits = run(x, handle, n, bias, isa="scalar")
                unwritten = (~torch.isfinite(ref_bits)).nonzero()[:5].tolist()
                assert not unwritten, f"{where}: scalar left NaN at {unwritten}"
                for isa in ISAS[1:]:
                    out = run(x, handle, n, bias, isa=isa)
                    if "_q8_" not in C.kernel_name(handle, m, isa=isa, act="int8"):
                        # the mode permits int8 x; where this ISA's exact kernel is faster it runs that
                        exact = reference_linear(x.float(), w, bias).double()
                        rel = ((out.double() - exact).norm() / exact.norm()).item()
                        assert rel <= 1e-5 + (2.0**-7 if dtype != torch.float32 else 0), f"{where} isa={isa}: {rel}"
                        continue
                    diff = (out.view(torch.int16 if dtype != torch.float32 else torch.int32)
                            != ref_bits.view(torch.int16 if dtype != torch.float32 else torch.int32)).nonzero()
                    assert diff.numel() == 0, (
                        f"{where} isa={isa} ({C.kernel_name(handle, m, isa=isa, act='int8')}): differs from "
                        f"the scalar kernel at {diff[:4].tolist()}: {out[tuple(diff[0])].item()} vs "
                        f"{ref_bits[tuple(diff[0])].item()}")
                exact = reference_linear(x.float(), w, bias).double()
                err = (ref_bits.double() - exact).abs()
                bound = int8_act_bound(x.float(), w, dtype, exact)
                worst = (err - bound).argmax()
                wi, wj = divmod(worst.item(), n)
                assert (err <= bound).all(), (f"{where}: |err| {err[wi, wj].item():.3e} > bound "
                                              f"{bound[wi, wj].item():.3e} at ({wi}, {wj})")


def test_int8_act_typical_error_and_threads(rng, rel_err):
    """Model-sized: the normwise error of the int8 mode on Gaussian activations is ~0.6% (the
    d/sqrt(12) rounding noise of per-128 blocks, d = max|x| / 127), and any thread split gives the
    same bits."""
    w = si.pack(torch.randn(512, 1024, generator=rng) * 0.02, "int4", group_size=128)
    handle = build_native_weight(w)
    x = torch.randn(8, 1024, generator=rng)
    outs = [run(x, handle, 512, threads=t) for t in (1, 2, 3)]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    err = rel_err(outs[0], reference_linear(x, w))
    assert 1e-3 < err < 1.5e-2, err


def test_nonfinite_activations_give_nan_rows(rng):
    """An inf or NaN in x poisons its own output row (as it would in fp32: as NaN), never others."""
    w = si.pack(torch.randn(20, 300, generator=rng), "int8")
    x = torch.randn(3, 300, generator=rng)
    x[1, 7] = float("inf")
    for isa in ISAS:
        out = run(x, build_native_weight(w), 20, isa=isa)
        assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all(), isa


def test_tiny_and_zero_segments_quantize_to_zero_on_every_isa(rng):
    """A segment of x whose max |x| is 0 or below 127 / FLT_MAX (127 / max would overflow to inf, and
    0 * inf is NaN) gives codes 0 and scale 0, on every ISA the scalar kernel's bits; the row's other
    segments are quantized as usual: its output is the reference's on them, to the int8 mode's error."""
    w = si.pack(torch.randn(24, 300, generator=rng), "int8")
    handle = build_native_weight(w)
    x = torch.randn(5, 300, generator=rng)
    x[1, :128] = 0.0
    x[2, 128:256] = torch.randn(128, generator=rng) * 1e-40  # subnormal
    x[2, 128:256:3] = 0.0
    x[3, 256:] = 1e-39
    x[4, :128] = torch.randn(128, generator=rng) * 1e-37  # normal, but 127 / max overflows
    x[4, :128:3] = 0.0
    ref = run(x, handle, 24, isa="scalar")
    assert torch.isfinite(ref).all()
    for isa in ISAS:
        assert torch.equal(run(x, handle, 24, isa=isa), ref), isa
    tiny = x.abs() < 4e-37
    want = reference_linear(torch.where(tiny, 0.0, x), w)
    assert ((ref - want).norm(dim=1) / want.norm(dim=1)).max() < 2e-2


def test_broadcast_rows_and_empty_batch(rng):
    w = si.pack(torch.randn(9, 70, generator=rng), "int4", group_size=32)
    x = torch.randn(1, 70, generator=rng).expand(5, 70)  # row stride 0
    for isa in ISAS:
        out = run(x, build_native_weight(w), 9, isa=isa)
        assert torch.equal(out, run(x.contiguous(), build_native_weight(w), 9, isa="scalar")), isa
    C.linear(torch.empty(0, 70), build_native_weight(w), torch.empty(0, 9), act="int8")


# -- dispatch, modes, tiles ------------------------------------------------------------------------------

def test_kernel_selection_by_mode_and_isa():
    for fmt in ("int8", "int4"):
        h = build_native_weight(si.pack(torch.randn(32, 64), fmt, group_size=32))
        assert C.kernel_name(h, 1, isa="scalar", act="int8") == f"{fmt}_q8_gemm_scalar"
        assert C.kernel_name(h, 1, isa="scalar", act="fp32") == f"{fmt}_gemm_scalar"
        if "avx2" in ISAS:  # int8 weights: past 16 rows AVX2's exact gemm beats its q8 one (dispatch.cpp)
            for batch in (1, 16, 17, 256):
                q8 = fmt == "int4" or batch <= 16
                assert C.kernel_name(h, batch, isa="avx2", act="int8") == (f"{fmt}_q8_gemm_avx2" if q8 else
                                                                           f"{fmt}_panel_gemm_avx2")
        if "avx512" in ISAS:
            vnni, amx = C.cpu_features()["avx512_vnni"], C.cpu_features()["amx_int8"]
            want = f"{fmt}_q8_gemm_amx" if amx else f"{fmt}_q8_gemm_vnni_avx512" if vnni else f"{fmt}_q8_gemm_avx2"
            assert C.kernel_name(h, 64, isa="avx512", act="int8") == want
            if amx:  # a few rows: the VNNI kernel, under its small-batch row's name
                assert C.kernel_name(h, 1, isa="avx512", act="int8") == f"{fmt}_q8_gemv_vnni_avx512"
            assert C.kernel_name(h, 3, isa="avx512", act="fp32") == f"{fmt}_gemm_avx512"  # GEMV rows
            assert C.kernel_name(h, 64, isa="avx512", act="fp32") == f"{fmt}_panel_gemm_avx512"
    # CSR ignores the mode; 2:4 + int8 / int4 has its own int8 gemv (tests/test_cpu_sparse_simd.py)
    csr = build_native_weight(si.pack(torch.randn(8, 32), "csr+int8"))
    assert C.kernel_name(csr, 1, act="int8") == C.kernel_name(csr, 1, act="fp32")


AMX = C is not None and C.cpu_features().get("amx_int8", False)
VNNI = C is not None and "avx512" in C.available_isas() and C.cpu_features().get("avx512_vnni", False)


SHAPES = ((1, 7), (17, 33), (100, 50), (129, 1), (300, 70), (1024, 33))  # (K, N)


def check_named_kernel_bits(kernel, fmt, params, rng, shapes=SHAPES):
    """``kernel`` named in the call gives the scalar kernel's bits at every batch (partial register
    and AMX tiles: 1, 3, 7-9, 15-17, 33, 64 rows), segments that are not whole tile steps, odd N (row
    tiles split over threads) and every output dtype, outputs poisoned before the call."""
    for k, n in shapes:
        w = make_weight(fmt, params, n, k, rng)
        handle = build_native_weight(w)
        for i, m in enumerate((1, 3, 7, 8, 9, 15, 16, 17, 33, 64)):
            dtype = DTYPES[(i + k) % 3]
            x = make_x(m, k, dtype, (i + n) % 2 == 1, rng)
            bias = torch.randn(n, generator=rng) if i % 2 else None
            ref = run(x, handle, n, bias, isa="scalar")
            for threads in (1, 3):
                out = torch.full((m, n), float("nan"), dtype=dtype)
                C.linear(x, handle, out, bias, num_threads=threads, act="int8", kernel=kernel)
                bits = torch.int16 if dtype != torch.float32 else torch.int32
                assert torch.equal(out.view(bits), ref.view(bits)), \
                    f"{kernel} {params} M={m} N={n} K={k} x:{dtype} threads={threads}"


@pytest.mark.parametrize("fmt, params", [("int8", {"group_size": None}), ("int4", {"group_size": 64}),
                                         ("2:4+int8", {})], ids=["int8", "int4-g64", "2of4+int8"])
def test_row_tile_kernels_give_the_scalar_bits_in_row_and_column_blocks(fmt, params, rng):
    """Past 64 rows the row-tile kernels (qtile_gemm.h) go in blocks of 16 batch rows, and a thread's
    columns in blocks of about 512 KB of codes: 65 and 100 rows (a partial last block) on a weight of
    two column blocks for one thread, one for each of three, bf16 and fp32 x / y; every int8-activation
    kernel on the row tiles that each ISA here lists at 100 rows (the table's pick and the measured
    candidates)."""
    n, k = (1100 if fmt == "int4" else 600), 1024
    w = si.pack(torch.randn(n, k, generator=rng), fmt, **params)
    handle = build_native_weight(w)
    names = {(isa, name) for isa in ISAS for name in C.kernel_candidates(handle, 100, isa, "int8")
             if "_q8_" in name and "amx" not in name}
    assert names or ISAS == ["scalar"], ISAS
    for m, dtype in ((65, torch.bfloat16), (100, torch.float32)):
        x = make_x(m, k, dtype, m == 65, rng)
        bias = torch.randn(n, generator=rng)
        ref = run(x, handle, n, bias, isa="scalar")
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        for isa, name in sorted(names):
            for threads in (1, 3):
                out = torch.full((m, n), float("nan"), dtype=dtype)
                C.linear(x, handle, out, bias, num_threads=threads, isa=isa, act="int8", kernel=name)
                assert torch.equal(out.view(bits), ref.view(bits)), f"{name} M={m} x:{dtype} threads={threads}"


@pytest.mark.skipif(not AMX, reason="this CPU has no AMX-INT8 (or Linux did not grant the tile state): "
                    "the AMX kernels cannot run here; the table never selects them on such a CPU")
@pytest.mark.parametrize("case", FORMATS, ids=FORMAT_IDS)
def test_amx_kernels_give_the_scalar_bits_at_every_batch(case, rng):
    """The AMX kernels named directly (the table runs them from 7 / 13 rows)."""
    fmt, params = case
    check_named_kernel_bits(f"{fmt}_q8_gemm_amx", fmt, params, rng)


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: the vpdpbusd kernels cannot run here "
                    "(test_avx512_kernels_under_emulation runs them emulated)")
@pytest.mark.parametrize("tile", ["vnni", "vnni4x4"])
@pytest.mark.parametrize("case", FORMATS, ids=FORMAT_IDS)
def test_vnni_register_tiles_give_the_scalar_bits_at_every_batch(case, tile, rng):
    """Both register tiles of the VNNI kernels (the table's 8 x 48, the measured 4 x 64) named directly."""
    fmt, params = case
    check_named_kernel_bits(f"{fmt}_q8_gemm_{tile}_avx512", fmt, params, rng)


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: the vpdpbusd kernels cannot run here "
                    "(test_avx512_kernels_under_emulation runs them emulated)")
@pytest.mark.parametrize("tile", ["vnni", "vnni4x4"])
@pytest.mark.parametrize("fmt, params", [("2:4+int8", {}), ("2:4+int4", {"group_size": 32})])
def test_nm_row_tiles_give_the_scalar_bits_with_both_register_tiles(fmt, params, tile, rng):
    """(K a multiple of 64: the N:M weights' row tiles take whole 64-column blocks)"""
    check_named_kernel_bits(f"nm_{fmt[4:]}_q8_tiles_{tile}_avx512", fmt, params, rng,
                            shapes=((64, 7), (128, 33), (192, 50), (320, 1), (576, 70), (1024, 33)))


VBMI2 = VNNI and C.cpu_features().get("avx512_vbmi2", False)
NO_VBMI2 = ("this CPU lacks AVX-512 VNNI or VBMI2 (vpexpandb): the compact-step kernel cannot run here "
            "(test_avx512_kernels_under_emulation runs it emulated)")


@pytest.mark.skipif(not VBMI2, reason=NO_VBMI2)
def test_compact_steps_give_the_scalar_bits(rng):
    """2:4 + int8 row tiles on their compact steps (vpexpandb), named at every batch (the table runs
    them at 1-2 rows)."""
    check_named_kernel_bits("nm_int8_q8_compact_vnni_avx512", "2:4+int8", {}, rng,
                            shapes=((64, 7), (128, 33), (192, 50), (320, 1), (576, 70), (1024, 33)))


@pytest.mark.skipif(not VBMI2, reason=NO_VBMI2)
def test_compact_steps_serve_one_or_two_rows_of_2_4_int8(rng):
    """1-2 rows of 2:4 + int8 run the compact steps, built beside the dense row tiles on their first
    use (40 bytes per 64-byte step); 2:4 + int4 keeps the dense steps at every batch."""
    for fmt in ("2:4+int8", "2:4+int4"):
        h = build_native_weight(si.pack(torch.randn(48, 256, generator=rng), fmt))
        family = f"nm_{fmt[4:]}"
        small = f"{family}_q8_compact_vnni_avx512" if fmt == "2:4+int8" else f"{family}_q8_tiles_vnni_avx512"
        assert [C.kernel_name(h, m, act="int8") for m in (1, 2, 3)] == [small, small, f"{family}_q8_tiles_vnni_avx512"]
        if fmt == "2:4+int8":  # the dense steps stay a candidate the routes time at 1-2 rows
            assert C.kernel_candidates(h, 1, None, "int8")[:2] == [small, f"{family}_q8_dense_steps_vnni_avx512"]
        x = torch.randn(3, 256, generator=rng)
        three = run(x, h, 48)
        dense_tiles = h.tile_bytes
        one = run(x[:1], h, 48)
        steps = 3 * 256 // 4  # 3 row tiles x 256 columns, 4 a step
        assert h.tile_bytes - dense_tiles == (steps * 40 if fmt == "2:4+int8" else 0), fmt
        assert torch.equal(one, three[:1]), fmt  # the same bits at 1 row as in the 3-row call
        assert torch.equal(one, run(x[:1], h, 48, isa="scalar")), fmt


def test_tiles_are_built_once_on_first_int8_call(rng):
    w = si.pack(torch.randn(40, 256, generator=rng), "int4", group_size=64)
    h = build_native_weight(w)
    x = torch.randn(2, 256, generator=rng)
    run(x, h, 40, act="fp32")
    assert h.tile_bytes == 0  # the exact mode never pays for them
    a = run(x, h, 40)
    size = h.tile_bytes
    assert size >= 40 * 256 // 2
    b = run(x, h, 40)
    assert h.tile_bytes == size and torch.equal(a, b)


def test_act_argument_errors():
    """The extension accepts exactly sparseinfer.act's modes (no aliases) and says which."""
    h = build_native_weight(si.pack(torch.randn(8, 64), "int8"))
    x, out = torch.randn(1, 64), torch.empty(1, 8)
    for bad in ("int4", "fast", "exact"):
        with pytest.raises(ValueError, match=rf"unknown act '{bad}'; use one of auto, fp32, int8"):
            C.linear(x, h, out, act=bad)
    with pytest.raises(TypeError, match="act must be a string or None"):
        C.linear(x, h, out, act=8)


# -- the AVX-512 sources, on any machine -------------------------------------------------------------------

def _compiler():
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_compiler() is None, reason="requires a C++17 compiler (g++ / clang++) to build the harness")
def test_avx512_kernels_under_emulation(tmp_path):
    """csrc/x86/avx512/*.cpp built with -DSPARSEINFER_AVX512_EMULATION (tests/native/avx512_emulation.h
    in place of <immintrin.h>) against the scalar kernels: q8 kernels bit for bit, exact kernels to
    1e-5, on 1,694 (format x shape x batch x column split) cases."""
    # panel_gemm_avx512.cpp, sparse_gemm_avx512.cpp and decode_avx512.cpp (256-bit and shuffle intrinsics
    # the emulation lacks) run natively only: tests/test_panel_gemm.py, tests/test_cpu_sparse_simd.py,
    # tests/test_llm.py's native decode steps, on AVX-512 machines.
    native_only = {"panel_gemm_avx512.cpp", "sparse_gemm_avx512.cpp", "decode_avx512.cpp"}
    kernels = [p for p in sorted((ROOT / "csrc/x86/avx512").glob("*.cpp")) if p.name not in native_only]
    sources = [ROOT / "tests/native/avx512_emulation_test.cpp", *kernels,
               *(ROOT / "csrc/ref" / f for f in ("qtile_ref.cpp", "nm_q8_prepack_ref.cpp", "int8_ref.cpp", "int4_ref.cpp"))]
    exe = tmp_path / "avx512_emulation_test"
    flags = ["-std=c++17", "-O1", "-ffp-contract=off", "-w", "-DSPARSEINFER_AVX512_EMULATION",
             "-DSPARSEINFER_HAVE_AVX512", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'tests/native'}",
             f"-I{ROOT / 'csrc/ref'}"]
    objects = [tmp_path / f"{i}.o" for i in range(len(sources))]
    jobs = [subprocess.Popen([_compiler(), *flags, "-c", str(src), "-o", str(obj)], stderr=subprocess.PIPE,
                             text=True) for src, obj in zip(sources, objects)]  # in parallel
    for job, src in zip(jobs, sources):
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, f"{src}: {err[-4000:]}"
    link = subprocess.run([_compiler(), *map(str, objects), "-o", str(exe)], capture_output=True, text=True,
                          timeout=120)
    assert link.returncode == 0, link.stderr[-4000:]
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and " 0 failed" in result.stdout, result.stdout[-4000:]
