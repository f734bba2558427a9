"""Measured dispatch (sparseinfer/backends/cpu_tuning.py): batch limits set at run time, fitted
from timings, stored per machine and applied by the cpu backend; `sparseinfer calibrate`."""

from __future__ import annotations

import json

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import cpu_routes, cpu_tuning
from sparseinfer.backends.cpu import build_native_weight

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason=f"requires sparseinfer._C ({_native._C_ERROR})")


@pytest.fixture(autouse=True)
def builtin_limits(monkeypatch, tmp_path):
    """Each test starts and ends with the built-in limits and a private, empty cache."""
    monkeypatch.setenv("SPARSEINFER_CACHE_DIR", str(tmp_path / "cache"))
    yield
    for r in C.kernel_table():
        C.set_batch_limit(r["name"], -1)
    cpu_tuning._applied = None


def _limited_row():
    """A row with a finite built-in limit followed by another row of its family (a gemv), if any."""
    for (family, act), chain in cpu_tuning.chains().items():
        if act == "fp32" and len(chain) >= 2:
            return family, chain
    pytest.skip("the active ISA has no family with a batch-limited kernel (scalar only)")


def test_set_batch_limit_moves_the_switch_point():
    family, chain = _limited_row()
    gemv, after = chain[0], chain[1]
    fmt, params = cpu_tuning._FAMILY_FORMATS[family]
    h = build_native_weight(si.pack(torch.randn(16, 256), fmt, **params))
    assert C.kernel_name(h, 1, None, "fp32") == gemv["name"]
    C.set_batch_limit(gemv["name"], 0)
    assert C.kernel_name(h, 1, None, "fp32") == after["name"]
    C.set_batch_limit(gemv["name"], 40)
    assert C.kernel_name(h, 40, None, "fp32") == gemv["name"] != C.kernel_name(h, 41, None, "fp32")
    assert {r["name"]: r["max_m"] for r in C.kernel_table()}[gemv["name"]] == 40
    C.set_batch_limit(gemv["name"], -1)  # the built-in limit again
    row = {r["name"]: r for r in C.kernel_table()}[gemv["name"]]
    assert row["max_m"] == row["builtin_max_m"] == gemv["builtin_max_m"]
    with pytest.raises(ValueError, match="no kernel named 'int9_gemv'"):
        C.set_batch_limit("int9_gemv", 3)


def test_fit_limits_stops_where_a_later_row_wins_clearly():
    chain = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    times = {"a": {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0},
             "b": {1: 2.0, 2: 1.99, 4: 3.0, 8: 9.0},   # at 2 within the margin: a keeps it
             "c": {1: 3.0, 2: 3.0, 4: 3.5, 8: 5.0}}
    assert cpu_tuning.fit_limits(chain, times) == {"a": 2, "b": 4}


def test_calibrate_store_and_apply(monkeypatch):
    entry = cpu_tuning.calibrate(n=64, k=256, reps=1, batches=(1, 2, 4), rotate_bytes=0)
    assert entry["machine"] == cpu_tuning.machine_key()
    limited = {r["name"] for chain in cpu_tuning.chains().values() for r in chain[:-1]}
    assert set(entry["limits"]) == limited and set(entry["limits"].values()) <= {0, 1, 2, 4}
    for family_act, per_row in entry["times"].items():
        assert all(t > 0 for ts in per_row.values() for t in ts.values()), family_act
    if not limited:
        return
    name = sorted(limited)[0]
    entry["limits"][name] = 37  # as if measured
    path = cpu_tuning.save(entry)
    assert json.loads(path.read_text())[entry["machine"]]["limits"][name] == 37
    assert cpu_tuning.stored()["limits"][name] == 37
    assert cpu_tuning.apply() is not None
    assert {r["name"]: r["max_m"] for r in C.kernel_table()}[name] == 37
    assert "measured here" in cpu_tuning.describe()
    monkeypatch.setenv("SPARSEINFER_TUNING", "0")
    assert cpu_tuning.stored() is None


def test_calibrate_command(tmp_path, capsys, monkeypatch):
    from sparseinfer.cli import main

    assert main(["calibrate", "--size", "100"]) == 2  # the int4 / 2:4+int4 weights need K >= 256
    assert "--size must be at least 256" in capsys.readouterr().err
    monkeypatch.setattr(cpu_routes, "ROUNDS", 1)  # one timed round per point: a check, not a measurement
    monkeypatch.setattr(cpu_routes, "POINT_BUDGET_S", 0.0)
    assert main(["calibrate", "--size", "256", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch limits on" in out and "CSR / dense crossover" in out and "dense fallback from batch" in out
    assert not cpu_tuning.cache_path().exists()  # a dry run stores nothing


@pytest.mark.parametrize("entry, problem", [
    ([1, 2], "not an object"),
    ({"limits": {"int8_gemv_avx2": "8"}}, "'limits' is not a map"),
    ({"limits": {"int8_gemv_avx2": -1}}, "'limits' is not a map"),
    ({"routes": {"k": {"times": {"kernel": -1.0}}}}, "'routes' is not a map"),
    ({"routes": {"k": {"times": {}}}}, "'routes' is not a map"),
    ({"rules": {"csr_crossover": {"csr_int8/fp32": {"1": "dense"}}}}, "'rules' is not"),
    ({"rules": {"dense_from": {"int8/fp32": 2.5}}}, "'rules' is not"),
])
def test_malformed_stored_entry_is_ignored_with_a_warning(entry, problem):
    """A hand-edited or broken cache never breaks the backend: the entry is ignored, loudly."""
    path = cpu_tuning.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({cpu_tuning.machine_key(): entry}))
    with pytest.warns(RuntimeWarning, match=f"ignoring the calibration stored.*{problem}"):
        assert cpu_tuning.stored() is None
    with pytest.warns(RuntimeWarning, match="run `sparseinfer calibrate` again"):
        assert cpu_tuning.apply() is None
