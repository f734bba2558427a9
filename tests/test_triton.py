"""The Triton backend: every kernel against the reference, plus dispatch, prepack and bad input.

Where the kernels run: on a CUDA GPU when there is one; otherwise on CPU tensors through
Triton's interpreter. Triton chooses interpreter or compiler once, when ``triton`` is first
imported (TRITON_INTERPRET decides how it decorates its own library), so this module imports it
with TRITON_INTERPRET=1 -- if nothing imported it before and there is no GPU -- and then
restores the environment, so that the other test modules keep their CPU dispatch; a fixture
sets the variable again for the tests here (the backend reads it to accept CPU tensors). If
triton was already imported for the compiler on a machine without a GPU, the kernel tests re-run
this file in a subprocess instead.

Interpreter caveats (checked on triton 3.9): bf16 arithmetic is wrong, so the kernels upcast
before any math; out-of-bounds loads are not caught, so every test shape leaves partial tiles on
every edge (N, K, M, split-K ranges) and the outputs are poisoned with NaN before the call.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _import_triton_for_this_machine() -> None:
    if "triton" in sys.modules or torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401 - decorates Triton's library for the interpreter
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_this_machine()

import sparseinfer as si  # noqa: E402
from sparseinfer.backends import BACKENDS, BackendUnavailable, reference_linear, resolve  # noqa: E402
from sparseinfer.backends import triton as triton_backend  # noqa: E402
from sparseinfer.kernels import _common  # noqa: E402

HAS_TRITON = _common.triton is not None
INTERPRETED = HAS_TRITON and _common.interpreting()
ON_GPU = HAS_TRITON and not INTERPRETED and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
IN_PROCESS = INTERPRETED or ON_GPU
needs_kernels = pytest.mark.skipif(not IN_PROCESS, reason="Triton kernels need a GPU or the interpreter in this "
                                   "process (see test_kernels_in_interpreter_subprocess)")

if HAS_TRITON:
    from sparseinfer.kernels.csr_linear import csr_linear
    from sparseinfer.kernels.int4_linear import int4_linear
    from sparseinfer.kernels.int8_linear import int8_linear
    from sparseinfer.kernels.nm_linear import meta_bits, nm_linear, repack_meta

# ||out - ref|| / ||ref||, ref = the fp32 reference rounded to the activation dtype. fp32: K * eps
# for K ~ 100 (different summation order). fp16 / bf16: 2 eps of the dtype -- on a GPU the
# weight is rounded to it before the tensor-core dot (relative error eps/2 per term), and the
# output rounding can differ by an ulp (the interpreter truncates fp32 -> bf16).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (format, pack parameters, K): K leaves a partial K tile (and for N:M a partial group).
FORMATS = [
    ("int8", {}, 100),                                     # per-channel: scale gathered per element
    ("int8", {"group_size": 64}, 100),                     # K tile inside a group: scale after the dot
    ("int8", {"group_size": 8}, 100),                      # groups smaller than a tile
    ("int4", {"group_size": 64}, 100),
    ("int4", {"group_size": 64, "symmetric": False}, 100),  # zero points, one per tile
    ("int4", {"group_size": 32, "symmetric": False}, 100),  # zero points per element
    ("int4", {"group_size": None}, 101),                   # per-channel, odd K (row padded to a byte)
    ("2:4", {}, 101),
    ("4:8", {}, 100),                                      # 3-bit indices, widened to 4 at prepack
    ("1:4", {}, 100),
    ("2:3", {}, 50),                                       # M not a power of two: padded positions
    ("3:8", {}, 100),                                      # N not a power of two
    ("2:4+int8", {"group_size": 16}, 100),
    ("2:4+int8", {}, 99),
    ("2:4+int4", {"group_size": 16}, 100),
    ("2:4+int4", {"group_size": 32, "symmetric": False}, 99),  # zero points, one per tile
]
N = 37  # two 32-row tiles, the second one partial


def _configs(w, variant, split_k=1, block_k=64):
    """Test tilings: 32-row tiles, 64-column K tiles (N:M: BLOCK_K/2 kept values per GEMV step,
    BLOCK_G groups covering BLOCK_K columns per dot step)."""
    if w.kind == "nm":
        bg = max(block_k // _common.next_pow2(w.m), 1)
        if variant == "gemv":
            return dict(BLOCK_N=32, BLOCK_C=block_k // 2, SPLIT_K=split_k)
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_G=max(bg, 16 // _common.next_pow2(w.m)), GROUP_M=2,
                    SPLIT_K=split_k)
    if variant == "gemv":
        return dict(BLOCK_N=32, BLOCK_K=block_k, SPLIT_K=split_k)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=2, SPLIT_K=split_k)


def _run(w, x, bias, out, variant=None, config=None):
    """One kernel launch on the backend's prepacked operands (what TritonBackend.linear runs)."""
    p = triton_backend._prepack(w)
    if p["kind"] == "int8":
        return int8_linear(x, p["qweight"], p["scale_t"], bias, out=out, variant=variant, config=config)
    if p["kind"] == "int4":
        return int4_linear(x, p["qweight"], p["scale_t"], p["zero_t"], bias, out=out, variant=variant, config=config)
    if p["kind"] == "nm":
        return nm_linear(x, p["values"], p["meta"], p["n"], p["m"], bias, scale_t=p["scale_t"], zero_t=p["zero_t"],
                         value_format=p["value_format"], out=out, variant=variant, config=config)
    return p["plan"].run_triton(x, bias, out=out, config=config)


def _weight(fmt, params, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if fmt.startswith("csr"):
        w = w * (torch.rand(n, k, generator=g) > 0.7)
        w[1] = 0  # an empty row
        w[2] = torch.randn(k, generator=g)  # a full row
    return si.pack(w.to(DEVICE), fmt, **params)


def _guarded(values: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """``values`` as a view into a NaN-filled buffer with ``pad`` extra columns and rows: the
    interpreter does not catch out-of-bounds loads, but one that reads past a row (or the last
    row) of x or the bias now turns the result into NaN, even where it meets a zero weight."""
    if values.dim() == 1:
        buf = torch.full((values.shape[0] + pad,), float("nan"), dtype=values.dtype, device=values.device)
        buf[: values.shape[0]] = values
        return buf[: values.shape[0]]
    rows, cols = values.shape
    buf = torch.full((rows + 1, cols + pad), float("nan"), dtype=values.dtype, device=values.device)
    buf[:rows, :cols] = values
    return buf[:rows, :cols]


def _inputs(m, k, n, dtype, seed, with_bias=True, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, m, generator=g).to(DEVICE, dtype)
    x = _guarded(x).T if strided else _guarded(x.T.contiguous())
    bias = _guarded(torch.randn(n, generator=g).to(DEVICE)) if with_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    return x, bias, out


def _check(y, out, x, w, bias, what):
    assert y.data_ptr() == out.data_ptr(), f"{what}: the kernel did not write into the given output"
    ref = reference_linear(x, w, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), f"{what}: {int((~torch.isfinite(y)).sum())} entries left unwritten (NaN)"
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    if err > TOL[x.dtype]:
        i = int((y.float() - ref.float()).abs().argmax())
        r, c = divmod(i, y.shape[1])
        pytest.fail(f"{what}: ||out-ref||/||ref|| = {err:.2e} > {TOL[x.dtype]:.0e}; worst at ({r}, {c}): "
                    f"reference = {ref[r, c].item():.6g}, kernel = {y[r, c].item():.6g} "
                    f"(M x N x K = {x.shape[0]} x {w.shape[0]} x {w.shape[1]})")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """During these tests only: TRITON_INTERPRET=1 (the backend accepts CPU tensors), no integer
    overflow checks in the interpreter (they double its cost; test shapes are far from 2^31), and
    no autotuning on a GPU (default calls run the first candidate config; one test tunes)."""
    monkeypatch.setenv("SPARSEINFER_TRITON_AUTOTUNE", "0")
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        if hasattr(builder, "options") and hasattr(builder.options, "sanitize_overflow"):
            monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=False))
    yield


# -- every kernel against the reference ---------------------------------------------------------

def _kernel_cases():
    cases = []
    for i, (fmt, params, k) in enumerate(FORMATS):
        for variant, batches in (("gemv", (1, 3)), ("dot", (1, 3, 17))):
            for j, m in enumerate(batches):
                dtype = DTYPES[(i + j + (variant == "dot")) % 3]
                cases.append(pytest.param(fmt, params, k, variant, m, dtype, (i + j) % 2 == 0,
                                          id=f"{fmt}-{params}-{variant}-M{m}-{str(dtype)[6:]}"))
    return cases


@needs_kernels
@pytest.mark.parametrize("fmt,params,k,variant,m,dtype,with_bias", _kernel_cases())
def test_kernel_matches_reference(fmt, params, k, variant, m, dtype, with_bias):
    w = _weight(fmt, params, N, k, seed=k + m)
    x, bias, out = _inputs(m, k, N, dtype, seed=m * 31 + k, with_bias=with_bias)
    y = _run(w, x, bias, out, variant, _configs(w, variant))
    _check(y, out, x, w, bias, f"{fmt} {params} {variant}")


@needs_kernels
@pytest.mark.parametrize("fmt,params,k", [("int8", {"group_size": 64}, 100), ("int4", {"group_size": 32}, 100),
                                          ("2:4+int4", {"group_size": 16, "symmetric": False}, 100)],
                         ids=["int8", "int4", "2:4+int4"])
def test_gemv_batch_17_spans_several_row_blocks(fmt, params, k):
    w = _weight(fmt, params, N, k, seed=5)
    x, bias, out = _inputs(17, k, N, torch.float16, seed=6)
    _check(_run(w, x, bias, out, "gemv", _configs(w, "gemv")), out, x, w, bias, f"{fmt} gemv M=17")


@needs_kernels
@pytest.mark.parametrize("variant", ["gemv", "dot"])
@pytest.mark.parametrize("fmt,params,split_k", [("int8", {"group_size": 64}, 2), ("int4", {"symmetric": False,
                                                "group_size": 32}, 3), ("2:4+int8", {"group_size": 16}, 2)],
                         ids=["int8-split2", "int4-split3", "2:4+int8-split2"])
def test_split_k(fmt, params, split_k, variant):
    """Partial sums per K range, then the reduction (which adds the bias). K=100 in 32-column
    tiles is 4 tiles: 3 splits get 2, 2 and none -- an empty split must still write zeros."""
    w = _weight(fmt, params, N, 100, seed=split_k)
    x, bias, out = _inputs(3, 100, N, torch.float32, seed=7)
    _check(_run(w, x, bias, out, variant, _configs(w, variant, split_k=split_k, block_k=32)), out, x, w, bias,
           f"{fmt} {variant} split_k={split_k}")


@needs_kernels
@pytest.mark.parametrize("variant", ["gemv", "dot"])
@pytest.mark.parametrize("fmt,params", [("int8", {}), ("int4", {"group_size": 64}), ("2:4+int4", {"group_size": 32})],
                         ids=["int8", "int4", "2:4+int4"])
def test_tile_exact_shapes_and_strided_x(fmt, params, variant):
    """N and K multiples of the tiles (no masked lanes) with a transposed, non-contiguous x."""
    w = _weight(fmt, params, 32, 128, seed=11)
    x, bias, out = _inputs(16, 128, 32, torch.bfloat16, seed=12, strided=True)
    assert not x.is_contiguous()
    _check(_run(w, x, bias, out, variant, _configs(w, variant)), out, x, w, bias, f"{fmt} {variant} tile-exact")


@needs_kernels
@pytest.mark.parametrize("fmt,variant", [("2:4", "gemv"), ("4:8", "dot"), ("csr", None)])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_float_values(fmt, variant, wdtype):
    """Float N:M and CSR values keep the weight's dtype; the kernels upcast them before math."""
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(N, 100, generator=g) * (torch.rand(N, 100, generator=g) > 0.5 if fmt == "csr" else 1)
    w = si.pack(dense.to(DEVICE, wdtype), fmt)
    x, bias, out = _inputs(3, 100, N, torch.float16, seed=4)
    cfg = dict(BLOCK_NZ=32) if fmt == "csr" else _configs(w, variant)
    _check(_run(w, x, bias, out, variant, cfg), out, x, w, bias, f"{fmt} {wdtype} values {variant}")


@needs_kernels
@pytest.mark.parametrize("fmt", ["csr", "csr+int8"])
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (3, torch.bfloat16), (17, torch.float16)], ids=str)
def test_csr_spmm_matches_reference(fmt, m, dtype):
    w = _weight(fmt, {}, 9, 100, seed=m)
    x, bias, out = _inputs(m, 100, 9, dtype, seed=m + 1, with_bias=m != 3)
    _check(_run(w, x, bias, out, config=dict(BLOCK_NZ=16)), out, x, w, bias, f"{fmt} spmm")


@needs_kernels
def test_csr_torch_sparse_path_and_method_choice(monkeypatch):
    w = _weight("csr+int8", {}, 9, 100, seed=3)
    plan = triton_backend._prepack(w)["plan"]
    x, bias, _ = _inputs(3, 100, 9, torch.float32, seed=4)
    ref = reference_linear(x, w, bias)
    assert torch.allclose(plan.run_torch(x, bias), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("SPARSEINFER_CSR_METHOD", "torch")
    assert plan.method(x, bias) == "torch"
    monkeypatch.delenv("SPARSEINFER_CSR_METHOD")
    if INTERPRETED:
        assert plan.method(x, bias) == "triton"  # nothing to measure under the interpreter


# -- through sparseinfer.linear: prepack, dispatch, default configs ----------------------------

@needs_kernels
@pytest.mark.parametrize("fmt,params", [("int8", {}), ("int4", {"group_size": 32, "symmetric": False}),
                                        ("2:4+int4", {"group_size": 16}), ("4:8", {}), ("csr", {})],
                         ids=["int8", "int4", "2:4+int4", "4:8", "csr"])
@pytest.mark.parametrize("lead", [(1,), (2, 9)], ids=["M1", "M18"])
def test_linear_backend_triton(fmt, params, lead):
    """Default (untuned first) configs, leading batch dims, the backend's own prepack."""
    w = _weight(fmt, params, 24, 72, seed=len(lead))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(*lead, 72, generator=g).to(DEVICE, torch.float16)
    bias = torch.randn(24, generator=g).to(DEVICE, torch.float16)
    y = si.linear(x, w, bias, backend="triton")
    ref = reference_linear(x.reshape(-1, 72), w, bias).reshape(*lead, 24)
    assert y.shape == (*lead, 24) and y.dtype == torch.float16
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < TOL[torch.float16]
    assert "triton" in w._prepacked  # built once, reused by later calls
    packed = w._prepacked["triton"]
    si.linear(x, w, bias, backend="triton")
    assert w._prepacked["triton"] is packed


@needs_kernels
@pytest.mark.parametrize("fmt,params", [("int8", {}), ("int4", {"group_size": 32, "symmetric": False}),
                                        ("2:4+int4", {"group_size": 16}), ("2:4", {}), ("csr", {})],
                         ids=["int8", "int4", "2:4+int4", "2:4", "csr"])
def test_prepack_follows_in_place_writes(fmt, params):
    """The prepacked layout (transposed scales, repacked metadata) is built again after the canonical
    tensors are written in place (load_state_dict does that), not served stale (issue 15)."""
    w = _weight(fmt, params, 24, 72, seed=4)
    x = torch.randn(3, 72, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.float16)
    si.linear(x, w, backend="triton")
    with torch.no_grad():
        for t in w.tensors().values():
            if t.is_floating_point():  # scales or float values: the product doubles
                t.mul_(2)
    y = si.linear(x, w, backend="triton")
    ref = reference_linear(x, w)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < TOL[torch.float16]


@needs_kernels
def test_autotuner_measures_with_cpu_do_bench(monkeypatch):
    """The tuner times each candidate (on the interpreter with a CPU timer), keeps the fastest per
    key and reuses it."""
    from sparseinfer.kernels import int8_linear as mod

    monkeypatch.setenv("SPARSEINFER_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(_common, "TUNER", _common.Tuner())
    monkeypatch.setattr(mod, "GEMV_CONFIGS", [dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=1),
                                              dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)])
    w = _weight("int8", {}, N, 100, seed=1)
    x, bias, out = _inputs(1, 100, N, torch.float32, seed=2)
    _check(_run(w, x, bias, out), out, x, w, bias, "int8 autotuned")
    (key, best), = _common.TUNER.best.items()
    assert best in mod.configs("gemv", 1, N, 100, 100) and key[:3] == ("int8_linear", "gemv", 1)


@needs_kernels
def test_auto_dispatch_and_kernel_names(monkeypatch):
    w = _weight("2:4+int4", {"group_size": 16}, 8, 64, seed=0)
    x = torch.randn(2, 64).to(DEVICE)
    # Automatic dispatch picks Triton for CUDA tensors only; the CPU interpreter runs when named.
    assert (resolve(w, x).name == "triton") == (x.device.type == "cuda")
    assert resolve(w, x, "triton").name == "triton"
    b = BACKENDS["triton"]
    assert b.kernel_name(w, 1) == "triton:nm_gemv(2:4+int4)" and b.kernel_name(w, 64) == "triton:nm_dot(2:4+int4)"
    assert b.kernel_name(_weight("int4", {"group_size": 32}, 8, 64, 0), 1) == "triton:int4_w4a16_gemv"
    if INTERPRETED:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert resolve(w, x).name != "triton"


def test_gemv_threshold_agrees_with_the_kernels():
    if not HAS_TRITON:
        pytest.skip("requires triton")
    from sparseinfer.kernels import int4_linear, int8_linear, nm_linear

    assert {int8_linear.GEMV_MAX_M, int4_linear.GEMV_MAX_M, nm_linear.GEMV_MAX_M} == {triton_backend.GEMV_MAX_M}
    assert nm_linear.MAX_M == triton_backend.MAX_NM_GROUP


@pytest.mark.skipif(not HAS_TRITON, reason="requires triton")
@pytest.mark.parametrize("fmt", ["2:4", "4:8", "1:4", "2:3", "3:16", "2:32"])
def test_meta_repack_keeps_indices(fmt):
    from sparseinfer.formats.nm import unpack_bits

    w = si.pack(torch.randn(5, 70), fmt)
    meta = repack_meta(w.meta, w.m, w.kc)
    assert torch.equal(unpack_bits(meta, meta_bits(w.m), w.kc), w.indices() % w.m)
    assert meta_bits(w.m) in (1, 2, 4, 8)
    if meta_bits(w.m) == (w.m - 1).bit_length():
        assert meta is w.meta  # 2:4, 1:4, 2:3 ...: the canonical layout is used as is


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = si.pack(torch.randn(8, 32), "int8")
    ok, detail = BACKENDS["triton"].availability()
    assert not ok and "TRITON_INTERPRET=1" in detail
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        si.linear(torch.randn(2, 32), w, backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="requires triton")
def test_launcher_refuses_cpu_tensors_when_compiling(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    w = si.pack(torch.randn(8, 32), "int8")
    with pytest.raises(RuntimeError, match=r"CPU tensor.*TRITON_INTERPRET=1"):
        int8_linear(torch.randn(2, 32), w.qweight, w.scale.T)


@pytest.mark.skipif(not IN_PROCESS, reason="needs the kernels usable in this process")
def test_bad_kernel_arguments():
    w8 = _weight("int8", {"group_size": 16}, 8, 32, 0)
    w4 = _weight("int4", {"group_size": 16}, 8, 32, 0)
    x = torch.randn(2, 32).to(DEVICE)
    s8, s4 = w8.scale.T, w4.scale.T
    cases = [
        (lambda: int8_linear(x.double(), w8.qweight, s8), ValueError, "float64"),
        (lambda: int8_linear(x[0], w8.qweight, s8), ValueError, r"2-D tensor \[M, K\]"),
        (lambda: int8_linear(x, w8.qweight.to(torch.uint8), s8), ValueError, "qweight must be torch.int8"),
        (lambda: int8_linear(x, w8.qweight, s8[:, :7]), ValueError, r"scale_t should have shape \(2, 8\)"),
        (lambda: int8_linear(x[:, :20], w8.qweight[:, :16], s8), ValueError, "whole groups"),
        (lambda: int8_linear(x, w8.qweight.to("meta"), s8), ValueError, "qweight is on meta but x is on"),
        (lambda: int8_linear(x, w8.qweight, s8, torch.randn(7).to(DEVICE)), ValueError, r"bias should have shape"),
        (lambda: int8_linear(x, w8.qweight, s8, out=torch.empty(2, 8, dtype=torch.float16, device=DEVICE)),
         ValueError, "out must be torch.float32"),
        (lambda: int8_linear(x, w8.qweight, s8, variant="gemm"), ValueError, "unknown variant 'gemm'"),
        (lambda: int4_linear(x, w4.qweight, s4, torch.zeros(1, 8, dtype=torch.uint8, device=DEVICE)), ValueError,
         r"zero_t should have shape \(2, 8\)"),
        (lambda: int4_linear(x.to(torch.int32), w4.qweight, s4), ValueError, "torch.int32 is not supported"),
        (lambda: nm_linear(x, torch.randn(8, 1, device=DEVICE), torch.zeros(8, 1, dtype=torch.uint8,
                                                                              device=DEVICE), 1, 64),
         ValueError, "unsupported sparsity 1:64"),
        (lambda: nm_linear(x, torch.randn(8, 10, device=DEVICE), torch.zeros(8, 5, dtype=torch.uint8,
                                                                               device=DEVICE), 2, 4),
         ValueError, "fewer than the Kc=16"),
        (lambda: nm_linear(x, torch.zeros(8, 16, dtype=torch.int8, device=DEVICE),
                           torch.zeros(8, 4, dtype=torch.uint8, device=DEVICE), 2, 4, value_format="int8"),
         ValueError, "need scale_t"),
        (lambda: csr_linear(x, torch.zeros(9, dtype=torch.int32, device=DEVICE),
                            torch.zeros(0, dtype=torch.int32, device=DEVICE), torch.zeros(0, device=DEVICE), 32),
         ValueError, "crow must be torch.int64"),
        (lambda: csr_linear(x, torch.zeros(9, dtype=torch.int64, device=DEVICE),
                            torch.zeros(0, dtype=torch.int32, device=DEVICE), torch.zeros(0, device=DEVICE), 31),
         ValueError, "does not match K=31"),
    ]
    for i, (call, err, match) in enumerate(cases):
        with pytest.raises(err, match=match):
            call()
            pytest.fail(f"case {i} ({match!r}) did not raise")


@pytest.mark.skipif(not IN_PROCESS, reason="needs the kernels usable in this process")
def test_backend_refuses_what_it_cannot_run():
    b = BACKENDS["triton"]
    w = _weight("int8", {}, 8, 32, 0)
    x = torch.randn(2, 32).to(DEVICE)
    assert not b.supports(w, x.double())
    assert not b.supports(si.pack(torch.randn(4, 128), "1:64"), torch.randn(1, 128).to(DEVICE))
    assert not b.supports(w, torch.randn(2, 32, device="meta"))
    with pytest.raises(ValueError, match="bias is on meta but x is on"):
        b.linear(x, w, torch.randn(8, device="meta"))
    with pytest.raises(RuntimeError, match=r"no kernel for format 'int8' with torch.float64"):
        b.linear(x.double(), w, None)


def test_import_without_triton():
    """``import sparseinfer`` never imports triton; without triton, ``sparseinfer.kernels``
    still imports, the backend says what is missing and the launchers raise ImportError."""
    code = (
        "import sys\n"
        "import sparseinfer as si\n"
        "si.backends()\n"
        "assert 'triton' not in sys.modules, 'importing sparseinfer imported triton'\n"
        "sys.modules['triton'] = None  # as if it were not installed\n"
        "from sparseinfer.backends import triton as tb\n"
        "tb._triton_version.cache_clear()\n"
        "import sparseinfer.kernels, sparseinfer.kernels.int4_linear as k\n"
        "print(si.backends()['triton'])\n"
        "try:\n"
        "    k.int4_linear(None, None, None)\n"
        "except ImportError as err:\n"
        "    print('ImportError:', err)\n"
    )
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "'available': False" in res.stdout and "Triton is not installed" in res.stdout
    assert "ImportError: int4_linear needs Triton" in res.stdout and "pip install" in res.stdout


@pytest.mark.skipif(not INTERPRETED, reason="the --interpret mode of the GPU script runs on the interpreter")
def test_gpu_bench_script_interpret_mode(capsys):
    spec = importlib.util.spec_from_file_location("gpu_triton", Path(__file__).parents[1] / "bench" / "gpu_triton.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--interpret", "--small", "--kernels", "int4-g128,2:4+int4,csr+int8-90%", "--shapes", "20x64",
                     "--batches", "1,9"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("ok  ") == 6 and "all kernels match the reference" in out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="requires triton with its NVIDIA backend")
def test_kernels_compile_for_h100():
    """The interpreter runs no GPU compiler: compile one specialisation of every kernel for
    sm_90 (no GPU needed) so that GPU-only errors (dot shapes, layouts) fail here too."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "bench" / "gpu_triton.py"
    res = subprocess.run([sys.executable, str(script), "--compile-only", "--quick", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "all kernels compiled for sm_90" in res.stdout


@pytest.mark.skipif(IN_PROCESS or not HAS_TRITON or torch.cuda.is_available(),
                    reason="only when triton was imported for the compiler on a machine without a GPU")
def test_kernels_in_interpreter_subprocess():
    """This file again, in a fresh process that imports triton for the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
