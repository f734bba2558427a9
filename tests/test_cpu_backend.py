"""The C++ CPU backend (sparseinfer._C, sparseinfer.backends.cpu): every format on every ISA this
machine runs, against the reference backend, plus bad input, dispatch and the ISA override.

Kernels are called through the binding with a preallocated output poisoned with NaN, so an
element a kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import BACKENDS, reference_linear
from sparseinfer.backends.cpu import CpuBackend, build_native_weight
from sparseinfer.formats import Int8Weight

C = _native._C
pytestmark = pytest.mark.skipif(
    C is None, reason=f"requires the C++ extension sparseinfer._C ({_native._C_ERROR}); {_native.BUILD_HINT}"
)
ISAS = C.available_isas() if C is not None else ["scalar"]

# -- tolerances on ||out - ref|| / ||ref|| (ref = reference_linear on the same inputs) -----------------
# fp32 activations: kernel and reference compute the same fp32 products and differ only in the order
# of the K-term sums; with random signs that error grows like sqrt(K) * 2^-24 * ||y|| (~4e-6 at
# K = 4095, measured ~1e-6), so 1e-5 holds with room and still catches any wrong element.
TOL_F32 = 1e-5
# bf16 / fp16 activations: both sides read the same rounded x, accumulate in fp32 (difference
# bounded by TOL_F32) and round the result once to the output type; two roundings of nearly equal
# values differ by at most one ulp, 2^-7 |y| for bf16 (8-bit significand) and 2^-10 |y| for fp16
# (11-bit), so the normwise error is bounded by one ulp plus the fp32 term.
TOL_BF16 = 2.0**-7 + TOL_F32  # ~7.8e-3
TOL_F16 = 2.0**-10 + TOL_F32  # ~9.9e-4
TOL = {torch.float32: TOL_F32, torch.bfloat16: TOL_BF16, torch.float16: TOL_F16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (format, pack parameters, dtype of the dense weight handed to pack) -- every canonical layout and
# every value type the kernels read: float N:M / CSR values keep the weight's dtype.
CASES = [
    ("int8", {"group_size": None}, torch.float32),
    ("int8", {"group_size": 16}, torch.float32),
    ("int4", {"group_size": 32}, torch.float32),
    ("int4", {"group_size": 16, "symmetric": False}, torch.float32),
    ("int4", {"group_size": None, "symmetric": False}, torch.float32),  # odd K: padded to a whole byte
    ("2:4", {}, torch.float32),
    ("2:4", {}, torch.bfloat16),
    ("1:4", {}, torch.float16),
    ("3:7", {}, torch.float32),  # 3-bit indices straddle bytes; K % 7 leaves padded kept values
    ("2:4+int8", {"group_size": 16}, torch.float32),
    ("2:4+int4", {"group_size": 16}, torch.float32),
    ("4:8+int4", {"group_size": None, "symmetric": False}, torch.float32),
    ("csr", {}, torch.float32),
    ("csr", {}, torch.float16),
    ("csr+int8", {}, torch.float32),
]
CASE_IDS = [f"{fmt}-{'-'.join(f'{k}{v}' for k, v in p.items())}-{str(d)[6:]}".replace("--", "-") for fmt, p, d in CASES]

# (K, N) pairs: K below, at and above every group / block size, primes, and one model-sized K.
SHAPES = [(1, 7), (3, 33), (17, 1), (100, 7), (129, 33), (4095, 7)]
BATCHES = [1, 2, 3, 17, 64]
BIG_K_BATCHES = [1, 17]  # fewer combinations where K is large


def kept_per_row(fmt: str, k: int) -> int:
    n, m = (int(v) for v in fmt.split("+")[0].split(":"))
    return -(-k // m) * n


def make_weight(fmt: str, params: dict, wdtype: torch.dtype, n: int, k: int, g: torch.Generator):
    """A packed random weight: groups larger than the row fall back to per-channel; CSR weights are
    ~70% zeros, with one empty row when there are several."""
    w = torch.randn(n, k, generator=g)
    if fmt.startswith("csr"):
        w = w * (torch.rand(n, k, generator=g) < 0.3)
        w[0, 0] = 1.5  # at least one non-zero
        if n > 2:
            w[1] = 0
    params = dict(params)
    limit = kept_per_row(fmt, k) if ":" in fmt and "+" in fmt else k
    if (params.get("group_size") or 0) > limit:
        params["group_size"] = None
    return si.pack(w.to(wdtype), fmt, **params)


def make_x(m: int, k: int, dtype: torch.dtype, strided: bool, g: torch.Generator) -> torch.Tensor:
    if strided:  # rows 3 elements apart from where a contiguous tensor would have them
        x = torch.randn(m, k + 3, generator=g)[:, 1 : k + 1]
        assert not x.is_contiguous() or m == 1
    else:
        x = torch.randn(m, k, generator=g)
    return x.to(dtype)


def run_native(x, w, bias, isa):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype)
    C.linear(x, build_native_weight(w), out, bias, num_threads=torch.get_num_threads(), isa=isa, act="fp32")
    return out


# -- correctness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}-N{n}" for k, n in SHAPES])
def test_matches_reference(isa, case, k, n, rng, rel_err):
    fmt, params, wdtype = case
    w = make_weight(fmt, params, wdtype, n, k, rng)
    handle = build_native_weight(w)
    for i, m in enumerate(BIG_K_BATCHES if k > 1000 else BATCHES):
        for j, dtype in enumerate(DTYPES):
            strided = (i + j) % 2 == 1
            bias = torch.randn(n, generator=rng) if (i + j) % 3 != 2 else None
            x = make_x(m, k, dtype, strided, rng)
            out = torch.full((m, n), float("nan"), dtype=dtype)
            C.linear(x, handle, out, bias, num_threads=torch.get_num_threads(), isa=isa, act="fp32")
            ref = reference_linear(x, w, bias)
            where = (f"{fmt} {params} w:{wdtype} isa={isa} M={m} N={n} K={k} x:{dtype} "
                     f"strided={strided} bias={bias is not None}")
            unwritten = (~torch.isfinite(out)).nonzero()[:5].tolist()
            assert not unwritten, f"{where}: unwritten (NaN) outputs at {unwritten}"
            err = rel_err(out, ref)
            assert err <= TOL[dtype], (f"{where}: rel err {err:.2e} > {TOL[dtype]:.1e}; "
                                       f"out {out.flatten()[:4].tolist()} ref {ref.flatten()[:4].tolist()}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_is_bit_exact(isa, dtype, rng):
    """A weight that picks one column with value 1.0: y = x[:, c] + bias is one fp32 addition, then
    one rounding to x's dtype -- bit for bit what PyTorch computes, including overflow to inf,
    fp16 subnormals, ties to even and NaN, for bias in all three float dtypes."""
    n, k, m = 64, 5, 3
    dense = torch.zeros(n, k)
    dense[torch.arange(n), torch.arange(n) % k] = 1.0
    w = si.pack(dense, "csr")
    x = (torch.randn(m, k, generator=rng) * 2.0 ** torch.randint(-20, 20, (m, k), generator=rng)).to(dtype)
    bias = torch.randn(n, generator=rng) * 2.0 ** torch.randint(-30, 20, (n,), generator=rng).float()
    bias[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 65520.0, 2.0**-25, 1.0 + 2.0**-8])
    for bias_dtype in DTYPES:
        b = bias.to(bias_dtype)
        out = run_native(x, w, b, isa)
        expected = (x.float()[:, torch.arange(n) % k] + b.float()).to(dtype)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("isa", ISAS)
def test_broadcast_rows_and_empty_batch(isa, rng, rel_err):
    """x rows may alias (row stride 0, e.g. expand()); M = 0 is a no-op."""
    w = make_weight("int4", {"group_size": 32}, torch.float32, 9, 70, rng)
    x = torch.randn(1, 70, generator=rng).expand(5, 70)
    assert x.stride(0) == 0
    out = run_native(x, w, None, isa)
    assert rel_err(out, reference_linear(x.contiguous(), w)) <= TOL_F32
    empty = torch.empty(0, 9)
    C.linear(torch.empty(0, 70), build_native_weight(w), empty, isa=isa)
    for shape in [(2, 0, 70), (3, 0, 2, 70), (0, 3, 70)]:  # no rows, whatever the strides of the empty dims
        y = si.linear(torch.ones(shape), w, backend="cpu")
        assert y.shape == shape[:-1] + (9,) and torch.equal(y, reference_linear(torch.ones(shape), w))


def test_threads_split_columns(rel_err, rng):
    """Large N over several threads: every column range is computed once and only once."""
    w = make_weight("int8", {"group_size": 64}, torch.float32, 1000, 256, rng)
    handle = build_native_weight(w)
    x = torch.randn(4, 256, generator=rng)
    ref = reference_linear(x, w)
    for threads in (1, 2, 3, 7):
        out = torch.full((4, 1000), float("nan"))
        C.linear(x, handle, out, None, num_threads=threads, act="fp32")
        assert rel_err(out, ref) <= TOL_F32, f"num_threads={threads}"


THREADING_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import sparseinfer as si
    from sparseinfer import _native
    C = _native._C
    torch.manual_seed(0)
    w = si.pack(torch.randn(1000, 512), "int4", group_size=64)
    x = torch.randn(5, 512)
    torch.nn.functional.linear(x, torch.randn(64, 512))  # torch's OpenMP team is up and spinning
    a = si.linear(x, w)
    pid = os.fork()
    if pid == 0:  # the child: no OpenMP team survives fork(); the call must neither hang nor differ
        os._exit(0 if torch.equal(si.linear(x, w), a) and C.threading() == "sparseinfer's thread pool" else 3)
    _, status = os.waitpid(pid, 0)
    print(C.threading(), "|", os.waitstatus_to_exitcode(status), "|", a.double().sum().item())
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_threading_host_openmp_own_pool_and_fork():
    """With torch loaded, calls run on its OpenMP team (no second pool fighting it for cores);
    SPARSEINFER_OPENMP=0 uses sparseinfer's pool; both give the same bits, and after fork() the
    child falls back to the pool instead of a team that did not survive."""
    outs = {}
    for flag in ("1", "0"):
        env = {**os.environ, "SPARSEINFER_OPENMP": flag, "OMP_NUM_THREADS": "2"}
        proc = subprocess.run([sys.executable, "-c", THREADING_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[flag] = [part.strip() for part in proc.stdout.strip().split("|")]
        assert outs[flag][1] == "0", f"forked child failed (SPARSEINFER_OPENMP={flag}): {outs[flag]}"
    assert outs["0"][0] == "sparseinfer's thread pool"
    if sys.platform.startswith("linux"):
        assert outs["1"][0].startswith("the host's OpenMP team")
    assert outs["0"][2] == outs["1"][2]  # the split never changes a bit


def test_concurrent_callers(rel_err, rng):
    """Python threads calling at once (the GIL is released in the kernel): the pool serves one call
    at a time and the others run on their own thread; every result is right."""
    from concurrent.futures import ThreadPoolExecutor

    w = make_weight("int4", {"group_size": 32}, torch.float32, 300, 256, rng)
    handle = build_native_weight(w)
    xs = [torch.randn(3, 256, generator=rng) for _ in range(8)]

    def call(x):
        out = torch.full((3, 300), float("nan"))
        for _ in range(5):
            C.linear(x, handle, out, None, num_threads=2, act="fp32")
        return out

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(call, xs))
    for x, out in zip(xs, outs):
        assert rel_err(out, reference_linear(x, w)) <= TOL_F32


# -- the Python backend -----------------------------------------------------------------------------

def test_backend_available_and_default():
    report = si.backends()["cpu"]
    assert report["available"], report["detail"]
    assert C.active_isa() in report["detail"]
    w = si.pack(torch.randn(8, 40), "2:4")
    x = torch.randn(3, 40)
    from sparseinfer.backends import resolve

    assert resolve(w, x).name == "cpu"
    assert BACKENDS["cpu"].kernel_name(w, 3).startswith("cpu:nm_")


@pytest.mark.parametrize("fmt", ["int8", "int4", "2:4+int8", "csr+int8"])
def test_linear_through_public_api(fmt, rng, rel_err):
    """si.linear(backend="cpu"): leading dims, non-contiguous x (transposed: unit stride is not
    along K), bias in another dtype, and the prepacked view built once and reused."""
    params = {"group_size": 32} if "int4" in fmt else {}
    w = make_weight(fmt, params, torch.float32, 12, 64, rng)
    x = torch.randn(2, 64, 5, generator=rng).transpose(1, 2)  # [2, 5, 64], stride 1 along dim 1
    bias = torch.randn(12, generator=rng).double()
    y = si.linear(x, w, bias, backend="cpu", act="fp32")
    assert y.shape == (2, 5, 12) and y.dtype == torch.float32
    assert rel_err(y, reference_linear(x.reshape(-1, 64), w, bias).reshape(2, 5, 12)) <= TOL_F32
    handle = BACKENDS["cpu"].prepack(w)
    si.linear(x, w, backend="cpu")
    assert BACKENDS["cpu"].prepack(w) is handle


def test_non_contiguous_tensors_are_stored_contiguous(rng, rel_err):
    """A format keeps its tensors contiguous, so the kernels view the weight's own tensors (and follow
    them when they are written in place) rather than a copy."""
    w = make_weight("int8", {"group_size": 16}, torch.float32, 6, 32, rng)
    qweight = w.qweight.T.contiguous().T  # same values, column-major
    odd = Int8Weight(qweight, w.scale, 32, 16)
    assert odd.qweight.is_contiguous() and torch.equal(odd.qweight, qweight)
    x = torch.randn(3, 32, generator=rng)
    assert rel_err(si.linear(x, odd, backend="cpu", act="fp32"), reference_linear(x, w)) <= TOL_F32


def test_autograd_is_left_to_the_reference():
    w = si.pack(torch.randn(4, 16), "int8")
    x = torch.randn(2, 16, requires_grad=True)
    assert not BACKENDS["cpu"].supports(w, x)
    si.linear(x, w).sum().backward()  # AUTO falls back to the differentiable reference
    assert x.grad is not None
    with torch.no_grad():
        assert BACKENDS["cpu"].supports(w, x)
    bias = torch.randn(4, requires_grad=True)
    si.linear(x.detach(), w, bias, backend="cpu").sum().backward()
    assert torch.equal(bias.grad, torch.full((4,), 2.0))


def test_supports_rejects_sizes_beyond_int32():
    w = si.pack(torch.randn(4, 2), "int8")
    huge = torch.zeros(1, 2).expand(2**31, 2)  # metadata only, nothing allocated
    assert not CpuBackend().supports(w, huge)
    assert CpuBackend().supports(w, torch.zeros(3, 2))


# -- bad input ----------------------------------------------------------------------------------------

@pytest.fixture
def int8_handle():
    return build_native_weight(si.pack(torch.randn(8, 64), "int8", group_size=32))


def test_linear_takes_leading_dims(rng, rel_err):
    """x [..., K] whose leading dims collapse into rows (as a view would) runs without a reshape."""
    w = si.pack(torch.randn(8, 64, generator=rng), "int8", group_size=32)
    h = build_native_weight(w)
    base = torch.randn(4, 2, 5, 64, generator=rng)
    for x in (base, base[1:3], base[:, :, 1], base[..., 0:1, :], torch.randn(64, generator=rng)):
        out = torch.full((*x.shape[:-1], 8), float("nan"))
        C.linear(x, h, out, None, num_threads=2, act="fp32")
        ref = reference_linear(x.reshape(-1, 64), w).reshape(out.shape)
        assert rel_err(out, ref) < TOL_F32, tuple(x.shape)


@pytest.mark.parametrize(
    "x,out,bias,kwargs,exc,match",
    [
        (torch.randn(3, 64).double(), None, None, {}, ValueError,
         r"x must have dtype float32, bfloat16, float16, got float64"),
        (torch.randint(0, 3, (3, 64)), None, None, {}, ValueError, r"got int64 \(shape \(3, 64\)\)"),
        (torch.randn(3, 63), None, None, {}, ValueError,
         r"x of shape \(3, 63\) does not match weight int8 of shape \(8, 64\)"),
        (torch.tensor(1.0), None, None, {}, ValueError, r"x of shape \(\) does not match.*expected \(\.\.\., 64\)"),
        (torch.randn(2, 3, 64), None, None, {}, ValueError, r"out must have shape \(2, 3, 8\).*got \(3, 8\)"),
        (torch.randn(4, 3, 64).transpose(0, 1), torch.empty(3, 4, 8), None, {}, ValueError,
         r"rows that form one matrix.*strides \(64, 192, 1\)"),
        (torch.randn(64, 3).T, None, None, {}, ValueError, r"unit stride along K.*strides \(1, 3\)"),
        ([[1.0] * 64], None, None, {}, TypeError, r"x must be a torch.Tensor, got list"),
        (torch.randn(3, 64), torch.empty(3, 8, dtype=torch.float16), None, {}, ValueError,
         r"out must have the dtype of x \(float32\), got float16"),
        (torch.randn(3, 64), torch.empty(3, 9), None, {}, ValueError, r"out must have shape \(3, 8\).*got \(3, 9\)"),
        (torch.randn(3, 64), torch.empty(1, 8).expand(3, 8), None, {}, ValueError,
         r"non-overlapping rows.*strides \(0, 1\)"),
        (torch.randn(3, 64), torch.empty(8, 3).T, None, {}, ValueError, r"unit stride along N"),
        (torch.randn(3, 64), None, torch.randn(7), {}, ValueError, r"bias must have shape \(8,\).*got \(7,\)"),
        (torch.randn(3, 64), None, torch.randn(8).double(), {}, ValueError, r"bias must have dtype"),
        (torch.randn(3, 64), None, torch.randn(16)[::2], {}, ValueError, r"bias must be contiguous"),
        (torch.randn(3, 64), None, None, {"num_threads": 0}, ValueError, r"num_threads must be >= 1"),
        (torch.randn(3, 64), None, None, {"isa": "sse9"}, ValueError, r"unknown isa 'sse9'.*available here: scalar"),
        (torch.randn(3, 64), None, None, {"isa": 3}, TypeError, r"isa must be a string"),
        (torch.zeros(1, 64).expand(2**31, 64), None, None, {},
         ValueError, r"M \(rows of x\) = 2147483648 is larger than INT32_MAX"),
    ],
)
def test_linear_rejects_bad_arguments(int8_handle, x, out, bias, kwargs, exc, match):
    if out is None and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] < 2**31:
        out = torch.empty(x.shape[0], 8, dtype=x.dtype)
    elif out is None:
        out = torch.empty(3, 8)
    with pytest.raises(exc, match=match):
        C.linear(x, int8_handle, out, bias, **kwargs)


def test_linear_rejects_unavailable_isa_and_wrong_weight(int8_handle):
    missing = [isa for isa in ("avx2", "avx512", "neon") if isa not in ISAS]
    x, out = torch.randn(1, 64), torch.empty(1, 8)
    for isa in missing:
        with pytest.raises(ValueError, match=f"isa '{isa}' is not available.*available: scalar"):
            C.linear(x, int8_handle, out, isa=isa)
    with pytest.raises(TypeError):
        C.linear(x, torch.randn(8, 64), out)
    with pytest.raises(ValueError, match="out must not overlap x"):
        buf = torch.randn(1, 64)
        C.linear(buf, int8_handle, buf[:, :8])


def test_device_and_layout_are_checked(int8_handle):
    with pytest.raises(ValueError, match="x must be on the CPU, got device 'meta'"):
        C.linear(torch.empty(1, 64, device="meta"), int8_handle, torch.empty(1, 8))
    with pytest.raises(ValueError, match="x must be a dense"):
        C.linear(torch.randn(1, 64).to_sparse(), int8_handle, torch.empty(1, 8))


def _i8(*shape):
    return torch.zeros(*shape, dtype=torch.int8)


def _u8(*shape):
    return torch.zeros(*shape, dtype=torch.uint8)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: C.pack_int8(_i8(4, 32).T.contiguous().T, torch.ones(4, 1), 32),
         r"qweight must be contiguous.*strides \(1, 4\)"),
        (lambda: C.pack_int8(_i8(4, 32), torch.ones(4, 3), 32), r"scale of shape \(4, 3\) does not fit qweight"),
        (lambda: C.pack_int8(_i8(4, 32), torch.ones(4, 2).double(), 32), r"scale must have dtype float32, got float64"),
        (lambda: C.pack_int8(_u8(4, 32), torch.ones(4, 1), 32), r"qweight must have dtype int8, got uint8"),
        (lambda: C.pack_int8(_i8(4, 32), torch.ones(4, 1), 33), r"K = 33 must be in 1..32"),
        (lambda: C.pack_int8(_i8(4, 32), torch.ones(8)[::2].reshape(4, 1).expand(4, 2), 32),
         r"scale must be contiguous"),
        (lambda: C.pack_int4(_u8(4, 16), torch.ones(4, 2), _i8(4, 2), 32), r"zero must have dtype uint8, got int8"),
        (lambda: C.pack_int4(_u8(4, 16), torch.ones(4, 2), _u8(4, 1), 32), r"zero must have shape \(4, 2\)"),
        (lambda: C.pack_int4(_i8(4, 16), torch.ones(4, 2), None, 32), r"qweight must have dtype uint8, got int8"),
        (lambda: C.pack_nm(_u8(4, 3), 2, 4, 16, torch.randn(4, 8)),
         r"meta must have shape \(4, 2\) \(8 kept values per row, 2 index bits each\), got \(4, 3\)"),
        (lambda: C.pack_nm(_u8(4, 2), 4, 4, 16, torch.randn(4, 8)), r"1 <= n < m, got n=4, m=4"),
        (lambda: C.pack_nm(_u8(4, 2), 2, 4, 16, torch.randn(4, 7)), r"values must have shape \(4, 8\)"),
        (lambda: C.pack_nm(_u8(4, 2), 2, 4, 16, torch.randn(4, 8).double()), r"values must have dtype"),
        (lambda: C.pack_nm(_u8(4, 2), 2, 4, 16, C.pack_int8(_i8(4, 16), torch.ones(4, 1), 16)),
         r"int8 or int4 weight of shape \(4, 8\), got weight int8 of shape \(4, 16\)"),
        (lambda: C.pack_csr(torch.tensor([0, 1, 3]), torch.tensor([0, 5, 1], dtype=torch.int32), torch.randn(3),
                            None, 4),
         r"column index 5 at entry 1 is outside 0..3"),
        (lambda: C.pack_csr(torch.tensor([0, 1, 3]), torch.tensor([0, 2, 2], dtype=torch.int32), torch.randn(3),
                            None, 4),
         r"column indices of row 1 must be strictly increasing, got 2 then 2 at entries 1, 2"),
        (lambda: C.pack_csr(torch.tensor([0, 3, 3]), torch.tensor([1, 3, 0], dtype=torch.int32), torch.randn(3),
                            None, 4),
         r"row 0 must be strictly increasing, got 3 then 0"),
        (lambda: C.pack_csr(torch.tensor([0, 2, 1]), torch.tensor([0, 1], dtype=torch.int32), torch.randn(2), None, 4),
         r"crow must start at 0 and end at nnz = 2, got 0 .. 1"),
        (lambda: C.pack_csr(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1], dtype=torch.int32), torch.randn(2),
                            None, 4),
         r"crow decreases at row 1 \(2 -> 1\)"),
        (lambda: C.pack_csr(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.randn(2), None, 4),
         r"col must have dtype int32"),
        (lambda: C.pack_csr(torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32), _i8(2), None, 4),
         r"int8 values need a per-row scale of shape \(2,\)"),
        (lambda: C.pack_csr(torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32), torch.randn(2),
                            torch.ones(2), 4),
         r"float values take no scale"),
        # sizes beyond int32, mocked with expand(): metadata only, nothing allocated
        (lambda: C.pack_int8(_i8(1, 2).expand(2**31, 2), torch.ones(1, 1).expand(2**31, 1), 2),
         r"N = 2147483648 is larger than INT32_MAX"),
        (lambda: C.pack_int8(_i8(1, 1).expand(1, 2**31), torch.ones(1, 1), 2**31),
         r"padded K = 2147483648 is larger than INT32_MAX"),
        (lambda: C.pack_int4(_u8(1, 1).expand(1, 2**30), torch.ones(1, 1), None, 2**31), r"padded K = 2147483648"),
        (lambda: C.pack_csr(torch.zeros(1, dtype=torch.int64).expand(2**31 + 1), torch.zeros(0, dtype=torch.int32),
                            torch.zeros(0), None, 4), r"N = 2147483648 is larger than INT32_MAX"),
        (lambda: C.pack_nm(_u8(1, 1).expand(4, 2**31), 1, 2, 2**32, torch.zeros(1, 1).expand(4, 2**31)),
         r"K = 4294967296"),
        (lambda: C.pack_int8([1, 2], torch.ones(1, 1), 2), r"qweight must be a torch.Tensor, got list"),
    ],
)
def test_prepack_rejects_bad_tensors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_introspection():
    assert ISAS[0] == "scalar" and C.active_isa() in ISAS
    assert set(ISAS) <= set(C.compiled_isas())
    features = C.cpu_features()
    assert features["arch"] in ("x86_64", "aarch64", "other")
    if features["arch"] == "x86_64" and "avx2" in C.compiled_isas():
        assert ("avx2" in ISAS) == features["avx2"]
    w = build_native_weight(si.pack(torch.randn(4, 30), "2:4+int4", group_size=None))
    assert w.fmt == "2:4+int4" and w.shape == (4, 30) and "2:4+int4" in repr(w)
    for isa in ISAS:
        assert C.kernel_name(w, 1, isa=isa, act="fp32").startswith("nm_int4_")
    # Dispatch by ISA and batch: a level without a kernel for a format or batch falls back below it.
    w8 = build_native_weight(si.pack(torch.randn(4, 32), "int8"))
    assert C.kernel_name(w8, 17, isa="scalar", act="fp32") == "int8_gemm_scalar"
    if "avx2" in ISAS:
        assert C.kernel_name(w8, 1, isa="avx2", act="fp32") == "int8_gemv_avx2"
        assert C.kernel_name(w8, 17, isa="avx2", act="fp32") == "int8_panel_gemm_avx2"


# -- SPARSEINFER_ISA ----------------------------------------------------------------------------------

def _run_with_isa(value: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSEINFER_ISA": value}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


# Loads only the extension module (no torch import: active_isa() needs none), so it starts fast.
_ACTIVE_ISA_ONLY = f"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sparseinfer._C", {C.__file__ if C is not None else ""!r})
    _C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_C)
    try:
        print("ACTIVE", _C.active_isa())
    except ValueError as err:
        print("ERROR", err)
"""


def test_isa_override_from_environment():
    """One process per value (the variable is read once): a supported ISA is honoured, an unknown or
    unsupported one raises with a message that lists what is available."""
    for isa in ISAS:
        result = _run_with_isa(isa, _ACTIVE_ISA_ONLY)
        assert result.returncode == 0 and f"ACTIVE {isa}" in result.stdout, result.stdout + result.stderr
    unsupported = next((isa for isa in ("neon", "avx512", "avx2") if isa not in ISAS), None)
    if unsupported is not None:
        result = _run_with_isa(unsupported, _ACTIVE_ISA_ONLY)
        expected = f"ERROR SPARSEINFER_ISA='{unsupported}' is not available here"
        assert expected in result.stdout, result.stdout + result.stderr
        assert f"(available: {', '.join(ISAS)})" in result.stdout


def test_bad_isa_override_makes_backend_unavailable():
    """An unknown SPARSEINFER_ISA: the cpu backend says why it is unavailable, and si.linear keeps
    working through the reference backend."""
    result = _run_with_isa("sse9", """
        import torch, sparseinfer as si
        report = si.backends()["cpu"]
        print("DETAIL", report["available"], report["detail"])
        print("LINEAR", tuple(si.linear(torch.randn(2, 8), si.pack(torch.randn(3, 8), "int8")).shape))
    """)
    assert result.returncode == 0, result.stderr
    assert ("DETAIL False SPARSEINFER_ISA='sse9' is not a known ISA; use one of scalar, avx2, avx512, neon or auto"
            in result.stdout), result.stdout
    assert "LINEAR (2, 3)" in result.stdout


def test_missing_extension_degrades_at_use(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_C_ERROR", "No module named 'sparseinfer._C'")
    backend = CpuBackend()
    ok, detail = backend.availability()
    assert not ok and "sparseinfer._C is not built" in detail and "pip install -e ." in detail
    with pytest.raises(ImportError, match="sparseinfer._C is not available.*SPARSEINFER_BUILD_EXT=0"):
        _native.require_native()
    assert math.isfinite(si.linear(torch.randn(1, 8), si.pack(torch.randn(2, 8), "int8"),
                                   backend="reference").sum().item())
