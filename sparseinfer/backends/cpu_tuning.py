"""Measured dispatch for the CPU backend: which kernel runs at which batch size, on this machine.

Each ISA's kernel table (csrc/dispatch.cpp) lists, per format family, kernels in the order they are
tried, each with a batch limit ``max_m``: a GEMV that streams the weight once per batch row wins
at small batches, a GEMM that reuses each weight block across rows wins above. The limits built
into the tables were measured on the development machine; ``calibrate()`` measures them on this
one, by timing every kernel of a family forced in turn over a grid of batch sizes:

    limit(row) = the largest batch of the grid below the first one where a later row of the
                 family is faster by more than ``MARGIN`` (rows are tried in table order)

``sparseinfer calibrate`` runs it (with the route measurements of cpu_routes.py: packed kernel
against the dense fallback, CSR against dense) and stores the result in the user's cache
(``$SPARSEINFER_CACHE_DIR`` or ``~/.cache/sparseinfer``) under this machine's key (CPU model and
family, ISA, threads); the first use of a layer shape on a machine no shipped table was measured on
adds its route measurements to the same entry. The cpu backend applies a stored entry when it
starts. ``si.backends()`` says which limits are in force.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from .. import _native
from .._version import __version__
from ..formats import from_parts, pack
from .cpu_native import build_native_weight
from .cpu_native import threads as cpu_threads

GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
MARGIN = 0.03  # a later row must win by this much: timing noise must not flip a limit
CACHE_FILE = "cpu_tuning.json"
_FAMILY_FORMATS = {  # kernel family -> (pack format, parameters) of the weight it is timed on
    "int8": ("int8", {}),
    "int4": ("int4", {"group_size": 128}),
    "nm_float": ("2:4", {}),
    "nm_int8": ("2:4+int8", {}),
    "nm_int4": ("2:4+int4", {"group_size": 64}),
    "csr_float": ("csr", {}),
    "csr_int8": ("csr+int8", {}),
}
_applied: dict | None = None  # the stored entry in force in this process, if any


# -- the machine -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name and family ("AMD EPYC (family 25)"; /proc/cpuinfo on Linux, read once
    per process: dispatch asks for it, and a file read per call cost 85 us), else platform.processor()."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} (family {fields['cpu family']})" if "cpu family" in fields else name


def machine_key(threads: int | None = None) -> str:
    """What a measurement is valid for: CPU model and family, active ISA, threads."""
    C = _native.require_native()
    return f"{cpu_model()}|{C.active_isa()}|{threads or cpu_threads()}"


# -- measuring batch limits ------------------------------------------------------------------------

def cache_path() -> Path:
    root = os.environ.get("SPARSEINFER_CACHE_DIR") or Path.home() / ".cache" / "sparseinfer"
    return Path(root) / CACHE_FILE


def _weight(family: str, n: int, k: int, g: torch.Generator):
    fmt, params = _FAMILY_FORMATS[family]
    w = torch.randn(n, k, generator=g)
    if fmt.startswith("csr"):
        w = w * (torch.rand(n, k, generator=g) < 0.1)  # 90 % sparse: where CSR is used
    return pack(w, fmt, **params)


def chains(isa: str | None = None) -> dict[tuple[str, str], list[dict]]:
    """{(family, act): the rows a call of that family and activation mode tries, in order} for
    the active ISA (its table, then its fallbacks'). Rows needing int8 activations appear only in
    the "int8" chains; a chain ends at its first row without a batch limit. Measured-only rows are
    not in any chain: the table never picks them (cpu_routes.py times them per layer shape)."""
    C = _native.require_native()
    rows = [r for r in C.kernel_table(isa) if not r.get("measured_only")]
    out = {}
    for family in {r["family"] for r in rows}:
        for act in ("fp32", "int8"):
            chain = []
            for r in rows:
                if r["family"] != family or (r["int8_act"] and act == "fp32"):
                    continue
                chain.append(r)
                if r["max_m"] >= 2**40:
                    break
            out[(family, act)] = chain
    return out


def _time_rows(chain, ws, act, batches, threads, reps):
    """{row name: {batch: best seconds per call}}, each row forced by disabling the rows before it
    and lifting its own limit (the limits in force are restored at the end). Each pass calls every weight of ``ws`` once
    (copies of one weight, together larger than the cache: a model's layers come from memory)."""
    C = _native.require_native()
    hs = [build_native_weight(w) for w in ws]
    h = hs[0]
    n, k = ws[0].shape
    g = torch.Generator().manual_seed(1)
    xs = {m: torch.randn(m, k, generator=g) for m in batches}
    outs = {m: torch.empty(m, n) for m in batches}
    saved = {r["name"]: r["max_m"] for r in chain}
    times = {}
    try:
        for i, row in enumerate(chain):
            for r in chain[:i]:
                C.set_batch_limit(r["name"], 0)
            C.set_batch_limit(row["name"], 2**62)
            times[row["name"]] = {}
            for m in batches:
                assert C.kernel_name(h, m, None, act) == row["name"], (row["name"], m)
                x, out = xs[m], outs[m]
                best = math.inf
                for rep in range(reps + 1):  # pass 0 warms up (int8-activation tiles, scratch)
                    t0 = time.perf_counter()
                    for hc in hs:
                        C.linear(x, hc, out, None, threads, None, act)
                    if rep:
                        best = min(best, (time.perf_counter() - t0) / len(hs))
                times[row["name"]][m] = best
    finally:
        for name, limit in saved.items():
            C.set_batch_limit(name, limit)
    return times


def fit_limits(chain: list[dict], times: dict) -> dict[str, int]:
    """Each limited row's batch limit from the timings (see the module docstring)."""
    limits = {}
    for i, row in enumerate(chain[:-1]):
        mine = times[row["name"]]
        limit = 0
        for m in sorted(mine):
            rival = min(times[r["name"]][m] for r in chain[i + 1:])
            if rival < mine[m] * (1 - MARGIN):
                break
            limit = m
        limits[row["name"]] = limit
    return limits


def calibrate(n: int = 1024, k: int = 1024, threads: int | None = None, reps: int = 3, batches=GRID,
              rotate_bytes: int = 32 << 20, progress=None) -> dict:
    """Measure every family's batch limits on this machine. Returns the entry ``save`` stores:
    {"limits": {kernel: max_m}, "shipped": {kernel: built-in max_m}, "times": ..., ...}.
    Each timed pass rotates through copies of the weight totalling ``rotate_bytes`` (at most 64)."""
    threads = threads or cpu_threads()
    g = torch.Generator().manual_seed(0)
    entry = {"machine": machine_key(threads), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "version": __version__,
             "source": f"sparseinfer.backends.cpu_tuning.calibrate(n={n}, k={k}, threads={threads})",
             "limits": {}, "shipped": {}, "times": {}}
    for (family, act), chain in sorted(chains().items()):
        if len(chain) < 2 or family not in _FAMILY_FORMATS:
            continue
        if act == "int8" and not any(r["int8_act"] for r in chain):
            continue  # the same rows as the exact chain
        if progress:
            progress(f"{family} ({act} activations): {' -> '.join(r['name'] for r in chain)}")
        w = _weight(family, n, k, g)
        copies = min(64, max(1, -(-rotate_bytes // w.nbytes)))
        ws = [w] + [from_parts(w.fmt, {name: t.clone() for name, t in w.tensors().items()}, w.shape, w.params())
                    for _ in range(copies - 1)]
        times = _time_rows(chain, ws, act, batches, threads, reps)
        for name, limit in fit_limits(chain, times).items():
            # a row in several chains (an exact gemv also serves int8 calls) keeps its exact-chain limit
            if name not in entry["limits"] or act == "fp32":
                entry["limits"][name] = limit
        entry["shipped"].update({r["name"]: r["builtin_max_m"] for r in chain[:-1]})
        entry["times"][f"{family}/{act}"] = {name: {str(m): t for m, t in ts.items()} for name, ts in times.items()}
    return entry


# -- storing and applying ----------------------------------------------------------------------------
# One file, one entry per machine key: {"limits": {kernel: max_m}, "routes": {route key: {"times":
# {path: seconds}, ...}}, ...}. `sparseinfer calibrate` writes limits (and routes); the first use of a
# layer shape on an unmeasured machine adds routes (cpu_routes.py). Writes are atomic (rename).

def load_store() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(entry: dict | None = None, routes: dict | None = None, key: str | None = None) -> Path:
    """Store a calibration ``entry`` (its limits replace the stored ones) and ``routes`` (merged
    into the stored ones) under the machine key (``entry["machine"]``, else ``key``, else this
    machine's); atomic. Another process's concurrent save may be lost: both re-measure next time."""
    path = cache_path()
    data = load_store()
    key = entry["machine"] if entry else key or machine_key()
    old = data.get(key) if isinstance(data.get(key), dict) and not _malformed(data.get(key)) else {}
    merged = {**old, **(entry or {})}
    merged["routes"] = {**old.get("routes", {}), **(entry or {}).get("routes", {}), **(routes or {})}
    data[key] = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _malformed(entry) -> str | None:
    """What is wrong with a stored entry (a hand-edited or truncated cache), or None."""
    if not isinstance(entry, dict):
        return "not an object"
    limits = entry.get("limits", {})
    if not isinstance(limits, dict) or not all(_is_count(v) for v in limits.values()):
        return "'limits' is not a map of kernel names to batch sizes >= 0"
    routes = entry.get("routes", {})
    if not isinstance(routes, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("times"), dict) and r["times"]
            and all(isinstance(p, str) and _is_seconds(t) for p, t in r["times"].items()) for r in routes.values()):
        return "'routes' is not a map of route keys to {'times': {path: seconds > 0}}"
    rules = entry.get("rules", {})
    if not isinstance(rules, dict) or not isinstance(rules.get("dense_from", {}), dict) or not all(
            _is_count(v) for v in rules.get("dense_from", {}).values()) or not isinstance(
            rules.get("csr_crossover", {}), dict) or not all(
            isinstance(pts, dict) and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in pts.values())
            for pts in rules.get("csr_crossover", {}).values()):
        return "'rules' is not {'dense_from': {family/act: batch}, 'csr_crossover': {family/act: {batch: density}}}"
    return None


def stored(threads: int | None = None) -> dict | None:
    """This machine's stored entry, or None (none stored, or SPARSEINFER_TUNING=0). A malformed
    entry is ignored with a warning (the built-in choices run) rather than breaking the backend."""
    if os.environ.get("SPARSEINFER_TUNING", "1") == "0":
        return None
    key = machine_key(threads)
    entry = load_store().get(key)
    if entry is None:
        return None
    problem = _malformed(entry)
    if problem:
        warnings.warn(f"sparseinfer: ignoring the calibration stored for {key!r} in {cache_path()}: {problem}; "
                      f"run `sparseinfer calibrate` again", RuntimeWarning, stacklevel=2)
        return None
    return entry


def apply(entry: dict | None = None) -> dict | None:
    """Put a calibration entry's limits in force (the stored one for this machine by default).
    Unknown kernel names (an entry from another build) are skipped. Returns the entry applied."""
    global _applied
    C = _native.require_native()
    entry = stored() if entry is None else entry
    if not entry:
        return None
    known = {r["name"] for r in C.kernel_table(None)}
    for name, limit in entry.get("limits", {}).items():
        if name in known:
            C.set_batch_limit(name, limit)
    _applied = entry if entry.get("limits") else None
    return entry


def describe() -> str:
    """Which batch limits are in force, for ``si.backends()``."""
    if _applied:
        return f"batch limits measured here {_applied.get('when', '?')} (sparseinfer calibrate)"
    return "built-in batch limits (run `sparseinfer calibrate` to measure this machine's)"
