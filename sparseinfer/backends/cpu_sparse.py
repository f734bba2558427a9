"""CSR or dense on the CPU backend: which kernel a CSR weight runs, decided by measurement.

A CSR kernel costs time in proportion to the stored entries (a 4-byte column index and a value
each, and a gathered x); a dense kernel in proportion to N x K. Which one is faster depends on the
density, the batch, the value kind, the activation mode and the machine, so it is measured:

    crossover(kind, act, batch) = d*:  CSR kernels below density d*, the dense kernel above

``kind`` is "int8" (csr+int8) or "float" (csr with f32 / bf16 / f16 values), ``act`` the activation
mode of the call ("fp32" exact / "int8", csrc/README.md). Where d* comes from, first hit wins:

1. the user's cache, written by ``sparseinfer calibrate`` on this machine (cpu_tuning.py);
2. ``csr_crossover.json`` next to this file: tables measured by ``bench/cpu_sparse_roofline.py
   --calibrate`` on named machines (CPU model, ISA, threads), stored with the timings they were
   fitted to and the command that produced them;
3. else ``calibrate()`` runs once per process on this machine (about a second, smaller weights than
   the script's), unless ``SPARSEINFER_CSR_CALIBRATE=0``: then CSR weights always run CSR kernels.

The dense alternatives compute the same product: csr+int8 -> the int8 kernels on the same codes and
per-row scales (an Int8Weight with one group per row, i.e. exactly the CSR's dequantized weight);
float CSR -> ``torch.nn.functional.linear`` in fp32 on ``to_dense()``. They are built on first use,
only for weights whose density crosses over at some batch (``PackedWeight.prepacked``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from pathlib import Path

import torch

from .. import _native
from ..formats import CSRWeight, Int8Weight

TABLE_PATH = Path(__file__).with_name("csr_crossover.json")
# Batches the crossover is measured at; between them d* is interpolated in log2(batch).
BATCHES = (1, 4, 16, 64)
# Two densities per fit: CSR time is affine in the density (a fixed cost per row and per call, plus
# a cost per entry), so two points give the line and the crossover with the dense time.
DENSITIES = (0.05, 0.3)
_DENSE_KEY = "cpu:csr-dense"

_lock = threading.Lock()
_cache: dict[str, dict] = {}


# -- the machine -----------------------------------------------------------------------------------

def cpu_threads() -> int:
    """The CPU kernels' thread count (cpu.py imports this module, hence the late import)."""
    from .cpu import threads

    return threads()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int | None = None) -> str:
    """What a measured table is valid for: CPU model, active ISA, threads."""
    C = _native.require_native()
    threads = threads or cpu_threads()
    return f"{cpu_model()}|{C.active_isa()}|{threads}"


# -- measuring -------------------------------------------------------------------------------------

def _random_csr(n: int, k: int, density: float, kind: str, g: torch.Generator) -> CSRWeight:
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    return CSRWeight.from_dense(w, values="int8" if kind == "int8" else None,
                                fmt="csr+int8" if kind == "int8" else "csr")


def dense_int8(w: CSRWeight) -> Int8Weight:
    """The csr+int8 weight as a dense int8 weight with one scale per row: the same dequantized values."""
    n, k = w.shape
    rows = torch.repeat_interleave(torch.arange(n, device=w.crow.device), w.crow.diff())
    q = torch.zeros(n, k, dtype=torch.int8, device=w.crow.device)
    q[rows, w.col.long()] = w.values
    return Int8Weight(q, w.scale.reshape(n, 1).contiguous(), k, None)


def _time_interleaved(runs: dict, reps: int, budget: float) -> dict:
    """{name: (fn, items)} -> {name: fastest single call}: every round calls every item of every
    entry in turn, so that load from elsewhere hits all entries alike. Stops after the round in
    which ``budget`` seconds ran out (one round always runs; an entry slower than the budget by
    itself is dropped from later rounds)."""
    best = {name: math.inf for name in runs}
    for fn, items in runs.values():
        fn(items[0])  # warm-up (prepack, scratch growth)
    start = time.perf_counter()
    for r in range(reps):
        for name, (fn, items) in runs.items():
            if r and best[name] > budget:
                continue
            for it in items:
                t = time.perf_counter()
                fn(it)
                best[name] = min(best[name], time.perf_counter() - t)
        if time.perf_counter() - start > budget:
            break
    return best


def measure(kind: str, act: str, batches=BATCHES, n: int = 2048, k: int = 2048, copies: int = 2, reps: int = 5,
            seed: int = 0, budget: float = 0.25) -> dict:
    """Times the CSR kernel at DENSITIES and the dense alternative, per batch, on random n x k
    weights (``copies`` of each, called in turn, so that weights larger than the cache come from
    memory). Returns the timings and the fitted crossover densities."""
    from .cpu import build_native_weight

    C = _native.require_native()
    threads = cpu_threads()
    g = torch.Generator().manual_seed(seed)
    csr = {d: [_random_csr(n, k, d, kind, g) for _ in range(copies)] for d in DENSITIES}
    handles = {d: [build_native_weight(w) for w in ws] for d, ws in csr.items()}
    if kind == "int8":
        dense = [build_native_weight(dense_int8(w)) for w in csr[DENSITIES[0]]]
    else:
        dense = [w.to_dense(torch.float32) for w in csr[DENSITIES[0]]]
    rows = []
    for m in batches:
        x = torch.randn(m, k, generator=g)
        out = torch.empty(m, n)

        def run_c(h):
            C.linear(x, h, out, None, num_threads=threads, act=act)

        runs = {str(d): (run_c, handles[d]) for d in DENSITIES}
        runs["dense"] = (run_c, dense) if kind == "int8" else (lambda wd: torch.nn.functional.linear(x, wd), dense)
        best = _time_interleaved(runs, reps, budget)
        t_csr = {d: best[str(d)] for d in DENSITIES}
        t_dense = best["dense"]
        (d0, t0), (d1, t1) = sorted(t_csr.items())
        slope = max((t1 - t0) / (d1 - d0), 1e-12)
        crossover = min(1.0, max(0.0, d0 + (t_dense - t0) / slope))
        rows.append({"batch": m, "csr_s": {str(d): t for d, t in t_csr.items()}, "dense_s": t_dense,
                     "crossover": round(crossover, 4)})
    return {"kind": kind, "act": act, "n": n, "k": k, "copies": copies, "threads": threads, "rows": rows}


def calibrate(n: int = 1024, k: int = 1024, copies: int = 1) -> dict:
    """Measure every (kind, act) on this machine: {"int8/fp32": {batch: d*}, ...} plus the raw data.
    The defaults keep it well under a second: weights that fit the cache, three rounds, no call
    timed past 50 ms. bench/cpu_sparse_roofline.py --calibrate measures the shipped tables on
    4096 x 4096 weights streamed from memory instead."""
    acts = ["fp32", "int8"]
    table = {"machine": machine_key(), "source": f"sparseinfer.backends.cpu_sparse.calibrate(n={n}, k={k}), at run time",
             "when": time.strftime("%Y-%m-%d %H:%M:%S"), "crossover": {}, "measurements": []}
    for kind in ("int8", "float"):
        for act in (acts if kind == "int8" else ["fp32"]):
            res = measure(kind, act, n=n, k=k, copies=copies, reps=3, budget=0.05)
            table["measurements"].append(res)
            table["crossover"][f"{kind}/{act}"] = {str(r["batch"]): r["crossover"] for r in res["rows"]}
    return table


# -- the table -------------------------------------------------------------------------------------

def _load_tables() -> dict:
    try:
        return json.loads(TABLE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def table() -> dict | None:
    """This machine's crossover table: stored by ``sparseinfer calibrate`` (cpu_tuning.py), else
    measured and shipped, else calibrated now (once per process and thread count); None when
    SPARSEINFER_CSR_CALIBRATE=0 and no table fits."""
    from . import cpu_tuning

    key = machine_key()
    with _lock:
        if key in _cache:
            return _cache[key]
        found = (cpu_tuning.stored() or {}).get("csr_crossover") or _load_tables().get("tables", {}).get(key)
        if found is None and os.environ.get("SPARSEINFER_CSR_CALIBRATE", "1") != "0":
            found = calibrate()
        _cache[key] = found
        return found


def crossover(kind: str, act: str, batch: int) -> float | None:
    """Density above which the dense kernel beats the CSR one for this batch (None: no table)."""
    t = table()
    if not t:
        return None
    points = t["crossover"].get(f"{kind}/{act}") or t["crossover"].get(f"{kind}/fp32")
    if not points:
        return None
    pts = sorted((int(b), float(d)) for b, d in points.items())
    lb = math.log2(max(batch, 1))
    if lb <= math.log2(pts[0][0]):
        return pts[0][1]
    for (b0, d0), (b1, d1) in zip(pts, pts[1:]):
        l0, l1 = math.log2(b0), math.log2(b1)
        if lb <= l1:
            return d0 + (d1 - d0) * (lb - l0) / (l1 - l0)
    return pts[-1][1]


# -- the decision ----------------------------------------------------------------------------------

def plan(w: CSRWeight, batch: int, act: str | None = None) -> tuple[str, str]:
    """("csr" | "dense", why) for a call with ``batch`` rows in activation mode ``act`` (None: the default)."""
    C = _native.require_native()
    kind = "int8" if w.quantized else "float"
    act = act or C.default_act()
    d_star = crossover(kind, act, batch)
    if d_star is None:
        return "csr", "no crossover measured"
    dens = w.density
    why = f"density {dens:.3g} {'>' if dens > d_star else '<='} measured crossover {d_star:.3g} at batch {batch}"
    return ("dense" if dens > d_star else "csr"), why


def dense_kernel_name(w: CSRWeight, batch: int, act: str | None = None) -> str:
    """The kernel the dense path of ``w`` runs at ``batch`` (without building the dense weight)."""
    from .cpu import build_native_weight

    if not w.quantized:
        return "torch.nn.functional.linear fp32"
    C = _native.require_native()
    probe = Int8Weight(torch.zeros(1, 16, dtype=torch.int8), torch.ones(1, 1), 16, None)  # names depend on id / batch
    return C.kernel_name(build_native_weight(probe), batch, None, act)


def dense_alternative(w: CSRWeight):
    """The dense weight the dense path runs: a ``_C.Weight`` of dense int8 (csr+int8), or the fp32
    dense tensor (float CSR, for torch.nn.functional.linear). Built once per weight."""
    from .cpu import build_native_weight

    if w.quantized:
        return w.prepacked(_DENSE_KEY, lambda w: build_native_weight(dense_int8(w)))
    return w.prepacked(_DENSE_KEY, lambda w: w.to_dense(torch.float32).contiguous())
