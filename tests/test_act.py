"""Activation modes end to end (sparseinfer/act.py): one set of values in Python and C++, "auto"
the default, every entry point, and auto taking the int8-activation kernel where the table lists one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.act import ACT_MODES, DEFAULT_ACT
from sparseinfer.backends import BACKENDS, cpu_routes
from sparseinfer.backends.cpu import build_native_weight

C = _native._C
needs_c = pytest.mark.skipif(C is None, reason=f"requires sparseinfer._C ({_native._C_ERROR})")
FORMATS = [("int8", {}), ("int4", {"group_size": 32}), ("2:4", {}), ("2:4+int8", {}),
           ("2:4+int4", {"group_size": 64}), ("csr", {}), ("csr+int8", {})]


def test_the_default_is_auto():
    assert DEFAULT_ACT == "auto" and ACT_MODES == ("auto", "fp32", "int8")


@needs_c
def test_python_and_the_extension_accept_the_same_modes():
    assert tuple(C.act_modes()) == ACT_MODES
    w = si.pack(torch.randn(8, 64), "int8")
    h, x, out = build_native_weight(w), torch.randn(1, 64), torch.empty(1, 8)
    for mode in ACT_MODES:
        C.linear(x, h, out, act=mode)
        si.linear(x, w, act=mode)
    for bad in ("exact", "fast", "int4", "FP32"):
        with pytest.raises(ValueError, match="act must be one of"):
            si.linear(x, w, act=bad)
        with pytest.raises(ValueError, match="use one of auto, fp32, int8"):
            C.linear(x, h, out, act=bad)


@pytest.mark.parametrize("where, call", [
    ("linear", lambda: si.linear(torch.randn(1, 8), si.pack(torch.randn(4, 8), "int8"), act="fast")),
    ("set_act", lambda: si.set_act(torch.nn.Sequential(), "exact")),
    ("load", lambda: si.load("nowhere.sinf", act="w8a8")),
])
def test_every_entry_point_checks_the_mode(where, call):
    with pytest.raises(ValueError, match=rf"{where}: act must be one of \('auto', 'fp32', 'int8'\)"):
        call()


@needs_c
@pytest.mark.parametrize("fmt, params", FORMATS, ids=[f for f, _ in FORMATS])
@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_auto_takes_the_int8_kernel_where_the_table_lists_one(fmt, params, batch, rng, monkeypatch):
    """auto runs, bit for bit, what the table's first matching row runs with int8 activations
    allowed: the int8-activation kernel where one is listed for this batch, else the exact one.
    Kernel selection only: no built-in route rules (the shipped ones may send this 40 %-dense CSR
    to a dense path; tests/test_cpu_routes.py covers routing)."""
    monkeypatch.setattr(cpu_routes, "_tables", {"_": {}})
    cpu = BACKENDS["cpu"]
    w = si.pack(torch.randn(48, 256, generator=rng) * (torch.rand(48, 256, generator=rng) < 0.4), fmt, **params)
    h = cpu.prepack(w)
    q8 = {r["name"] for r in C.kernel_table() if r["int8_act"]}
    listed = C.kernel_name(h, batch, None, "int8")
    info = cpu.describe(w, batch, "auto")
    assert info["path"] == "kernel" and info["kernel"] == f"cpu:{listed}", info
    assert info["act"] == ("int8" if listed in q8 else "fp32"), info
    assert "auto" in info["why"]
    x = torch.randn(batch, 256, generator=rng)
    auto, int8, fp32 = (si.linear(x, w, backend="cpu", act=a) for a in ("auto", "int8", "fp32"))
    assert torch.equal(auto, int8)
    if listed not in q8:
        assert torch.equal(auto, fp32)
    if fmt.startswith("csr") or fmt == "2:4":  # no int8-activation kernels: exact in every mode
        assert info["act"] == "fp32" and torch.equal(auto, fp32)


@needs_c
def test_layers_follow_set_act_and_explain_says_the_mode(rng):
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    model = si.compress(model, "int8", progress=False)
    x = torch.randn(4, 256, generator=rng)
    h = BACKENDS["cpu"].prepack(model[0].packed)
    int8_listed = C.kernel_name(h, 4, None, "int8") in {r["name"] for r in C.kernel_table() if r["int8_act"]}
    assert model[0].act is None  # the process default
    rows = si.explain(model, batch=4)
    assert {r["act"] for r in rows} == {"int8" if int8_listed else "fp32"}
    y_auto = model(x)
    si.set_act(model, "fp32")
    assert model[0].act == "fp32" and "act='fp32'" in repr(model[0])
    rows = si.explain(model, batch=4)
    assert {r["act"] for r in rows} == {"fp32"} and all("fp32 requested" in r["why"] for r in rows)
    y_exact = model(x)
    assert torch.equal(y_auto, y_exact) != int8_listed


def _run(env_value: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSEINFER_ACT": env_value}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


@needs_c
def test_sparseinfer_act_environment():
    """SPARSEINFER_ACT sets the mode of calls that name none (read once, by sparseinfer.act); a bad
    value makes those calls raise with the accepted values, and the cpu backend report says it."""
    code = """
        import torch, sparseinfer as si
        from sparseinfer.act import default_act
        w = si.pack(torch.randn(16, 256), "int4", group_size=32)
        x = torch.randn(2, 256)
        same = {a: torch.equal(si.linear(x, w, backend="cpu"), si.linear(x, w, backend="cpu", act=a))
                for a in ("fp32", "int8")}
        print("DEFAULT", default_act(), same["fp32"], same["int8"])
    """
    for value, expect in [("fp32", "DEFAULT fp32 True False"), ("int8", "DEFAULT int8 False True"),
                          ("", "DEFAULT auto False True")]:
        r = _run(value, code)
        assert expect in r.stdout, (value, r.stdout + r.stderr)
    r = _run("w4a8", """
        import torch, sparseinfer as si
        print("CPU", si.backends()["cpu"])
        try:
            si.linear(torch.randn(1, 64), si.pack(torch.randn(8, 64), "int8"))
        except ValueError as err:
            print("ERROR", err)
    """)
    assert "ERROR SPARSEINFER_ACT='w4a8' is not an activation mode; use one of auto, fp32, int8" in r.stdout, (
        r.stdout + r.stderr)
    assert "'available': False" in r.stdout and "SPARSEINFER_ACT='w4a8'" in r.stdout


def test_cli_takes_act():
    from sparseinfer.cli import build_parser

    parser = build_parser()
    for cmd in (["demo"], ["run", "model.sinf"]):
        assert parser.parse_args(cmd + ["--act", "auto"]).act == "auto"
        assert parser.parse_args(cmd).act is None
        with pytest.raises(SystemExit):
            parser.parse_args(cmd + ["--act", "exact"])
