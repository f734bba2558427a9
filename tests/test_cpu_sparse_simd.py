"""The SIMD N:M and CSR kernels of the C++ CPU backend (csrc/x86/avx2/nm_*, csr_*; docs/sparse_cpu.md)
against the reference backend, on every ISA this machine runs.

Every call goes through ``_C.linear`` with a fresh seeded random x (never zeros) and an output
poisoned with NaN, so an element a kernel forgets shows up. Batches are chosen so that each kernel
of the dispatch table runs -- gemv (few rows, register gathers / scalar gathers) and gemm (x
transposed, several vector widths, more than one 64-row block) -- and the test checks by name which
one did. Tolerances (normwise, ||out - ref|| / ||ref||, unless stated):

* fp32 activations (exact mode): kernel and reference multiply the same fp32 values and differ in
  the order of the sums only: ~sqrt(K) 2^-24 on random signs, bounded by TOL_F32 = 1e-5 (the
  contract of tests/test_cpu_backend.py);
* bf16 / fp16 activations: the same, then one rounding of nearly equal values to the output
  dtype: one ulp (2^-7 / 2^-10 relative) plus TOL_F32;
* int8 activations (N:M+int8 / N:M+int4, act="int8"): an elementwise bound, derived in
  ``int8_act_bound`` below (the activation rounding, everything after it exact).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import reference_linear
from sparseinfer.backends.cpu import build_native_weight
from sparseinfer.formats import CSRWeight

C = _native._C
pytestmark = pytest.mark.skipif(
    C is None, reason=f"requires the C++ extension sparseinfer._C ({_native._C_ERROR}); {_native.BUILD_HINT}"
)
ISAS = C.available_isas() if C is not None else ["scalar"]
SIMD = [isa for isa in ISAS if isa != "scalar"]
needs_simd = pytest.mark.skipif(not SIMD, reason="no SIMD ISA (avx2 / avx512 / neon) available on this CPU / build")

TOL_F32 = 1e-5
TOL = {torch.float32: TOL_F32, torch.bfloat16: 2.0**-7 + TOL_F32, torch.float16: 2.0**-10 + TOL_F32}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# gemv tiles of 1-4 rows (and the remainders), gemm with 1, 2, 3 and 8 vectors of batch rows and
# a second 64-row block; K large: fewer batches.
BATCHES = [1, 2, 3, 5, 7, 8, 12, 17, 64, 70]
BIG_K_BATCHES = [1, 3, 17]
SHAPES = [(1, 7), (3, 33), (17, 1), (100, 7), (129, 33), (4095, 7)]


def make_x(m, k, dtype, strided, g):
    if strided:  # rows 3 elements apart from where a contiguous tensor would put them
        x = torch.randn(m, k + 3, generator=g)[:, 1 : k + 1]
        assert not x.is_contiguous() or m == 1
        return x.to(dtype)
    return torch.randn(m, k, generator=g).to(dtype)


def run(x, handle, n, bias=None, isa=None, act="fp32", threads=2):
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)
    C.linear(x, handle, out, bias, num_threads=threads, isa=isa, act=act)
    return out


def check(out, ref, dtype, where, rel_err):
    unwritten = (~torch.isfinite(out)).nonzero()[:5].tolist()
    assert not unwritten, f"{where}: unwritten (NaN) outputs at {unwritten}"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{where}: rel err {err:.2e} > {TOL[dtype]:.1e}"


def sweep(w, rng, rel_err, what, isas=None, batches=None, act="fp32", expect=None):
    """Every (K-dependent) batch, dtype, stride and bias combination on every ISA; ``expect(m, isa)``
    (optional) is a prefix the kernel name must have on the SIMD ISAs."""
    n, k = w.shape
    handle = build_native_weight(w)
    batches = batches or (BIG_K_BATCHES if k > 1000 else BATCHES)
    for i, m in enumerate(batches):
        dtype = DTYPES[(i + k) % 3]
        strided = (i + n) % 2 == 1
        bias = torch.randn(n, generator=rng) if (i + k) % 3 != 1 else None
        x = make_x(m, k, dtype, strided, rng)
        ref = reference_linear(x, w, bias)
        for isa in isas or ISAS:
            kernel = C.kernel_name(handle, m, isa=isa, act=act)
            where = f"{what} isa={isa} kernel={kernel} M={m} N={n} K={k} x:{dtype} strided={strided} bias={bias is not None}"
            if expect and isa != "scalar":
                assert kernel.startswith(expect(m, isa)), f"{where}: expected a {expect(m, isa)}* kernel"
            check(run(x, handle, n, bias, isa=isa, act=act), ref, dtype, where, rel_err)


def gemv_or_gemm(handle, prefix, act="fp32"):
    """Kernel-name prefixes for m rows on an ISA: the gemv up to that ISA's table limit (the largest
    batch it sends to a gemv kernel), else a gemm (on AVX-512, float N:M and CSR run the xT GEMM
    nm_gemm_avx512 / csr_gemm_avx512 there)."""
    limits = {isa: max((m for m in range(1, 65) if "gemv" in C.kernel_name(handle, m, isa=isa, act=act)), default=0)
              for isa in SIMD}
    return lambda m, isa: (f"{prefix}_gemv",) if m <= limits[isa] else (f"{prefix}_gemm", f"{prefix}_panel_gemm")


# -- N:M -------------------------------------------------------------------------------------------

# (format, pack parameters, weight dtype): 2:4 has the register-gather gemv; 1:4, 4:8 and 2:3 go
# through the generic decoder (the fallback); every value kind.
NM_CASES = [
    ("2:4", {}, torch.float32),
    ("2:4", {}, torch.bfloat16),
    ("2:4", {}, torch.float16),
    ("1:4", {}, torch.float32),
    ("4:8", {}, torch.bfloat16),
    ("2:3", {}, torch.float16),
    ("2:4+int8", {"group_size": None}, torch.float32),
    ("2:4+int8", {"group_size": 16}, torch.float32),
    ("2:4+int4", {"group_size": 32}, torch.float32),
    ("2:4+int4", {"group_size": 64, "symmetric": False}, torch.float32),
    ("1:4+int8", {"group_size": 32}, torch.float32),
    ("4:8+int4", {"group_size": None, "symmetric": False}, torch.float32),
    ("2:3+int4", {"group_size": 16}, torch.float32),
]
NM_IDS = [f"{f}-{'-'.join(f'{k}{v}' for k, v in p.items())}-{str(d)[6:]}".replace("--", "-") for f, p, d in NM_CASES]


def pack_nm(fmt, params, wdtype, n, k, g):
    params = dict(params)
    nn, mm = (int(v) for v in fmt.split("+")[0].split(":"))
    kept = -(-k // mm) * nn
    if (params.get("group_size") or 0) > kept:
        params["group_size"] = None
    return si.pack(torch.randn(n, k, generator=g).to(wdtype), fmt, **params)


@needs_simd
@pytest.mark.parametrize("case", NM_CASES, ids=NM_IDS)
def test_nm_matches_reference(case, rng, rel_err):
    fmt, params, wdtype = case
    for k, n in SHAPES:
        w = pack_nm(fmt, params, wdtype, n, k, rng)
        family = "nm" if "+" not in fmt else f"nm_{fmt.split('+')[1]}"
        expect = gemv_or_gemm(build_native_weight(w), family)
        sweep(w, rng, rel_err, f"{fmt} {params} w:{wdtype}", isas=SIMD, expect=expect)


@needs_simd
def test_nm_ignores_kept_values_past_k(rng, rel_err):
    """Kept values in the zero padding of the last group (columns >= K) are not trusted: NaN there
    must not reach the output, in the gemv (register and generic gathers) and the gemm kernels."""
    for fmt, k in [("2:4", 17), ("2:4", 4093), ("2:3", 100), ("4:8", 129)]:
        w = si.pack(torch.randn(9, k, generator=rng), fmt)
        cols = w.indices()
        assert (cols >= k).any()
        w.values[cols >= k] = float("nan")
        sweep(w, rng, rel_err, f"{fmt} NaN padding", isas=SIMD, batches=[1, 3, 5, 17, 64])


# -- N:M, int8 activations -----------------------------------------------------------------------------

def int8_act_bound(x, w, out_dtype, exact):
    """Elementwise bound on |y_int8 - y|, y = exact = x @ W_q.T + bias in float64 (W_q = to_dense()).

    Each segment s of a row of x (<= 256 columns, never straddling a weight scale group) is
    quantized as q = rne(x / d_s), d_s = max|x_s| / 127 (quantize_act_avx2), so |x_k - q_k d_s| <=
    d_s / 2 <= max_k |x_k| / 254 =: e, and |sum_k W_nk (x_k - xhat_k)| <= e sum_k |W_nk|. The integer
    dot products are exact; the fp32 epilogue (one product and one FMA per segment), the exact tail
    (columns past the last whole 64-column block) and the reference's own fp32 sums add at most
    (K + 4) 2^-23 sum_k |x_k W_nk|; x_k d_s in fp32 another 2^-20 of the first term. bf16 / fp16
    outputs: one more rounding, taken twice for room (and fp16's subnormal step)."""
    xf, wd = x.double(), w.to_dense().double()
    e = xf.abs().amax(dim=1, keepdim=True) / 254.0
    bound = e * wd.abs().sum(dim=1)[None, :] * (1 + 2.0**-20) + (w.shape[1] + 4) * 2.0**-23 * (xf.abs() @ wd.abs().T)
    if out_dtype == torch.bfloat16:
        bound = bound + 2 * 2.0**-8 * (exact.abs() + bound)
    elif out_dtype == torch.float16:
        bound = bound + 2 * 2.0**-11 * (exact.abs() + bound) + 2.0**-24
    return bound


# K: < 64 (no whole 64-column block: all exact tail), 1 block + tail, odd, 4095; batches on both sides
# of the gemv / gemm limit (gemv tiles 4 x 1 and 2 x 2, gemm tiles of 4 batch rows and the 1-3 left over).
Q8_SHAPES = SHAPES + [(4, 33), (100, 1), (300, 40), (640, 33), (2048, 9)]
Q8_BATCHES = [1, 2, 3, 5, 17, 64]

Q8_CASES = [
    ("2:4+int8", {"group_size": None}),
    ("2:4+int8", {"group_size": 32}),
    ("2:4+int8", {"group_size": 128}),
    ("2:4+int4", {"group_size": 32}),
    ("2:4+int4", {"group_size": 64, "symmetric": False}),
    ("2:4+int4", {"group_size": 256}),
    ("2:4+int4", {"group_size": None, "symmetric": False}),
]
Q8_IDS = [f"{f}-g{p['group_size']}{'-asym' if p.get('symmetric') is False else ''}" for f, p in Q8_CASES]


@needs_simd
@pytest.mark.parametrize("case", Q8_CASES, ids=Q8_IDS)
def test_nm_int8_activations_within_bound(case, rng):
    fmt, params = case
    for k, n in Q8_SHAPES:
        w = pack_nm(fmt, params, torch.float32, n, k, rng)
        handle = build_native_weight(w)
        for i, m in enumerate(Q8_BATCHES if k < 1000 else [1, 4, 64]):
            dtype = DTYPES[(i + k) % 3]
            strided = (i + n) % 2 == 1
            bias = torch.randn(n, generator=rng) if i % 2 == 0 else None
            x = make_x(m, k, dtype, strided, rng)
            exact = reference_linear(x.float(), w, bias).double()
            bound = int8_act_bound(x.float(), w, dtype, exact)
            for isa in SIMD:
                kernel = C.kernel_name(handle, m, isa=isa, act="int8")
                where = f"{fmt} {params} isa={isa} kernel={kernel} M={m} N={n} K={k} x:{dtype} strided={strided}"
                assert any(f"_q8_{op}" in kernel for op in ("gemv", "gemm", "tiles", "compact")), where
                out = run(x, handle, n, bias, isa=isa, act="int8")
                assert torch.isfinite(out).all(), f"{where}: unwritten (NaN) outputs"
                err = (out.double() - exact).abs()
                worst = (err - bound).flatten().argmax().item()
                assert (err <= bound).all(), (f"{where}: |err| {err.flatten()[worst]:.3e} > bound "
                                              f"{bound.flatten()[worst]:.3e} at {divmod(worst, n)}")


@needs_simd
def test_nm_int8_activations_typical_error_and_fallbacks(rng, rel_err):
    """Model-sized 2:4+int4: ~0.5% normwise (the activation rounding), at batch 4 and 64 (the q8 gemm);
    groups the q8 kernels do not take (16 kept values) run the exact kernels instead, to 1e-5."""
    w = si.pack(torch.randn(256, 2048, generator=rng) * 0.02, "2:4+int4", group_size=64)
    handle = build_native_weight(w)
    for m in (4, 64):
        x = torch.randn(m, 2048, generator=rng)
        outs = [run(x, handle, 256, act="int8", threads=t) for t in (1, 2, 3)]
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), "the thread split changed the bits"
        assert 1e-3 < rel_err(outs[0], reference_linear(x, w)) < 1.2e-2
    assert any(f"_q8_{op}_" in C.kernel_name(handle, 64, act="int8") for op in ("gemm", "tiles"))
    w16 = si.pack(torch.randn(64, 512, generator=rng), "2:4+int8", group_size=16)
    x16 = torch.randn(2, 512, generator=rng)
    assert rel_err(run(x16, build_native_weight(w16), 64, act="int8"), reference_linear(x16, w16)) <= TOL_F32


@needs_simd
def test_nm_int8_activations_nonfinite_rows(rng):
    w = si.pack(torch.randn(20, 640, generator=rng), "2:4+int8")
    x = torch.randn(3, 640, generator=rng)
    x[1, 7] = float("inf")
    out = run(x, build_native_weight(w), 20, act="int8")
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


def _fma_f32(a, p, y):
    """fp32 fma(a, p, y), elementwise, rounded once (float64 numpy arrays of fp32 values; a integer
    < 2^24, so a * p is exact in float64). The float64 sum may round; TwoSum gives its error, which
    decides the one case where rounding the float64 sum to fp32 differs: a sum exactly halfway
    between two fp32 neighbours."""
    prod = a * p
    s = prod + y
    t = s - prod
    e = (prod - (s - t)) + (y - t)
    f = s.astype(np.float32)
    up, down = np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))
    f = np.where((e > 0) & (s == (f.astype(np.float64) + up) / 2), up, f)
    f = np.where((e < 0) & (s == (f.astype(np.float64) + down) / 2), down, f)
    return f.astype(np.float64)


def nm_int8_mode_reference(x, w, bias, out_dtype):
    """The int8-activation mode of a 2:4+int8 / 2:4+int4 weight, exactly as defined in csrc/README.md
    (N:M paragraph), in plain torch / numpy: x quantized per row and segment (q = rne(x * (127 /
    max|x_seg|)) in fp32, scale max|x_seg| / 127), per segment the exact integer sum over the kept
    values in whole 64-column blocks, y = fma(float(sum), sw * sx, y) in segment order, then the
    columns past the last whole block in fp32 (y + sum of v * x in order), bias, one rounding.
    None for the weights the q8 kernels leave to the exact ones (K < 64, groups of < 32 kept values)."""
    n_out, k = w.shape
    vals = w.values
    int4 = vals.fmt == "int4"
    group, n_groups = vals.g, vals.scale.shape[1]
    kc = w.kc
    if k < 64 or (n_groups > 1 and (group % 32 or group & (group - 1))):
        return None
    # segments of whole 64-column blocks: <= 4, <= a group's span and dividing it, >= 2 where the row
    # has 2; the least padding of the last segment, then the fewest segments
    nblk, one_group = k // 64, n_groups == 1 or group >= kc
    span = 4 if one_group else min(2 * group // 64, 4)
    pers = [span] + [p for p in range(span - 1, 1 if nblk > 1 else 0, -1) if one_group or span % p == 0]
    per_seg = min(pers, key=lambda p: -(-nblk // p) * p)
    seg = 64 * per_seg
    nseg = -(-nblk // per_seg)  # segments holding whole blocks
    codes = (vals.codes() - (8 if vals.zero is None else vals.zero.to(torch.int32).repeat_interleave(group, 1))
             if int4 else vals.qweight.to(torch.int32))[:, :kc]
    cols = w.indices()
    xf = x.float()
    m = xf.shape[0]
    y = np.zeros((m, n_out))
    for s in range(nseg):
        c0, c1 = s * seg, min((s + 1) * seg, k)
        xs = xf[:, c0:c1]
        amax = xs.abs().amax(dim=1, keepdim=True)
        inv = torch.tensor(127.0) / amax
        q = torch.where(amax > 0, torch.round(torch.clamp(xs * inv, -127.0, 127.0)), torch.zeros_like(xs))
        sx = torch.where(amax > 0, amax / torch.tensor(127.0), torch.zeros_like(amax))[:, 0]
        j0, j1 = 32 * s * per_seg, 32 * min((s + 1) * per_seg, nblk)
        wint = torch.zeros(n_out, c1 - c0, dtype=torch.float64)
        wint.scatter_(1, cols[:, j0:j1] - c0, codes[:, j0:j1].double())
        acc = (q.double() @ wint.T).numpy()  # exact: |sum| < 2^24
        sw = vals.scale[:, (j0 // group) if n_groups > 1 else 0]
        p = (sw[None, :] * sx[:, None]).double().numpy()  # fp32 product
        y = _fma_f32(acc, p, y)
    out = torch.from_numpy(y).float()
    jt = 32 * nblk
    if jt < kc:  # exact tail, in kept-value order
        deq = vals.to_dense(torch.float32)[:, :kc]
        tail = torch.zeros(m, n_out)
        for j in range(jt, kc):
            col = cols[:, j]
            ok = col < k
            prod = deq[:, j][None, :] * xf[:, col.clamp(max=k - 1)]
            tail = torch.where(ok[None, :], tail + prod, tail)
        out = out + tail
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@needs_simd
@pytest.mark.parametrize("case", Q8_CASES, ids=Q8_IDS)
def test_nm_int8_activations_bit_exact(case, rng, rel_err):
    """The q8 kernels (AVX2 gemv: 4 weight rows x 1 batch row, 2 x 2; gemm: 1 x 4 and the leftover rows;
    AVX-512 VNNI: the row-tile kernels on the weight made dense) give the reference definition's bits on
    every shape, dtype, stride, bias and thread count."""
    fmt, params = case
    for k, n in Q8_SHAPES:
        w = pack_nm(fmt, params, torch.float32, n, k, rng)
        handle = build_native_weight(w)
        for i, m in enumerate(Q8_BATCHES if k < 1000 else [1, 3, 64]):
            dtype = DTYPES[(i + k) % 3]
            strided = (i + n) % 2 == 1
            bias = torch.randn(n, generator=rng) if i % 2 == 0 else None
            x = make_x(m, k, dtype, strided, rng)
            ref = nm_int8_mode_reference(x, w, bias, dtype)
            if ref is None:  # the exact kernels serve it
                exact = reference_linear(x, w, bias)
                for isa in SIMD:
                    check(run(x, handle, n, bias, isa=isa, act="int8"), exact, dtype, f"{fmt} {params} K={k} exact", rel_err)
                continue
            for isa in SIMD:
                for threads in (1, 2, 3):
                    kernel = C.kernel_name(handle, m, isa=isa, act="int8")
                    where = f"{fmt} {params} kernel={kernel} M={m} N={n} K={k} x:{dtype} strided={strided} threads={threads}"
                    out = run(x, handle, n, bias, isa=isa, act="int8", threads=threads)
                    bad = (out.view(torch.int16 if dtype != torch.float32 else torch.int32)
                           != ref.view(torch.int16 if dtype != torch.float32 else torch.int32)).nonzero()[:3].tolist()
                    assert not bad, f"{where}: differs from the reference at {bad}: {[out[r, c].item() for r, c in bad]} " \
                                    f"vs {[ref[r, c].item() for r, c in bad]}"


# -- CSR -----------------------------------------------------------------------------------------------

CSR_CASES = [("csr", torch.float32), ("csr", torch.bfloat16), ("csr", torch.float16), ("csr+int8", torch.float32)]


def csr_weight(fmt, wdtype, n, k, density, g):
    """Random CSR weight: one empty row and one fully dense row when there are several."""
    w = torch.randn(n, k, generator=g)
    w = w * (torch.rand(n, k, generator=g) < density)
    w[0, k // 2] = 1.5  # at least one non-zero
    if n > 2:
        w[1] = 0
        w[2] = torch.randn(k, generator=g)
    return si.pack(w.to(wdtype), fmt)


@needs_simd
@pytest.mark.parametrize("case", CSR_CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in CSR_CASES])
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_csr_matches_reference(case, density, rng, rel_err):
    fmt, wdtype = case
    for k, n in SHAPES:
        w = csr_weight(fmt, wdtype, n, k, density, rng)
        assert isinstance(w, CSRWeight)
        family = "csr_int8" if fmt == "csr+int8" else "csr"
        handle = build_native_weight(w)
        sweep(w, rng, rel_err, f"{fmt} w:{wdtype} density {density}", isas=SIMD,
              expect=gemv_or_gemm(handle, family))


def test_csr_unsorted_columns_are_refused(rng):
    """Columns strictly increase within a row (formats/csr.py): the binding refuses them out of order,
    as it refuses a repeated one (which these kernels would sum and the reference keep once)."""
    w = csr_weight("csr", torch.float32, 40, 300, 0.2, rng)
    for r in range(40):
        a, b = int(w.crow[r]), int(w.crow[r + 1])
        w.col[a:b], w.values[a:b] = w.col[a:b].flip(0).clone(), w.values[a:b].flip(0).clone()
    with pytest.raises(ValueError, match="must be strictly increasing"):
        build_native_weight(w)


# -- dispatch ----------------------------------------------------------------------------------------

@needs_simd
def test_kernel_names():
    """The table sends few batch rows to the gemv kernels and many to the gemm ones (or the row tiles),
    and the int8 activation mode to the int8 gemv for 2:4 + int8 / int4 values."""
    cases = {"2:4": "nm", "4:8": "nm", "2:4+int8": "nm_int8", "2:4+int4": "nm_int4", "csr": "csr",
             "csr+int8": "csr_int8"}
    for fmt, family in cases.items():
        params = {"group_size": None} if "int4" in fmt else {}
        w = build_native_weight(si.pack(torch.randn(16, 64), fmt, **params))
        for isa in SIMD:
            assert C.kernel_name(w, 1, isa=isa, act="fp32").startswith(f"{family}_gemv_"), (fmt, isa)
            assert C.kernel_name(w, 64, isa=isa, act="fp32").startswith(
                (f"{family}_gemm_", f"{family}_panel_gemm_")), (fmt, isa)
            if "+int" in fmt and fmt.startswith("2:4"):
                if isa == "avx512" and C.cpu_features().get("amx_int8"):  # row tiles: VNNI, then AMX
                    small = "compact" if C.cpu_features().get("avx512_vbmi2") and fmt == "2:4+int8" else "tiles_gemv"
                    assert C.kernel_name(w, 1, isa=isa, act="int8") == f"{family}_q8_{small}_vnni_avx512", fmt
                    assert C.kernel_name(w, 64, isa=isa, act="int8") == f"{family}_q8_tiles_amx", fmt
                    continue
                if isa == "avx512" and C.cpu_features().get("avx512_vnni"):  # row tiles: compact at 1-2 rows
                    small = "compact" if C.cpu_features().get("avx512_vbmi2") and fmt == "2:4+int8" else "tiles"
                    assert C.kernel_name(w, 1, isa=isa, act="int8") == f"{family}_q8_{small}_vnni_avx512", fmt
                    assert C.kernel_name(w, 64, isa=isa, act="int8") == f"{family}_q8_tiles_vnni_avx512", fmt
                    continue
                assert C.kernel_name(w, 1, isa=isa, act="int8").startswith(f"{family}_q8_gemv_"), (fmt, isa)
                # AVX2: 2:4 + int4 on its dense int4 row tiles from 3 rows, 2:4 + int8 on the N:M kernel
                many = f"{family}_q8_tiles_avx2" if fmt == "2:4+int4" else f"{family}_q8_gemm_"
                assert C.kernel_name(w, 3, isa=isa, act="int8").startswith(many), (fmt, isa)
                assert C.kernel_name(w, 64, isa=isa, act="int8").startswith(many), (fmt, isa)


# -- CSR or dense (sparseinfer/backends/cpu_routes.py) -------------------------------------------------

@pytest.mark.parametrize("fmt", ["csr", "csr+int8"])
def test_csr_dense_dispatch_follows_the_crossover(fmt, rng, rel_err, monkeypatch):
    """With a crossover forced to 0 (dense always faster) and to 1 (CSR always faster) the backend
    runs the dense int8 kernel (csr+int8) / the dense fallback (csr) or the CSR kernel, says so, and
    every path gives the reference's numbers (exact activations)."""
    from sparseinfer.backends import BACKENDS, cpu_routes

    backend = BACKENDS["cpu"]
    w = csr_weight(fmt, torch.float32, 40, 300, 0.3, rng)
    x = torch.randn(5, 300, generator=rng)
    bias = torch.randn(40, generator=rng)
    ref = reference_linear(x, w, bias)
    isa = C.active_isa()
    for d_star, path in [(0.0, "dense_int8" if fmt == "csr+int8" else "dense"), (1.0, "kernel")]:
        table = {"csr_crossover": {f"{k}/{a}": {"1": d_star, "64": d_star}
                                   for k in ("csr_int8", "csr_float") for a in ("fp32", "int8")}}
        cpu_routes.reset()
        monkeypatch.setitem(cpu_routes.builtin_tables(), isa, table)
        r = backend.route(w, 5, "fp32")
        assert r.path == path and ("crossover" in r.why), r
        assert r.kernel.startswith("csr") == (path == "kernel"), r
        out = si.linear(x, w, bias, backend="cpu", act="fp32")
        assert rel_err(out, ref) <= TOL_F32, f"{fmt} {path}: {r}"
    cpu_routes.reset()


def test_crossover_interpolation(monkeypatch):
    """crossover() interpolates a rule in log2(batch), clamps outside it, and falls back to the
    fp32 points for an act class it lacks; dense_int8 is the CSR's dequantized weight exactly."""
    from sparseinfer.backends import cpu_routes

    rules = {"csr_crossover": {"csr_int8/fp32": {"1": 0.2, "4": 0.6}}}
    assert cpu_routes.crossover(rules, "csr_int8", "fp32", 1) == pytest.approx(0.2)
    assert cpu_routes.crossover(rules, "csr_int8", "fp32", 2) == pytest.approx(0.4)
    assert cpu_routes.crossover(rules, "csr_int8", "fp32", 64) == pytest.approx(0.6)
    assert cpu_routes.crossover(rules, "csr_int8", "auto", 1) == pytest.approx(0.2)  # the fp32 points
    assert cpu_routes.crossover(rules, "csr_float", "fp32", 1) is None
    w = csr_weight("csr+int8", torch.float32, 6, 50, 0.4, torch.Generator())
    assert cpu_routes.dense_int8(w).to_dense().equal(w.to_dense())
