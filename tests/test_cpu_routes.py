"""Kernel or dense, decided by measurement (sparseinfer/backends/cpu_routes.py): the dense fallback
is exact, decisions come from stored / first-use / built-in data in that order, first-use measuring
is bounded and cached, and a call reads no file. Timings are injected: nothing here depends on how
fast this machine is."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import BACKENDS, cpu_routes, cpu_tuning, reference_linear

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason=f"requires sparseinfer._C ({_native._C_ERROR})")
FORMATS = [("int8", {}), ("int8", {"group_size": 64}), ("int4", {"group_size": 32}),
           ("int4", {"group_size": 64, "symmetric": False}), ("2:4", {}), ("4:8", {}), ("2:4+int8", {}),
           ("2:4+int4", {"group_size": 32}), ("csr", {}), ("csr+int8", {})]
TOL_F32 = 1e-5  # fp32 summation order over K <= 1000: ~sqrt(K) * 2^-24 normwise


@pytest.fixture(autouse=True)
def fresh_routes(monkeypatch, tmp_path):
    """A private cache, measuring allowed, no built-in table (an unknown machine), no memo."""
    monkeypatch.setenv("SPARSEINFER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSEINFER_MEASURE", "1")
    cpu_routes.reset()
    monkeypatch.setattr(cpu_routes, "_tables", {"_": {}})  # non-empty: the shipped file is not read
    yield
    cpu_routes.reset()


def _weight(fmt, params, n, k, g, density=0.4):
    w = torch.randn(n, k, generator=g)
    if fmt.startswith("csr"):
        w = w * (torch.rand(n, k, generator=g) < density)
    return si.pack(w, fmt, **params)


class FakeTimer:
    """measure_point stand-in: fixed times per path (seconds), counting calls. A kernel the table
    does not pick ("kernel:<name>") takes twice the pick's time unless given."""

    def __init__(self, **times):
        self.times, self.calls = times, []

    def __call__(self, w, m, act, paths):
        self.calls.append((w.shape, m, act, tuple(paths)))
        times = {p: self.times.get(p, 2 * self.times["kernel"]) if p.startswith("kernel:") else self.times[p]
                 for p in paths}
        copy = cpu_routes.copy_affordable(w)  # as measure_point records it
        return {"times": times, "m": m, "rows": w.shape[0], "n": w.shape[0], "when": "test", "dense_threads": 2,
                "dense_copy": copy}


# -- the dense fallback ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, params", FORMATS, ids=[f"{f}-{p}" for f, p in FORMATS])
@pytest.mark.parametrize("small, tile_rows", [(True, 16), (False, 16), (False, 64)],
                         ids=["one-copy", "tiles", "one-tile"])
def test_dense_fallback_matches_the_reference(fmt, params, small, tile_rows, rng, rel_err, monkeypatch):
    """Tile by tile (tiles forced small: 16 rows, 4 tiles with the last one short; or one tile of the
    whole weight) or one fp32 copy, odd N / K, batch 1 / 3 / 17, bias or not, fp32 / bf16 x with
    leading dims: the exact product to fp32 summation order."""
    monkeypatch.setattr(cpu_routes, "SMALL_BYTES", 1 << 30 if small else 0)
    monkeypatch.setattr(cpu_routes, "TILE_BYTES", tile_rows * 4 * 300)
    w = _weight(fmt, params, 53, 300, rng)
    for m, dtype, bias in [(1, torch.float32, None), (3, torch.bfloat16, True), (17, torch.float32, True)]:
        x = torch.randn(m, 2, 300, generator=rng).to(dtype)
        b = torch.randn(53, generator=rng) if bias else None
        out = cpu_routes.dense_linear(x, w, b)
        ref = reference_linear(x.reshape(-1, 300), w, b).reshape(m, 2, 53)
        assert out.dtype == dtype and out.shape == (m, 2, 53)
        memo = w._prepacked.get("cpu:dense-copy")  # (stamp, fp32 copy or None)
        assert memo is not None and (memo[1] is not None) == small
        tol = TOL_F32 if dtype == torch.float32 else 2.0**-8
        assert rel_err(out, ref) <= tol, (fmt, m, dtype)


@pytest.mark.parametrize("fmt, params", FORMATS, ids=[f"{f}-{p}" for f, p in FORMATS])
def test_dequantize_is_to_dense_bit_for_bit(fmt, params, rng):
    w = _weight(fmt, params, 37, 301, rng)
    h = BACKENDS["cpu"].prepack(w)
    for a, b, threads in [(0, 37, 1), (5, 25, 2), (36, 37, 3)]:
        out = torch.full((b - a, 301), float("nan"))
        C.dequantize(h, a, b, out, threads)
        assert torch.equal(out, w.to_dense(torch.float32)[a:b]), (fmt, a, b)
    with pytest.raises(ValueError, match="rows 30:38 are not within 0:37"):
        C.dequantize(h, 30, 38, torch.empty(8, 301))
    with pytest.raises(ValueError, match="out"):
        C.dequantize(h, 0, 4, torch.empty(4, 300))


def test_rows_views_share_storage():
    w = si.pack(torch.randn(40, 128), "int4", group_size=32)
    part = w.rows(8, 24)
    assert part.shape == (16, 128) and part.qweight.data_ptr() == w.qweight[8].data_ptr()
    with pytest.raises(ValueError, match="rows: need 0 <= start < stop <= 40"):
        w.rows(30, 41)


@pytest.mark.parametrize("fmt, params", [("int4", {"group_size": 32}), ("2:4+int8", {}), ("csr", {}), ("csr+int8", {})])
def test_concat_rows_is_the_inverse_of_rows(fmt, params, rng):
    """Weights joined by rows (q / k / v: runtime/fused.py) give the rows of each, and rows() of the
    joint gives each back, tensor for tensor; CSR's row starts are shifted, its entries shared."""
    dense = [torch.randn(n, 128, generator=rng) * (torch.rand(n, 128, generator=rng) < 0.5) for n in (24, 8, 40)]
    parts = [si.pack(d, fmt, **params) for d in dense]
    joint = type(parts[0]).concat_rows(parts)
    assert joint.shape == (72, 128) and joint.fmt == parts[0].fmt
    assert torch.equal(joint.to_dense(), torch.cat([p.to_dense() for p in parts]))
    start = 0
    for p in parts:
        back = joint.rows(start, start + p.shape[0])
        assert back.tensors().keys() == p.tensors().keys()
        assert all(torch.equal(back.tensors()[k], t) for k, t in p.tensors().items()), fmt
        start += p.shape[0]
    if fmt.startswith("csr"):
        assert back.values.data_ptr() == joint.values[joint.nnz - parts[-1].nnz:].data_ptr()


# -- deciding --------------------------------------------------------------------------------------

def test_bucket_and_key():
    assert [cpu_routes.bucket(m) for m in (1, 2, 3, 8, 33, 256, 257)] == [1, 2, 4, 8, 64, 256, 512]
    w = si.pack(torch.randn(8, 64), "int4", group_size=32)
    assert cpu_routes.route_key(w, 33, "auto") == cpu_routes.route_key(w, 60, "int8") != \
        cpu_routes.route_key(w, 60, "fp32")
    c = si.pack(torch.randn(8, 64) * (torch.rand(8, 64) < 0.5), "csr")
    assert cpu_routes.route_key(c, 1, "fp32").endswith(f"|d{c.density:.2f}")


def test_choose_keeps_the_kernel_within_the_margin():
    m = cpu_routes.MARGIN
    assert cpu_routes.choose({"kernel": 1.0, "dense": 1.0 - m / 2}) == "kernel"
    assert cpu_routes.choose({"kernel": 1.0, "dense": 1.0 - 2 * m}) == "dense"
    assert cpu_routes.choose({"kernel": 1.0, "dense_int8": 0.5, "dense": 0.49}) == "dense_int8"
    assert cpu_routes.choose({"kernel": 1.0, "dense_int8": 0.5, "dense": 0.4}) == "dense"
    # another kernel comes after the table's pick and before the dense paths, whatever the dict order
    assert cpu_routes.choose({"dense": 0.5, "kernel:b": 0.5, "kernel": 1.0}) == "kernel:b"
    assert cpu_routes.choose({"dense": 0.5, "kernel:b": 1.0 - m / 2, "kernel": 1.0}) == "dense"
    assert cpu_routes.choose({"kernel:b": 1.0 - m / 2, "kernel": 1.0}) == "kernel"


def _alt_kernels(w):
    """The measured-only kernels that can run ``w`` at 64 rows (on AVX-512: the panel GEMM, the
    AVX2 xT GEMM), else skip."""
    alts = C.kernel_candidates(BACKENDS["cpu"].prepack(w), 64, None, "fp32")[1:]
    if not alts:
        pytest.skip(f"no measured-only kernel for {w.fmt} on {C.active_isa()}")
    return alts


@pytest.mark.parametrize("fmt", ["2:4", "csr"])
def test_the_routes_choose_among_kernels_and_name_the_winner(fmt, rng, rel_err, monkeypatch):
    """A measured-only kernel measured fastest runs (named in the call), is explained with the
    times, and gives the reference's numbers; the table's pick and dense are measured beside it."""
    w = _weight(fmt, {}, 70, 300, rng, density=0.5)
    alts = _alt_kernels(w)
    alt = alts[-1]  # the last candidate wins: the others take twice the pick's time
    fake = FakeTimer(kernel=1.0, dense=2.0, **{f"kernel:{alt}": 0.5})
    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    r = BACKENDS["cpu"].route(w, 40, "fp32")
    assert fake.calls == [((70, 300), 40, "fp32", ("kernel", *(f"kernel:{a}" for a in alts), "dense"))]
    assert r.path == "kernel" and r.kernel == r.named == alt and f"{alt} 500 ms" in r.why and "dense 2e+03 ms" in r.why
    x = torch.randn(40, 300, generator=rng)
    b = torch.randn(70, generator=rng)
    assert rel_err(si.linear(x, w, b, backend="cpu", act="fp32"), reference_linear(x, w, b)) <= TOL_F32
    picked = C.kernel_name(BACKENDS["cpu"].prepack(w), 40, None, "fp32")
    assert picked != alt
    monkeypatch.setenv("SPARSEINFER_MEASURE", "0")  # the rules choose the table's pick or dense only
    assert BACKENDS["cpu"].route(_weight(fmt, {}, 72, 300, rng, density=0.5), 40, "fp32").named is None  # unmeasured
    with pytest.raises(ValueError, match="kernel 'int8_panel_gemm_avx512' cannot run"):
        C.linear(x, BACKENDS["cpu"].prepack(w), torch.empty(40, 70), None, 1, None, "fp32", "int8_panel_gemm_avx512")


# (first process's times, second's, the merged winner): a close call (dense faster by 11 %, past
# MARGIN), and a clear one that was a transient slowdown of the kernel's timings
@pytest.mark.parametrize("first, second, merged", [
    ({"kernel": 1.0, "dense": 0.9}, {"kernel": 0.95, "dense": 1.2}, "dense"),
    ({"kernel": 3.0, "dense": 1.0}, {"kernel": 0.5, "dense": 1.1}, "kernel")])
def test_a_measurement_is_used_measured_again_by_the_next_process_then_settled(first, second, merged, rng,
                                                                              monkeypatch):
    """One measurement, however clear its winner, is used but not final: the next process measures
    once more and merges (each path's best); after SETTLED_ROUNDS nobody measures it again."""
    fake = FakeTimer(**first)
    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    w = _weight("int8", {}, 16, 64, rng)
    r = BACKENDS["cpu"].route(w, 8, "fp32")
    assert r.path == "dense" and "to be measured again" in r.why and len(fake.calls) == 1
    assert BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32").path == "dense"
    assert len(fake.calls) == 1  # once per process and key
    cpu_routes.reset()
    fake.times = dict(second)  # the second process sees it the other way round
    r = BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32")
    assert len(fake.calls) == 2 and r.why.startswith("measured again") and "2 measurements" in r.why
    assert r.path == merged
    stored = json.loads(cpu_tuning.cache_path().read_text())[cpu_tuning.machine_key()]["routes"]
    rec = stored[cpu_routes.route_key(w, 8, "fp32")]
    assert rec["rounds"] == 2 and rec["times"] == {p: min(first[p], second[p]) for p in first}
    cpu_routes.reset()
    BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32")
    assert len(fake.calls) == 2  # settled


@pytest.mark.parametrize("budget_mb, kept", [(None, True), ("0", False)])
def test_dense_routes_keep_an_fp32_copy_in_every_format_and_mode(budget_mb, kept, rng, rel_err, monkeypatch):
    """A weight routed to the dense fallback keeps one fp32 copy within SPARSEINFER_DENSE_COPY_MB
    (explained), whatever its format and the call's activation mode (an int8-activation call routed
    there is one whose kernel lost: tile by tile it would lose to dense too); with no budget left it
    runs tile by tile. Either way exact."""
    if budget_mb is not None:
        monkeypatch.setenv("SPARSEINFER_DENSE_COPY_MB", budget_mb)
    monkeypatch.setattr(cpu_routes, "SMALL_BYTES", 0)
    monkeypatch.setattr(cpu_routes, "measure_point", FakeTimer(kernel=1.0, dense=0.5, dense_int8=2.0))
    for fmt, act in (("2:4", "fp32"), ("csr", "int8"), ("2:4+int8", "fp32"), ("int4", "fp32"), ("2:4+int8", "int8"),
                     ("int8", "int8"), ("int4", "auto")):
        w = _weight(fmt, {}, 48, 128, rng)
        r = BACKENDS["cpu"].route(w, 16, act)
        assert r.path == "dense", (fmt, act, r)
        assert ("kept within SPARSEINFER_DENSE_COPY_MB" in r.why) == kept, (fmt, act, r.why)
        assert ("tiles dequantized per call" in r.why) == (not kept), (fmt, act, r.why)
        x = torch.randn(16, 128, generator=rng)
        assert rel_err(si.linear(x, w, None, backend="cpu", act=act), reference_linear(x, w)) <= TOL_F32
        memo = w._prepacked.get("cpu:dense-copy")
        assert memo is not None and (memo[1] is not None) == kept, fmt
    held = cpu_routes._copy_bytes
    del w, memo
    import gc
    gc.collect()
    assert cpu_routes._copy_bytes <= held  # released with the weights


def test_a_dense_time_measured_without_the_copy_a_weight_now_keeps_is_measured_again(rng, monkeypatch):
    """A stored exact-mode record whose dense path was timed tile by tile (before exact calls kept
    fp32 copies) no longer stands for the dense route: the next process measures it again."""
    monkeypatch.setattr(cpu_routes, "SMALL_BYTES", 0)
    w = _weight("int8", {}, 48, 128, rng)
    key = cpu_routes.route_key(w, 16, "fp32")
    old = {"times": {"kernel": 0.5, "dense": 1.0}, "m": 16, "rows": 48, "n": 48, "when": "before",
           "dense_threads": 2, "dense_copy": False, "rounds": 2}
    cpu_tuning.save(routes={key: old})
    cpu_routes.reset()
    fake = FakeTimer(kernel=1.0, dense=0.5)
    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    r = BACKENDS["cpu"].route(w, 16, "fp32")
    assert len(fake.calls) == 1 and r.path == "dense" and "kept within" in r.why, r.why
    cpu_tuning.save(routes={key: old})
    cpu_routes.reset()
    monkeypatch.setenv("SPARSEINFER_DENSE_COPY_MB", "0")  # no copy can be kept: the stored times stand
    assert BACKENDS["cpu"].route(_weight("int8", {}, 48, 128, rng), 16, "fp32").path == "kernel"
    assert len(fake.calls) == 1


@pytest.mark.parametrize("winner", ["kernel", "dense"])
def test_first_use_measures_once_stores_and_runs_the_winner(winner, rng, rel_err, monkeypatch):
    fake = FakeTimer(kernel=1.0, dense=0.5) if winner == "dense" else FakeTimer(kernel=0.5, dense=1.0)
    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    cpu = BACKENDS["cpu"]
    w = _weight("int8", {}, 48, 256, rng)
    x = torch.randn(33, 256, generator=rng)
    out = si.linear(x, w, backend="cpu", act="fp32")
    assert rel_err(out, reference_linear(x, w)) <= TOL_F32
    assert fake.calls == [((48, 256), 33, "fp32", ("kernel", "dense"))]  # at the call's batch
    r = cpu.route(w, 40, "fp32")  # same bucket: no new measurement
    assert r.path == winner and r.why.startswith("measured") and len(fake.calls) == 1
    assert (r.kernel == cpu_routes.DENSE_KERNEL) == (winner == "dense")
    stored = json.loads(cpu_tuning.cache_path().read_text())[cpu_tuning.machine_key()]["routes"]
    assert list(stored) == [cpu_routes.route_key(w, 33, "fp32")]
    # a new process (memo and read entry forgotten) measures once more and merges (SETTLED_ROUNDS);
    # the next one takes the stored answer without measuring
    for calls, why in ((2, "measured again"), (2, "measured test")):
        cpu_routes.reset()
        r2 = cpu.route(_weight("int8", {}, 48, 256, rng), 64, "fp32")
        assert r2.path == winner and r2.why.startswith(why) and len(fake.calls) == calls


def test_a_record_of_another_kernel_is_measured_again(rng, monkeypatch):
    """A stored record names the kernel it timed: when the table now picks another one for that batch
    (a build that added a faster kernel), the point is measured again instead of trusting old times."""
    fake = FakeTimer(kernel=1.0, dense=0.5)
    monkeypatch.setattr(cpu_routes, "measure_point", lambda w, m, act, paths: {**fake(w, m, act, paths),
                                                                                "kernel": "an_old_kernel"})
    w = _weight("int8", {}, 16, 64, rng)
    assert BACKENDS["cpu"].route(w, 8, "fp32").path == "dense" and len(fake.calls) == 1
    cpu_routes.reset()
    fake.times = {"kernel": 0.5, "dense": 1.0}
    monkeypatch.setattr(cpu_routes, "measure_point", fake)  # records with no kernel name are trusted
    r = BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32")
    assert r.path == "kernel" and r.why.startswith("measured on first use") and len(fake.calls) == 2
    for _ in range(2):  # measured once more (SETTLED_ROUNDS), then settled
        cpu_routes.reset()
        assert BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32").path == "kernel"
    assert len(fake.calls) == 3


def test_first_use_budget_then_rules(rng, monkeypatch):
    fake = FakeTimer(kernel=1.0, dense=0.5)
    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    monkeypatch.setattr(cpu_routes, "_spent", cpu_routes.MEASURE_BUDGET_S)  # this process has spent it
    r = BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32")
    assert not fake.calls and r.path == "kernel" and "budget" in r.why


def test_no_measuring_on_a_known_machine_or_when_disabled(rng, monkeypatch):
    fake = FakeTimer(kernel=1.0, dense=0.5)
    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    monkeypatch.setattr(cpu_routes, "_tables", {C.active_isa(): {"measured_on": [cpu_tuning.machine_key()]}})
    assert cpu_routes.known_machine()
    assert BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32").path == "kernel"
    cpu_routes.reset()
    monkeypatch.setattr(cpu_routes, "_tables", {"_": {}})
    monkeypatch.setenv("SPARSEINFER_MEASURE", "0")
    assert BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 8, "fp32").path == "kernel"
    assert not fake.calls


@pytest.mark.parametrize("fmt, params", FORMATS, ids=[f"{f}-{p}" for f, p in FORMATS])
def test_rules_route_every_format_and_every_path_is_exact(fmt, params, rng, rel_err, monkeypatch):
    """The built-in rules alone (no measuring): below dense_from the kernel, from it the dense
    fallback; CSR by density against the crossover. Each path gives the reference's numbers."""
    monkeypatch.setenv("SPARSEINFER_MEASURE", "0")
    cpu = BACKENDS["cpu"]
    w = _weight(fmt, params, 40, 300, rng)
    family = cpu.prepack(w).kernel_family
    rules = {"dense_from": {f"{f}/{a}": 16 for f in ("int8", "int4", "nm_float", "nm_int8", "nm_int4")
                            for a in ("fp32", "int8")},
             "csr_crossover": {f"{f}/{a}": {"1": 0.9, "16": 0.1} for f in ("csr_int8", "csr_float")
                               for a in ("fp32", "int8")}}
    monkeypatch.setattr(cpu_routes, "_tables", {C.active_isa(): rules, "scalar": rules})
    for m in (1, 9, 16, 40):
        r = cpu.route(w, m, "fp32")
        if family.startswith("csr"):
            dense = w.density > cpu_routes.crossover(rules, family, "fp32", m)
            big = cpu_routes.bucket(m) >= 16
            assert r.path == ("kernel" if not dense else "dense" if big or not w.quantized else "dense_int8"), r
            assert "crossover" in r.why
        else:
            assert r.path == ("dense" if cpu_routes.bucket(m) >= 16 else "kernel"), (m, r)
        x = torch.randn(m, 300, generator=rng)
        b = torch.randn(40, generator=rng)
        assert rel_err(si.linear(x, w, b, backend="cpu", act="fp32"), reference_linear(x, w, b)) <= TOL_F32, (m, r)


def test_scalar_kernels_give_large_batches_to_the_dense_fallback(rng, monkeypatch):
    """The shipped scalar rule: scalar kernels lose to dequantize + GEMM from 64 rows."""
    monkeypatch.setenv("SPARSEINFER_MEASURE", "0")
    cpu_routes.reset()
    monkeypatch.setattr(cpu_routes, "_tables", {})  # the shipped file
    w = _weight("int8", {}, 8, 64, rng)
    scalar = {r["name"] for r in C.kernel_table("scalar")}
    r64, r1 = cpu_routes.decide(w, BACKENDS["cpu"].prepack(w), 64, "fp32"), BACKENDS["cpu"].route(w, 1, "fp32")
    assert r1.path == "kernel"
    if C.kernel_name(BACKENDS["cpu"].prepack(w), 64, None, "fp32") in scalar:
        assert r64.path == "dense" and "built-in scalar table" in r64.why


def test_stored_rules_make_the_machine_known(rng, monkeypatch):
    fake = FakeTimer(kernel=1.0, dense=0.5)
    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    cpu_tuning.save({"machine": cpu_tuning.machine_key(), "limits": {},
                     "rules": {"dense_from": {"int4/fp32": 4}, "csr_crossover": {}}, "when": "calibrated"})
    cpu_routes.reset()
    assert cpu_routes.known_machine()
    w = _weight("int4", {"group_size": 32}, 16, 64, rng)
    r = BACKENDS["cpu"].route(w, 8, "fp32")
    assert r.path == "dense" and "calibrated here calibrated" in r.why and not fake.calls


def test_malformed_routes_are_ignored_with_a_warning(rng):
    path = cpu_tuning.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({cpu_tuning.machine_key(): {"routes": {"x": {"times": {"kernel": "fast"}}}}}))
    with pytest.warns(RuntimeWarning, match="'routes' is not a map"):
        r = BACKENDS["cpu"].route(_weight("int8", {}, 16, 64, rng), 1, "fp32")
    assert r.path in ("kernel", "dense")  # measured anew (this machine is unknown), not broken


def test_calibrate_rules_from_injected_times(monkeypatch):
    """dense_from is the smallest batch from which dense wins at every larger one; the CSR
    crossover is the affine fit of two densities against the best dense path."""

    def fake(w, m, act, paths):
        if isinstance(w, si.CSRWeight):
            d = 0.05 if w.density < 0.15 else 0.3
            t = {"kernel": 1.0 + 10.0 * d, "dense_int8": 3.0, "dense": 4.0}  # crossover 0.2
        else:
            t = {"kernel": 1.0, "dense": 0.5 if m in (16, 256, 1024) else 2.0}
        return {"times": {p: t[p] for p in paths}, "m": m, "rows": w.shape[0], "n": w.shape[0], "when": "t"}

    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    monkeypatch.setattr(cpu_tuning, "_FAMILY_FORMATS", {"int8": ("int8", {}), "csr_int8": ("csr+int8", {})})
    rules = cpu_routes.calibrate_rules(64, 128, batches=(1, 16, 64, 256, 1024))
    assert rules["dense_from"]["int8/fp32"] == 256
    assert rules["csr_crossover"]["csr_int8/fp32"] == {str(m): pytest.approx(0.2) for m in (1, 16, 64, 256, 1024)}
    assert len(rules["routes"]) >= 5


def test_calibrate_rules_times_an_extrapolated_csr_crossing(monkeypatch):
    """A crossing past the measured densities is timed where it lands and fitted again there: a CSR
    time that bends upward above 0.3 (true crossing 7/22) put the line's estimate at 0.5."""
    timed = []

    def fake(w, m, act, paths):
        d = w.density
        timed.append(round(d, 1))
        t = {"kernel": 1.0 + 2.0 * d + 20.0 * max(0.0, d - 0.3), "dense": 2.0}
        return {"times": {p: t[p] for p in paths}, "m": m, "rows": w.shape[0], "n": w.shape[0], "when": "t"}

    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    monkeypatch.setattr(cpu_tuning, "_FAMILY_FORMATS", {"csr_float": ("csr", {})})
    rules = cpu_routes.calibrate_rules(64, 128, batches=(1, 16))
    assert rules["csr_crossover"]["csr_float/fp32"] == {"1": pytest.approx(7 / 22, abs=0.01),
                                                       "16": pytest.approx(7 / 22, abs=0.01)}
    assert timed.count(0.5) == 2  # once per batch, and nowhere else: the bracket closes there
    assert len(timed) == 6


def test_calibrate_rules_stops_refining_near_a_measured_density(monkeypatch):
    """A crossing estimated next to a measured density is kept: a slope between two nearly equal
    densities is the noise's (in AVX2 mode a 0.44 / 0.439 pair sent a 256-row point to 1.0)."""
    timed = []

    def fake(w, m, act, paths):
        d = w.density
        timed.append(d)
        ratio = 0.99 if 0.4 <= d <= 0.5 else d / 0.45  # a plateau just under dense: noise near the crossing
        t = {"kernel": ratio, "dense": 1.0}
        return {"times": {p: t[p] for p in paths}, "m": m, "rows": w.shape[0], "n": w.shape[0], "when": "t"}

    monkeypatch.setattr(cpu_routes, "measure_point", fake)
    monkeypatch.setattr(cpu_tuning, "_FAMILY_FORMATS", {"csr_float": ("csr", {})})
    rules = cpu_routes.calibrate_rules(64, 128, batches=(16,))
    assert len(timed) == 3, timed  # 0.05, 0.3 and one more near 0.45
    assert 0.44 <= rules["csr_crossover"]["csr_float/fp32"]["16"] <= 0.5


def test_crossing_interpolates_between_the_nearest_densities():
    assert cpu_routes.crossing({0.05: 0.5, 0.3: 1.5}) == pytest.approx(0.175)
    assert cpu_routes.crossing({0.05: 2.0, 0.3: 4.0}) == 0.0  # dense beats even the sparsest
    assert cpu_routes.crossing({0.05: 0.1, 0.3: 0.11}) == 1.0  # CSR wins at every density
    assert cpu_routes.crossing({0.05: 0.3, 0.3: 0.6, 0.5: 2.0}) == pytest.approx(0.3 + 0.4 / 1.4 * 0.2)


def test_explain_says_path_act_and_why(rng, monkeypatch):
    monkeypatch.setattr(cpu_routes, "measure_point", FakeTimer(kernel=1.0, dense=0.25))
    model = si.compress(torch.nn.Sequential(torch.nn.Linear(128, 32)), "int8", progress=False)
    si.set_act(model, "fp32")
    row = si.explain(model, batch=300)[0]
    assert row["path"] == "dense" and row["act"] == "fp32" and "dense 250 ms" in row["why"]
    assert row["kernel"] == f"cpu:{cpu_routes.DENSE_KERNEL}"
    text = str(si.explain(model, batch=300))
    assert "path" in text and "why" in text and "dense fallback" in text


# -- cheap calls -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csr", "csr+int8", "int8"])
def test_a_call_reads_no_file(fmt, rng, monkeypatch):
    """After the first call, a call opens nothing (no /proc/cpuinfo, no cache, no table): the
    decision is memoised on the weight (an audit hook sees every Python-level open)."""
    monkeypatch.setattr(cpu_routes, "measure_point", FakeTimer(kernel=1.0, dense=2.0, dense_int8=2.0))
    w = _weight(fmt, {}, 64, 256, rng, density=0.5)
    x = torch.randn(2, 256, generator=rng)
    si.linear(x, w)  # first call: decides (may read the cache and the tables)
    opened = []
    state = {"on": True}

    def hook(event, args):
        if state["on"] and event in ("open", "os.open"):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: this one switches itself off below
    try:
        for _ in range(20):
            si.linear(x, w)
    finally:
        state["on"] = False
    assert opened == []
    assert cpu_tuning.cpu_model.cache_info().misses <= 1  # /proc/cpuinfo read at most once per process


def test_measure_point_times_every_candidate_on_rotating_copies(rng, monkeypatch):
    """The real measurement (not injected): every candidate path gets a time, at the call's batch,
    each call on weight copies of its own (ROTATE_BYTES of them, here forced to 6 copies)."""
    monkeypatch.setattr(cpu_routes, "ROUNDS", 2)
    for fmt in ("2:4", "csr+int8"):
        w = _weight(fmt, {}, 40, 96, rng)
        monkeypatch.setattr(cpu_routes, "ROTATE_BYTES", 6 * w.nbytes)
        h = BACKENDS["cpu"].prepack(w)
        paths = cpu_routes.candidates(w, h, 5, "fp32")
        rec = cpu_routes.measure_point(w, 5, "fp32", paths)
        assert set(rec["times"]) == set(paths) and rec["m"] == 5 and rec["copies"] == 6, rec
        assert rec["kernel"] == C.kernel_name(h, 5, None, "fp32")


def test_direct_call_runs_the_kernel_the_route_names(monkeypatch):
    """The decode fast path (CpuBackend.direct_call) must run the kernel a measured route chose by
    name, not the table's pick."""
    C = _native.require_native()
    cpu = BACKENDS["cpu"]
    g = torch.Generator().manual_seed(7)
    w = si.pack(torch.randn(48, 96, generator=g), "2:4")
    x = torch.randn(33, 96, generator=g)
    name = C.kernel_candidates(cpu_routes.native_weight(w), 33, None, "fp32")[-1]
    monkeypatch.setattr(cpu_routes, "route", lambda *a: cpu_routes.Route("kernel", name, "fp32", "test", named=name))
    seen = []

    class Spy:
        def __getattr__(self, attr):
            return getattr(C, attr)

        def linear(self, *args):
            seen.append(args[-1])
            return C.linear(*args)

    monkeypatch.setattr(_native, "_C", Spy())
    call = cpu.direct_call(w, x, "fp32")
    y = call(x, None)
    assert seen == [name]
    assert torch.allclose(y, reference_linear(x, w, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_direct_call_output_has_x_dtype_whatever_torch_default(x_dtype, monkeypatch):
    """The direct call allocates its output with torch's defaults when they fit (cheaper than keyword
    arguments): with float64 as torch's default dtype it must still return x's dtype, and the same
    values as under the float32 default."""
    C = _native.require_native()
    cpu = BACKENDS["cpu"]
    g = torch.Generator().manual_seed(11)
    w = si.pack(torch.randn(40, 128, generator=g), "int4", group_size=64)
    x = torch.randn(3, 128, generator=g).to(x_dtype)
    name = C.kernel_candidates(cpu_routes.native_weight(w), 3, None, "fp32")[0]
    monkeypatch.setattr(cpu_routes, "route", lambda *a: cpu_routes.Route("kernel", name, "fp32", "test", named=name))
    want = cpu.direct_call(w, x, "fp32")(x, None)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = cpu.direct_call(w, x, "fp32")(x, None)
    finally:
        torch.set_default_dtype(before)
    assert got.dtype == x_dtype and got.shape == (3, 40)
    assert torch.equal(got, want)


@pytest.mark.parametrize("raw, expected", [("2", 2.0), ("0", 0.0), ("30.5", 30.5), ("inf", math.inf)])
def test_measuring_budget_comes_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("SPARSEINFER_MEASURE_BUDGET_S", raw)
    assert cpu_routes._budget_from_env() == expected


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", ""])
def test_a_bad_measuring_budget_is_named(monkeypatch, raw):
    monkeypatch.setenv("SPARSEINFER_MEASURE_BUDGET_S", raw)
    with pytest.raises(ValueError, match="SPARSEINFER_MEASURE_BUDGET_S"):
        cpu_routes._budget_from_env()


def test_the_dense_path_is_timed_on_the_threads_it_runs_on(rng, monkeypatch):
    """Under llm.decode_threads torch has one thread while dense-routed calls run torch's GEMM on
    sparseinfer's count (torch_threads): first-use measuring times the dense path on that count too."""
    seen = []

    def fake_timing(runs, rounds, budget):
        seen.append(torch.get_num_threads())
        return {p: 1.0 for p in runs}

    monkeypatch.setattr(cpu_routes, "time_interleaved", fake_timing)
    torch_before = torch.get_num_threads()
    si.set_threads(2)
    torch.set_num_threads(1)
    try:
        cpu_routes.measure_point(_weight("2:4", {}, 32, 64, rng), 4, "fp32", ["kernel", "dense"])
    finally:
        torch.set_num_threads(torch_before)
        si.set_threads(None)
    assert seen == [2]
    assert torch.get_num_threads() == torch_before


def test_a_record_that_may_have_timed_dense_on_one_thread_is_measured_again(rng, monkeypatch):
    """Records stored before the dense path was timed on sparseinfer's threads (no "dense_threads")
    are not settled, however clear their winner: the next process measures again and merges."""
    twice = {"times": {"kernel": 1.0, "dense": 3.0}, "m": 8, "rounds": 2}
    assert not cpu_routes.settled(twice)
    assert cpu_routes.settled({**twice, "dense_threads": 2})
    assert cpu_routes.settled({"times": {"kernel": 1.0, "dense_int8": 3.0}, "m": 8, "rounds": 2})  # no dense time
    assert not cpu_routes.settled({"times": {"kernel": 1.0, "dense_int8": 3.0}, "m": 8})  # one measurement


def test_a_tie_goes_to_dense_where_it_runs_from_a_copy():
    """Within MARGIN the table's kernel keeps a call (noise must not flip it) unless ``dense_first``
    (the dense path runs from an fp32 copy, the very values): then a kernel must beat dense by MARGIN."""
    tie = {"kernel": 1.00, "kernel:other": 1.01, "dense": 0.98}
    assert cpu_routes.choose(tie) == "kernel"
    assert cpu_routes.choose(tie, dense_first=True) == "dense"
    assert cpu_routes.choose({"kernel": 1.0, "dense": 1.03}, dense_first=True) == "dense"
    assert cpu_routes.choose({"kernel": 0.9, "dense": 1.0}, dense_first=True) == "kernel"
    assert cpu_routes.choose({"kernel": 1.0, "kernel:other": 0.9, "dense": 1.0}, dense_first=True) == "kernel:other"


@pytest.mark.parametrize("fmt", ["2:4", "csr", "int8", "int4", "2:4+int8"])
@pytest.mark.parametrize("budget_mb, want", [(None, "dense"), ("0", "kernel")], ids=["copy", "no-copy"])
def test_ties_go_to_dense_when_it_runs_from_a_copy(fmt, budget_mb, want, rng, monkeypatch):
    """Every format: a kernel 2 % slower than dense loses the call when dense would run from an fp32
    copy (here within the budget), and keeps it when dense would dequantize tiles per call (no budget),
    which loses to dense itself."""
    if budget_mb is not None:
        monkeypatch.setenv("SPARSEINFER_DENSE_COPY_MB", budget_mb)
    monkeypatch.setattr(cpu_routes, "SMALL_BYTES", 0)
    monkeypatch.setattr(cpu_routes, "measure_point", FakeTimer(kernel=1.02, dense=1.0))
    w = _weight(fmt, {}, 48, 256, rng)
    r = BACKENDS["cpu"].route(w, 33, "fp32")
    assert r.path == want, (fmt, r.why)
    assert ("kept within SPARSEINFER_DENSE_COPY_MB" in r.why) == (want == "dense"), r.why


def test_csr_int8_on_the_dense_int8_route_has_a_direct_call(rng, monkeypatch):
    """A csr+int8 layer routed to the int8 kernels on its dense form runs them through the layer's
    memoised direct call (the generic path's lookups cost ~8 us a call: 0.6x nn.Linear on a 384^2
    layer at one row), with the same bits as that path, and sees the weight written in place."""
    monkeypatch.setattr(cpu_routes, "measure_point", FakeTimer(kernel=2.0, dense=3.0, dense_int8=1.0))
    w = _weight("csr+int8", {}, 48, 128, rng)
    layer = si.CompressedLinear(w, backend="cpu", act="int8")
    x = torch.randn(1, 128, generator=rng)
    with torch.no_grad():
        assert BACKENDS["cpu"].route(w, 1, "int8").path == "dense_int8"
        call = layer.plan(x)
        assert call is not None
        want = si.linear(x, w, None, backend="cpu", act="int8")
        assert torch.equal(call(x, None), want)
        w.values.copy_(w.values.flip(0))  # written in place: the dense int8 form is made again
        fresh = si.linear(x, copy.deepcopy(w), None, backend="cpu", act="int8")
        assert not torch.equal(fresh, want) and torch.equal(layer(x), fresh)


def test_a_thread_count_set_back_and_forth_finds_its_plans_again(rng, monkeypatch):
    """llm.decode_threads sets the count on entry and back on exit: the layer's next call after each
    looks its plan up again (the last plan is dropped) but builds no new direct call for a count it
    has planned before, and setting the count it already has drops nothing."""
    from sparseinfer.backends import cpu_native

    monkeypatch.setattr(cpu_routes, "SMALL_BYTES", 0)
    monkeypatch.setattr(cpu_routes, "measure_point", FakeTimer(kernel=1.0, dense=2.0))
    monkeypatch.setattr(cpu_native, "_threads", cpu_native._threads)  # restored after the test
    built, planned = [], []
    real_direct, real_plan = BACKENDS["cpu"].direct_call, si.CompressedLinear.plan
    monkeypatch.setattr(BACKENDS["cpu"], "direct_call", lambda *a, **kw: built.append(1) or real_direct(*a, **kw))
    monkeypatch.setattr(si.CompressedLinear, "plan", lambda self, x: planned.append(1) or real_plan(self, x))
    w = _weight("int8", {}, 40, 96, rng)
    layer, x = si.CompressedLinear(w, backend="cpu", act="int8"), torch.randn(3, 96, generator=rng)
    want = si.linear(x, w, backend="cpu", act="int8")
    with torch.no_grad():
        other = torch.get_num_threads() + 1  # a count other than the one None follows
        for n in (None, other, None, other, None):
            si.set_threads(n)
            si.set_threads(n)  # the count it has: nothing dropped
            assert torch.equal(layer(x), want) and torch.equal(layer(x), want)
    assert len(planned) == 5 and len(built) == 2  # one look-up per change; one direct call per count


def test_a_layer_plans_again_whenever_its_kind_of_call_changes(rng, monkeypatch):
    """CompressedLinear.run reuses its last call's plan only for a call of the same kind: another
    shape, act, backend, thread count (configured or torch's), a routes reset or a gradient-recording
    call is planned (and served) as its own, and calls of a kind seen before return to their plan;
    every output is that kind's."""
    from sparseinfer.backends import cpu_native

    monkeypatch.setattr(cpu_routes, "SMALL_BYTES", 0)
    monkeypatch.setattr(cpu_routes, "measure_point", FakeTimer(kernel=1.0, dense=2.0))  # the kernels' routes
    planned = []
    real_plan = si.CompressedLinear.plan
    monkeypatch.setattr(si.CompressedLinear, "plan", lambda self, x: planned.append(tuple(x.shape)) or real_plan(self, x))
    w = _weight("int8", {}, 40, 96, rng)
    bias = torch.randn(40, generator=rng)
    layer = si.CompressedLinear(w, bias, backend="cpu", act="int8")
    a, b = torch.randn(3, 96, generator=rng), torch.randn(2, 5, 96, generator=rng)

    def expect(x, **kw):
        return si.linear(x, w, bias, **{"backend": "cpu", "act": "int8", **kw})

    with torch.no_grad():
        assert torch.equal(layer(a), expect(a)) and torch.equal(layer(a), expect(a))
        assert planned == [(3, 96)]  # the second call took the last plan
        assert torch.equal(layer(b), expect(b)) and torch.equal(layer(a), expect(a))
        assert planned == [(3, 96), (2, 5, 96), (3, 96)]
        layer.act = "fp32"
        assert torch.equal(layer(a), expect(a, act="fp32")) and not torch.equal(expect(a), expect(a, act="fp32"))
        layer.act = "int8"
        assert torch.equal(layer(a), expect(a))
        layer.backend = "reference"  # exact whatever act says
        assert torch.equal(layer(a), expect(a, backend="reference")) and not torch.equal(layer(a), expect(a))
        layer.backend = "cpu"
        assert torch.equal(layer(a), expect(a)) and len(planned) == 7
        # what the process changes under the plan: the configured thread count, torch's (followed
        # when none is configured), the routes (calibration)
        monkeypatch.setattr(cpu_native, "_threads", cpu_native._threads)  # restored after the test
        si.set_threads(1)
        assert torch.equal(layer(a), expect(a)) and len(planned) == 8
        si.set_threads(None)
        assert torch.equal(layer(a), expect(a)) and len(planned) == 9
        torch_count = torch.get_num_threads()
        try:
            torch.set_num_threads(torch_count + 1)
            assert torch.equal(layer(a), expect(a)) and len(planned) == 10
        finally:
            torch.set_num_threads(torch_count)
        assert torch.equal(layer(a), expect(a)) and len(planned) == 11
        cpu_routes.reset()
        assert torch.equal(layer(a), expect(a)) and torch.equal(layer(a), expect(a)) and len(planned) == 12
    layer.backend = None  # the kernels record no history: a gradient-recording call takes the reference
    grad = a.clone().requires_grad_()
    out = layer(grad)
    assert out.requires_grad and torch.equal(out.detach(), expect(a, backend="reference"))
    assert len(planned) == 13 and layer(grad).requires_grad
    assert len(planned) == 14  # a gradient-recording call is never taken from the last plan
