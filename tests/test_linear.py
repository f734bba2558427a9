"""sparseinfer.linear on the reference backend: math against float64, shapes, dtypes, errors."""

from __future__ import annotations

import pytest
import torch

import sparseinfer as si
from sparseinfer.backends import BackendUnavailable

FORMATS = ["int8", "int4", "2:4", "2:4+int8", "2:4+int4", "4:8", "csr", "csr+int8"]
# ||y - y64|| / ||y64||: fp32 accumulation over K <= 300 stays far below 1e-5; bf16/fp16 inputs
# and outputs are rounded to 8/11 bits, so the bound is a few units of their epsilon.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _packed(fmt, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    params = {"group_size": 32} if fmt in ("int4", "2:4+int4") else {}
    return si.pack(w, fmt, **params)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 7, 100), (3, 33, 129), (17, 1, 64), (2, 5, 260)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_matches_float64(fmt, m, n, k, dtype):
    w = _packed(fmt, n, k, seed=m * n + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    y = si.linear(x, w, bias, backend="reference")
    assert y.dtype == dtype and y.shape == (m, n)
    ref = x.double() @ w.to_dense().double().T + bias.double()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"{fmt} {m}x{n}x{k} {dtype}: rel err {err:.2e}"


def test_leading_batch_dims_and_no_bias():
    w = _packed("int4", 12, 64)
    x = torch.randn(2, 3, 5, 64)
    y = si.linear(x, w, act="fp32")
    assert y.shape == (2, 3, 5, 12)
    assert torch.allclose(y, x @ w.to_dense().T, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    w = _packed("int8", 9, 40)
    x = torch.randn(40, 6).T  # non-contiguous [6, 40]
    assert torch.allclose(si.linear(x, w, act="fp32"), x @ w.to_dense().T, rtol=1e-5, atol=1e-5)


def test_default_backend_is_available_one():
    w = _packed("2:4", 4, 16)
    report = si.backends()
    assert report["reference"]["available"]
    y = si.linear(torch.randn(2, 16), w)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    "x,bias,match",
    [
        (torch.randn(3, 63), None, r"\(3, 63\).*K=64"),
        (torch.randn(3, 64).double(), None, r"float64"),
        (torch.randint(0, 3, (3, 64)), None, r"int64"),
        (torch.randn(3, 64), torch.randn(7), r"bias must have shape \(8,\), got \(7,\)"),
        (torch.tensor(1.0), None, r"last dim must be K=64"),
    ],
)
def test_bad_linear_arguments(x, bias, match):
    w = _packed("int8", 8, 64)
    with pytest.raises(ValueError, match=match):
        si.linear(x, w, bias)


def test_bad_backend_names():
    w = _packed("int8", 8, 64)
    with pytest.raises(ValueError, match="unknown backend 'gpu9'"):
        si.linear(torch.randn(1, 64), w, backend="gpu9")
    unavailable = [name for name, r in si.backends().items() if not r["available"]]
    for name in unavailable:
        with pytest.raises(BackendUnavailable, match=f"backend '{name}' is not available"):
            si.linear(torch.randn(1, 64), w, backend=name)


def test_weight_must_be_packed():
    with pytest.raises(TypeError, match="PackedWeight"):
        si.linear(torch.randn(1, 4), torch.randn(4, 4))


def test_resolution_is_memoised_per_kind_of_call():
    """resolve() searches once per (backend, dtype, device, grad, rows) and weight; a call of another
    kind, or a backend registered since, is searched again."""
    from sparseinfer.backends import BACKENDS, Backend, register, resolve

    w = _packed("int8", 8, 64)
    x = torch.randn(2, 64)
    first = resolve(w, x)
    assert resolve(w, x) is first and len(w._routes) == 1
    # needing gradients is a different kind of call: the kernels do not record autograd history
    assert resolve(w, x.clone().requires_grad_()).name == "reference"
    assert resolve(w, x) is first

    class Eager(Backend):  # a better backend, registered after the first search
        name, priority = "eager-test", 100

        def availability(self):
            return True, "test"

        def supports(self, w, x):
            return True

    try:
        register(Eager())
        assert resolve(w, x).name == "eager-test"
    finally:
        del BACKENDS["eager-test"]
        register(BACKENDS["reference"])  # re-sort the priority list, which drops memoised routes
    assert resolve(w, x).name == first.name


@pytest.mark.parametrize("fmt", ["int8", "int4", "2:4+int8", "2:4+int4", "csr+int8", "2:4"])
def test_act_int8_allows_quantized_activations(fmt):
    """act="int8" lets kernels that have an int8-activation mode use it (error ~ x's rounding,
    csrc/README.md: well under 2 % normwise on Gaussian x); formats without one stay exact; the
    reference stays exact whatever act says."""
    from sparseinfer.backends import BACKENDS

    cpu = BACKENDS["cpu"]
    if not cpu.availability()[0]:
        pytest.skip(f"requires the C++ backend: {cpu.availability()[1]}")
    w = _packed(fmt, 40, 256, seed=3)
    x = torch.randn(5, 2, 256, generator=torch.Generator().manual_seed(4))
    ref = si.linear(x, w, backend="reference")
    fast = si.linear(x, w, act="int8")
    exact = si.linear(x, w, act="fp32")
    assert torch.equal(si.linear(x, w, backend="reference", act="int8"), ref)
    assert ((exact - ref).norm() / ref.norm()).item() < 1e-5
    err = ((fast - ref).norm() / ref.norm()).item()
    kernel = cpu.kernel_name(w, 10, "int8")
    quantizes = "_q8_" in kernel
    if fmt != "csr+int8":  # CSR runs exact CSR kernels, or dense int8 ones past its measured crossover
        assert quantizes == (fmt in ("int8", "int4", "2:4+int8", "2:4+int4")), kernel
    assert (1e-5 < err < 2e-2) if quantizes else err < 1e-5, err


def test_act_must_be_a_known_mode():
    w = _packed("int8", 8, 64)
    with pytest.raises(ValueError, match=r"act must be one of \('auto', 'fp32', 'int8'\) or None, got 'int4'"):
        si.linear(torch.randn(2, 64), w, act="int4")
    with pytest.raises(ValueError, match="act must be one of"):
        si.set_act(torch.nn.Sequential(), "fast")


def test_set_act_reaches_every_layer_and_explain():
    from sparseinfer.backends import BACKENDS

    if not BACKENDS["cpu"].availability()[0]:
        pytest.skip("requires the C++ backend")
    model = si.compress(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)),
                        "int4", progress=False)
    si.set_act(model, "fp32")
    assert all("_q8_" not in r["kernel"] for r in si.explain(model, batch=4))
    si.set_act(model, "int8")
    assert all("_q8_" in r["kernel"] for r in si.explain(model, batch=4))
    assert "act='int8'" in repr(model)


def test_cpu_thread_count_setting(monkeypatch):
    """si.set_threads overrides torch's thread count for the CPU kernels; the split of output rows
    over threads never changes a result bit; bad values are refused by name."""
    import subprocess
    import sys

    from sparseinfer.backends import cpu

    if not cpu.CpuBackend().availability()[0]:
        pytest.skip("requires the C++ backend")
    w = _packed("int4", 67, 256)
    x = torch.randn(5, 256)
    try:
        si.set_threads(1)
        assert cpu.threads() == 1
        one = si.linear(x, w)
        si.set_threads(3)
        assert torch.equal(si.linear(x, w), one)
        si.set_threads(None)
        assert cpu.threads() == torch.get_num_threads()
    finally:
        si.set_threads(None)
    with pytest.raises(ValueError, match="positive int or None, got 0"):
        si.set_threads(0)
    code = "from sparseinfer.backends import cpu; print(cpu.threads())"
    env = {**__import__("os").environ, "SPARSEINFER_NUM_THREADS": "3"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "3"
    env["SPARSEINFER_NUM_THREADS"] = "many"
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr
    assert "SPARSEINFER_NUM_THREADS must be a positive integer, got 'many'" in err
