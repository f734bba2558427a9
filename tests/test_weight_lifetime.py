"""Prepacked layouts follow the canonical tensors they come from (issue 15, items 2 and 3).

* Storage moves -- ``module.share_memory()``, ``tensor.set_()`` -- free the memory a ``_C.Weight``
  pointed into; the next call must rebuild the view, not read freed memory (run in a subprocess:
  before the fix it died of SIGSEGV).
* In-place writes -- ``load_state_dict``, ``copy_`` -- leave every derived layout stale: int8-activation
  row tiles, reordered 2:4 codes, the CSR dense copy; the next call must use the new values, on every
  format, in both activation modes, on the CSR kernels and on CSR's dense path.
* A write that breaks the format (a column index out of range) is refused when the view is rebuilt.
* ``.half()`` / ``.bfloat16()`` on a compressed model cast what the formats allow and keep the rest.

The Triton prepack is covered in tests/test_triton.py (test_prepack_follows_in_place_writes); the same
paths under AddressSanitizer in tests/test_native_sanitizers.py.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import cpu_routes, reference_linear

pytestmark = pytest.mark.skipif(_native._C is None, reason=f"requires sparseinfer._C ({_native._C_ERROR})")

USE_AFTER_FREE = textwrap.dedent("""
    import sys, torch, sparseinfer as si
    from sparseinfer.formats import Int8Weight
    n, how = 8192, sys.argv[1]
    w = Int8Weight(torch.ones(n, n, dtype=torch.int8), torch.ones(n, 1), n, None)
    m = torch.nn.Sequential(si.CompressedLinear(w, act="fp32"))  # exact: the check below is 1e-5
    x = torch.randn(2, n)
    expected = x.sum(-1, keepdim=True).expand(2, n)
    with torch.no_grad():
        m(x)                                   # the native view is built here
        if how == "share_memory":
            m.share_memory()                   # storage moved in place, the old one freed
        else:
            w.qweight.set_(w.qweight.clone())  # rebound to new memory, the old one freed
        y = m(x)
    print(float(((y - expected).norm() / expected.norm())))
""")


@pytest.mark.parametrize("how", ["share_memory", "set_"])
def test_storage_moved_under_a_prepacked_weight_in_subprocess(how):
    """The issue's reproducer: 8192 x 8192, so the freed storage is unmapped and a stale pointer faults."""
    proc = subprocess.run([sys.executable, "-c", USE_AFTER_FREE, how], capture_output=True, text=True, timeout=600)
    assert proc.returncode != -signal.SIGSEGV, f"segfault after {how}: the native weight read freed memory"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) < 1e-5  # fp32 sums of 8192 terms in another order


# -- in-place writes: every derived layout follows ------------------------------------------------------

# (format, pack parameters, CSR path): CSR weights run the CSR kernels or, past the measured crossover,
# a dense path (float: the dense fallback's fp32 copy; int8: the dense int8 kernels): both are pinned below.
CASES = [("int8", {}, None), ("int4", {"group_size": 32}, None), ("int4", {"group_size": 64, "symmetric": False}, None),
         ("2:4", {}, None), ("2:4+int8", {"group_size": 64}, None), ("2:4+int4", {"group_size": 32}, None),
         ("csr", {}, "csr"), ("csr", {}, "dense"), ("csr+int8", {}, "csr"), ("csr+int8", {}, "dense")]


def _pair(fmt: str, params: dict, seed: int):
    """Two compressed layers of one format whose state dicts fit each other (CSR: one sparsity pattern)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(96, 256, generator=g) > 0.6) if fmt.startswith("csr") else torch.ones(96, 256, dtype=torch.bool)
    def weight():  # |w| in [0.5, 1.5): no int8 code rounds to 0 (a csr+int8 weight would lose the entry)
        return torch.randn(96, 256, generator=g).sign() * (0.5 + torch.rand(96, 256, generator=g)) * mask

    return [si.CompressedLinear(si.pack(weight(), fmt, **params), torch.randn(96, generator=g), backend="cpu")
            for _ in range(2)]


@pytest.mark.parametrize("act", ["fp32", "int8"])
@pytest.mark.parametrize("fmt,params,csr_path", CASES,
                         ids=[f"{f}-{'-'.join(f'{k}{v}' for k, v in p.items())}-{c}" for f, p, c in CASES])
def test_load_state_dict_reaches_every_prepacked_layout(fmt, params, csr_path, act, monkeypatch):
    def pinned(w, family, isa, m, act, paths):  # the route rules, pinned: CSR kernels or a dense path
        dense = "dense_int8" if "dense_int8" in paths else "dense"
        return ("kernel" if csr_path in (None, "csr") else dense), "pinned by the test"

    monkeypatch.setenv("SPARSEINFER_MEASURE", "0")
    monkeypatch.setattr(cpu_routes, "_by_rules", pinned)
    a, b = _pair(fmt, params, seed=len(fmt))
    a.act = b.act = act
    xs = [torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)) for rows in (1, 3, 40)]
    with torch.no_grad():
        before = [a(x) for x in xs]  # builds every layout these calls use (tiles, reordered codes, dense copy)
        a.load_state_dict(b.state_dict())
        for x, old in zip(xs, before):
            y, want = a(x), b(x)  # the same kernels on the same values: the same bits
            assert torch.equal(y, want), f"{fmt} act={act} rows={x.shape[0]}: stale layout"
            assert not torch.equal(y, old)
    assert a.packed.equal(b.packed)


@pytest.mark.parametrize("fmt,params", [("int8", {}), ("2:4+int4", {"group_size": 32}), ("csr+int8", {})])
def test_storage_moves_in_process(fmt, params):
    """Small weights (no fault, but the old memory is freed): outputs stay those of the weight."""
    layer = _pair(fmt, params, seed=1)[0]
    layer.act = "int8"
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = layer(x)
        torch.nn.Sequential(layer).share_memory()
        assert torch.equal(layer(x), want)
        for t in layer.packed.tensors().values():
            t.set_(t.clone())
            assert torch.equal(layer(x), want)


@pytest.mark.parametrize("fmt,params", [("int8", {}), ("2:4+int4", {"group_size": 32}), ("csr+int8", {})])
def test_deepcopy_of_a_layer_that_has_run(fmt, params):
    """copy.deepcopy after calls (native layouts prepacked): the copy owns its tensors, rebuilds its
    own caches and gives the same bits, and the original still runs on its own."""
    layer = _pair(fmt, params, seed=2)[0]
    layer.act = "int8"
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = layer(x)
        twin = copy.deepcopy(torch.nn.Sequential(layer))[0]
        assert torch.equal(twin(x), want)
        for a, b in zip(layer.packed.tensors().values(), twin.packed.tensors().values()):
            assert a.data_ptr() != b.data_ptr()
        assert torch.equal(layer(x), want)


@pytest.mark.parametrize("fmt,params,csr_path", [("csr", {}, "dense"), ("csr", {}, "csr"), ("2:4+int8", {}, None)])
def test_inference_tensors_and_copies_of_them(fmt, params, csr_path, monkeypatch):
    """Packed tensors made under torch.inference_mode have no version counter: the per-call stamp
    asks instead of reading it (an exception per tensor and call made such a model 0.72x dense) and
    the layer gives the same bits as one of ordinary tensors. A deep copy made outside inference
    mode holds ordinary tensors again, and must see its in-place writes (its stamp is its own)."""
    monkeypatch.setattr(cpu_routes, "_by_rules", lambda w, family, isa, m, act, paths: (
        "kernel" if csr_path in (None, "csr") else "dense", "pinned by the test"))
    monkeypatch.setenv("SPARSEINFER_MEASURE", "0")
    plain = _pair(fmt, params, seed=3)[0]
    with torch.inference_mode():
        frozen = copy.deepcopy(plain)
    assert all(t.is_inference() for t in frozen.packed.tensors().values())
    assert all(version is None for _, version in frozen.packed._stamp())
    x = torch.randn(40, 256)
    with torch.inference_mode():
        want = plain(x)
        assert torch.equal(frozen(x), want) and torch.equal(frozen(x), want)  # planned, then memoised
    twin = copy.deepcopy(frozen)
    assert not any(t.is_inference() for t in twin.packed.tensors().values())
    with torch.no_grad():
        assert torch.equal(twin(x), want)
        name = "values.qweight" if fmt == "2:4+int8" else "values"
        getattr(twin, "packed_" + name.replace(".", "__")).neg_()  # written in place
        fresh = si.linear(x, copy.deepcopy(twin.packed), twin.bias, backend="cpu")
        assert not torch.equal(fresh, want) and torch.equal(twin(x), fresh)
    with torch.inference_mode():  # an inference tensor counts no writes, but a move shows
        frozen_values = getattr(frozen, "packed_" + name.replace(".", "__"))
        frozen_values.set_(frozen_values.neg())
        assert torch.equal(frozen(x), fresh)


def test_pickle_of_a_weight_that_has_run():
    """A pickled packed weight leaves its native layouts and tensor stamps behind, like a deep copy:
    the copy runs on its own tensors and sees their writes."""
    import pickle

    layer = _pair("2:4+int8", {}, seed=4)[0]
    x = torch.randn(3, 256)
    with torch.no_grad():
        want = layer(x)
        w = pickle.loads(pickle.dumps(layer.packed))
        assert w.equal(layer.packed) and torch.equal(si.linear(x, w, layer.bias, backend="cpu", act=layer.act), want)
        w.values.qweight.neg_()
        assert not torch.equal(si.linear(x, w, layer.bias, backend="cpu", act=layer.act), want)


def test_a_write_that_breaks_the_format_is_refused():
    """The rebuilt view is validated again, as at pack time: a column index out of range written in
    place is refused, never read out of bounds."""
    w = si.pack(torch.randn(16, 64) * (torch.rand(16, 64) < 0.2), "csr")
    x = torch.randn(2, 64)
    want = si.linear(x, w, backend="cpu")
    col = w.col.clone()
    w.col[-1] = 1000
    with pytest.raises(ValueError, match="column index 1000 .* outside 0..63"):
        si.linear(x, w, backend="cpu")
    w.col.copy_(col)  # a valid weight again
    assert torch.equal(si.linear(x, w, backend="cpu"), want)


@pytest.mark.parametrize("cast,dtype", [("half", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_and_bfloat16_on_a_compressed_model(cast, dtype):
    """Quantized weights keep the dtypes their format fixes (float32 scales, int8 / int4 codes); float
    N:M values take the cast, as does every bias; the model then runs in that dtype."""
    torch.manual_seed(0)
    model = si.compress(torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32),
                                            torch.nn.ReLU(), torch.nn.Linear(32, 16)),
                        {"default": "2:4+int8", "layers": {"2": "int4-g16", "4": "2:4"}}, progress=False)
    si.set_act(model, "fp32")  # exact: compared with the reference to 1e-5 below
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
        quantized = {k: v.clone() for k, v in model.state_dict().items() if "packed_" in k and not k.startswith("4.")}
        float_values = model[4].packed.values.clone()
        getattr(model, cast)()
        state = model.state_dict()
        assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in quantized.items())
        assert model[4].packed.values.dtype == dtype and torch.equal(model[4].packed.values, float_values.to(dtype))
        assert model[0].bias.dtype == dtype
        y = model(x.to(dtype))
        assert y.dtype == dtype
        # x and the bias rounded to the cast's 8 / 11-bit significand, then one more rounding of y
        tol = 2 ** -6 if dtype == torch.bfloat16 else 2 ** -9
        assert ((y.float() - ref).norm() / ref.norm()).item() < tol
        model.float()
        assert model[0].bias.dtype == torch.float32 and model[4].packed.values.dtype == torch.float32
        h = x
        for i in (0, 2, 4):
            h = reference_linear(h, model[i].packed, model[i].bias)
            h = torch.relu(h) if i < 4 else h
        torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-5)


def test_dequantize_validates_a_weight_written_in_place():
    """The dense fallback's dequantize checks its sources as linear does: a column index written out
    of range is refused (it would otherwise be a write past the output row)."""
    from sparseinfer.backends.cpu_native import native_weight

    C = _native.require_native()
    w = si.pack(torch.randn(16, 64) * (torch.rand(16, 64) < 0.5), "csr")
    handle = native_weight(w)
    out = torch.full((16, 64), float("nan"))
    C.dequantize(handle, 0, 16, out, 1)
    assert torch.equal(out, w.to_dense())
    w.col[-1] = 1000
    with pytest.raises(ValueError, match="column index 1000 .* outside 0..63"):
        C.dequantize(handle, 0, 16, torch.empty(16, 64), 1)
