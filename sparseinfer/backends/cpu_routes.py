"""Which path a CPU layer call takes, decided by measurement, so that a packed layer never runs
slower than dense:

    kernel      ``_C.linear`` on the packed weight: the kernel the table selects for (family, ISA,
                batch, act), or another of ``_C.kernel_candidates`` (a measured-only row, e.g. the
                AVX-512 panel GEMM of N:M, which wins on some shapes and loses on others) named in
                the call; measured as "kernel" (the table's pick) and "kernel:<name>" (the others)
    dense_int8  csr+int8 only: the ``_C`` int8 kernels on the CSR's codes as a dense int8 weight
                (one scale per row: the same dequantized values), in the call's activation mode
    dense       the dense fallback: torch's fp32 GEMM (MKL / oneDNN) on the weight dequantized by
                ``_C.dequantize``: from one fp32 copy kept with the weight when it is SMALL_BYTES or
                less, or (any format, any activation mode) when the route takes this path and the
                process-wide copy budget (``SPARSEINFER_DENSE_COPY_MB``, default a quarter of the RAM)
                has room; else tile by tile on every call (at most TILE_BYTES of fp32 at a time):
                exact either way

A decision holds for a route key: format and parameters, activation class ("fp32", or "int8" for
auto / int8, which select alike), N x K, the batch bucket (the power of two >= M), and for CSR
the density to two decimals. First hit wins:

1. measured times for the key in this machine's entry of the user cache (cpu_tuning.py):
   ``sparseinfer calibrate`` and earlier first uses put them there;
2. on a machine the built-in tables were not measured on (and unless ``SPARSEINFER_MEASURE=0``),
   the first call measures now: every candidate on this weight, at the call's own batch (a kernel
   that pads rows to a multiple of 8, e.g. nm_gemm_avx2, is slower at 33 rows than at 64, the top
   of the bucket), at most MEASURE_MAX_M rows of x, the weight's first rows only when one call
   would take more than CALL_CAP_S, each call on weights that come from memory (ROTATE_BYTES),
   interleaved round by round, best of up to ROUNDS, at most MEASURE_BUDGET_S per process
   (``SPARSEINFER_MEASURE_BUDGET_S``, default 2); stored in
   the user cache. A stored record is settled once SETTLED_ROUNDS measurements (in different
   processes) are merged, each path keeping its best time; until then it is used and measured
   once more by the next process that meets it (within its budget), so one noisy run does not
   decide for good, however clear its winner looked;
3. rules: this machine's (``sparseinfer calibrate``), else the built-in table of the active ISA
   (``cpu_routes.json``; a scalar kernel takes the scalar table's): per (family, act class) the
   batch from which the dense fallback wins, and for CSR the density above which dense wins, per
   batch (interpolated in log2 batch). Rules choose between the table's pick and dense only.

From measured times a tie (within MARGIN: timing noise must not flip a decision) goes to dense
when its path would run from an fp32 copy (``dense_runs_from_copy``): a kernel must beat it by
MARGIN, so a tie never costs speed; otherwise (the dense path would dequantize tiles per call) the
table's pick keeps the call unless another path is faster by MARGIN. Decisions are memoised per
weight and batch, so a call pays a dict lookup; nothing here reads files after the first decision
of a process.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import operator
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _native
from ..formats import CSRWeight, Int8Weight, PackedWeight, pack
from . import cpu_tuning, epoch
from .cpu_native import build_native_weight, native_weight

TABLE_PATH = Path(__file__).with_name("cpu_routes.json")
PATH_ORDER = ("kernel", "dense_int8", "dense")  # preference on ties: packed first ("kernel:<name>" after
                                                # "kernel"), except dense first where it runs from a copy
MARGIN = 0.05  # another path must be this much faster to take the call from the one ties go to
# Measurements (processes) merged before a record is settled. Also a clear winner: one measurement
# timed int8 384x384 at 33 rows at 92 us against 27-35 us in six other processes (dense 68 us), so
# a one-sentence int8 MiniLM ran its 25 such calls dense and at 1.42x instead of ~1.85x dense,
# for good while a winner by 25 % settled at once.
SETTLED_ROUNDS = 2
ROUNDS = 7  # interleaved rounds per measured point (fewer when POINT_BUDGET_S runs out)
POINT_BUDGET_S = 0.25
# First-use measuring per process, all points together (SPARSEINFER_MEASURE_BUDGET_S: a server that
# would rather measure every layer at start-up sets it higher; one process of a benchmark that builds
# many variants needs it, or the later variants get the rules).
def _budget_from_env() -> float:
    raw = os.environ.get("SPARSEINFER_MEASURE_BUDGET_S", "2")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"SPARSEINFER_MEASURE_BUDGET_S={raw!r}: expected a number of seconds >= 0 (inf for no limit)")
    return value


MEASURE_BUDGET_S = _budget_from_env()
# Sizing a measured call: past MEASURE_MAX_M rows both paths are compute-bound and their ratio
# holds, so a bucket above it is measured at MEASURE_MAX_M; a call still estimated above CALL_CAP_S
# (at ASSUMED_FLOPS, dense-equivalent 2*M*N*K) runs on the weight's first rows, never fewer than
# MIN_SLICE_ROWS: MKL's GEMM on a 64-row slice was 3x less efficient than on the whole weight, which
# made the dense fallback look slower than it is.
MEASURE_MAX_M = 512
# Each timed call reads its weight from beyond the caches, as a model's layers do (each call runs
# after the other layers' weights went through): calls rotate through copies of the weight, together
# at least ROTATE_BYTES (at most ROTATE_COPIES). Timed hot, on one L2-resident copy, nm_gemm_avx2
# beat dense on MiniLM's 384x384 2:4 at 33 rows and lost 0.68x in the model, where the panel GEMM
# (one pass over the weight per call) was 1.08x (bench/README.md).
ROTATE_BYTES = 32 << 20
ROTATE_COPIES = 32
CALL_CAP_S = 0.05
ASSUMED_FLOPS = 50e9
MIN_SLICE_ROWS = 1024
TILE_BYTES = 16 << 20  # fp32 rows the dense fallback dequantizes at a time (MKL wants wide tiles:
                       # 4096x4096 at M=256 took 16 x 16 ms in 256-row tiles, 4 x 24 ms in 1024-row ones)
SMALL_BYTES = 1 << 20  # a weight whose fp32 copy is at most this keeps one (made once)
# Float formats whose route is the dense fallback keep an fp32 copy, within a budget per process
# (SPARSEINFER_DENSE_COPY_MB; 0: never): dequantizing 1536x384 2:4 per call cost as much as a 16-row
# GEMM on it, so the tile path ran one-sentence MiniLM at ~0.9x dense (bench/README.md), and with a
# fixed 256 MiB a 2:4 / 50 %-sparse SmolLM2 (425 MB of fp32 layers) prefilled at 0.86x / 0.75x dense and
# decoded 50 %-sparse at 0.46x. Never slower than dense comes first: by default a quarter of the RAM
# (DENSE_COPY_MB where the RAM size is unknown); a memory-first deployment sets the variable lower.
DENSE_COPY_MB = 256
DENSE_COPY_RAM_FRACTION = 0.25
CSR_DENSITIES = (0.05, 0.3)  # calibrate: CSR time is affine in density, two points give the line
CSR_REFINE = 3  # ... and a crossing beyond them is timed where it lands, at most this many times,
CSR_RESOLUTION = 0.05  # unless it is this close to a measured density

_DENSE_COPY_KEY = "cpu:dense-copy"
_COPY_GRANT_KEY = "cpu:dense-copy-granted"
_DENSE_INT8_KEY = "cpu:csr-dense-int8"
_ROUTES_KEY = "cpu:routes"


@dataclass(frozen=True)
class Route:
    path: str  # "kernel" | "dense_int8" | "dense"
    kernel: str  # what runs: a _C kernel name, or the dense fallback
    act: str  # the activation precision it runs: "int8" or "fp32"
    why: str
    named: str | None = None  # a kernel the call must name (_C.linear(kernel=...)): not the table's pick


_lock = threading.RLock()
_generation = 0  # bumped by reset(): memoised routes made before are stale (another thread count is its own key)
_spent = 0.0  # seconds of first-use measuring in this process
_remeasured: set[str] = set()  # unsettled route keys measured again by this process
_copy_bytes = 0  # fp32 copies kept under the DENSE_COPY_MB budget, live
_stored: dict[str, dict] = {}  # machine key -> stored entry (read once per process and key)
_tables: dict[str, dict] = {}  # isa -> built-in table (cpu_routes.json, read once)


def measuring_seconds() -> float:
    """Seconds this process has spent measuring routes on first use (since the last reset())."""
    return _spent


def reset() -> None:
    """Forget memoised decisions and the stored entry read (after calibrate, or in tests)."""
    global _generation, _spent
    with _lock:
        _generation += 1
        epoch.bump()  # and the layers' plans made on them
        _spent = 0.0
        _stored.clear()
        _remeasured.clear()


# -- route keys ------------------------------------------------------------------------------------

def bucket(m: int) -> int:
    """The batch bucket of M rows: the power of two >= M (1, 2, 4, 8, ...)."""
    return 1 << max(0, int(m) - 1).bit_length()


def act_class(act: str) -> str:
    return "fp32" if act == "fp32" else "int8"


def route_key(w: PackedWeight, m: int, act: str) -> str:
    params = json.dumps(w.params(), sort_keys=True, separators=(",", ":"))
    n, k = w.shape
    key = f"{w.fmt}{params}{str(w.dense_dtype).replace('torch.', ':')}|{act_class(act)}|{n}x{k}|m{bucket(m)}"
    return key + (f"|d{w.density:.2f}" if isinstance(w, CSRWeight) else "")


def candidates(w: PackedWeight, handle=None, m: int = 1, act: str = "fp32") -> tuple[str, ...]:
    """The paths measured for a call: the table's pick ("kernel"), the other kernels the binding lists
    for ``m`` rows ("kernel:<name>"), then the dense paths."""
    alts = tuple(f"kernel:{k}" for k in _native.require_native().kernel_candidates(handle, m, None, act)[1:]) \
        if handle is not None else ()
    dense = ("dense_int8", "dense") if isinstance(w, CSRWeight) and w.quantized else ("dense",)
    return ("kernel", *alts, *dense)


# -- the paths -------------------------------------------------------------------------------------

def dense_int8(w: CSRWeight) -> Int8Weight:
    """The csr+int8 weight as a dense int8 weight with one scale per row: the same dequantized values."""
    n, k = w.shape
    rows = torch.repeat_interleave(torch.arange(n, device=w.crow.device), w.crow.diff())
    q = torch.zeros(n, k, dtype=torch.int8, device=w.crow.device)
    q[rows, w.col.long()] = w.values
    return Int8Weight(q, w.scale.reshape(n, 1).contiguous(), k, None)


def dense_int8_handle(w: CSRWeight):
    """The ``_C.Weight`` of ``dense_int8(w)``, built on first use and kept with ``w``."""
    return w.prepacked(_DENSE_INT8_KEY, lambda w: build_native_weight(dense_int8(w)))


def _dequantized(w: PackedWeight) -> torch.Tensor:
    n, k = w.shape
    dense = torch.empty(n, k)
    _native.require_native().dequantize(native_weight(w), 0, n, dense, cpu_tuning.cpu_threads())
    return dense


def _has_copy(w: PackedWeight) -> bool:
    """Whether ``w`` keeps an fp32 copy: it is SMALL_BYTES or less, or was granted a budgeted one."""
    n, k = w.shape
    return n * k * 4 <= SMALL_BYTES or w._prepacked.get(_COPY_GRANT_KEY, (None, False))[1]


def _dense_copy(w: PackedWeight) -> torch.Tensor | None:
    """The whole weight in fp32 if it keeps a copy (``_has_copy``; made once, kept with ``w``), else None."""
    return _dequantized(w) if _has_copy(w) else None


@functools.lru_cache(maxsize=1)
def default_copy_mb() -> float:
    """DENSE_COPY_RAM_FRACTION of the physical RAM in MiB, else DENSE_COPY_MB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return DENSE_COPY_MB
    return max(DENSE_COPY_MB, ram * DENSE_COPY_RAM_FRACTION / (1 << 20))


def copy_budget() -> int:
    """Bytes of fp32 copies the dense fallback may keep per process (SPARSEINFER_DENSE_COPY_MB, else
    default_copy_mb())."""
    raw = os.environ.get("SPARSEINFER_DENSE_COPY_MB") or str(default_copy_mb())
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"SPARSEINFER_DENSE_COPY_MB={raw!r} is not a number of MiB") from None
    return max(0, int(mb * (1 << 20)))


def copy_affordable(w: PackedWeight) -> bool:
    """Whether the dense route of ``w`` would run from a budgeted fp32 copy now: a weight larger than
    SMALL_BYTES (smaller ones keep theirs anyway) whose copy the process budget has room for. Any
    format, any activation mode: without the copy the route dequantizes the weight tile by tile on
    every call and loses to dense where it was meant to match it (exact calls of quantized MiniLM ran
    0.81-0.89x dense at the batch of 16; on AVX2 the 1536 x 384 layers of a 2:4 + int4 one in the
    int8-activation mode, whose kernel loses to MKL there, 0.74-0.84x: bench/README.md)."""
    n, k = w.shape
    return n * k * 4 > SMALL_BYTES and _copy_bytes + n * k * 4 <= copy_budget()


def dense_runs_from_copy(w: PackedWeight) -> bool:
    """Whether the dense route of ``w`` runs (or would run) from an fp32 copy: a small weight, a
    copy already granted, or one the budget has room for. Then dense is torch's GEMM on the very
    values the kernels compute with, and takes ties."""
    return _has_copy(w) or copy_affordable(w)


def _release(nbytes: int) -> None:
    global _copy_bytes
    with _lock:
        _copy_bytes -= nbytes


def keep_copy(w: PackedWeight) -> bool:
    """Reserve ``w``'s fp32 copy in the process budget (once per weight; released when ``w`` is
    collected); the dense fallback makes it at its next call. False when the budget is spent. A
    weight of SMALL_BYTES or less keeps its copy anyway and reserves nothing."""
    if w.shape[0] * w.shape[1] * 4 <= SMALL_BYTES:
        return True

    def reserve(w: PackedWeight) -> bool:
        global _copy_bytes
        n, k = w.shape
        with _lock:
            if _copy_bytes + n * k * 4 > copy_budget():
                return False
            _copy_bytes += n * k * 4
        weakref.finalize(w, _release, n * k * 4)
        w._prepacked.pop(_DENSE_COPY_KEY, None)  # a tile-path memo made before the grant
        return True
    return w.prepacked(_COPY_GRANT_KEY, reserve)


_tiles = threading.local()


def _tile_buffer(numel: int) -> torch.Tensor:
    """The calling thread's fp32 tile buffer of at least ``numel`` elements, kept between calls: a
    fresh multi-MB tensor per call costs its page faults (~0.15 ms for 2.4 MB, about a 16-row GEMM
    on 1536x384)."""
    buf = getattr(_tiles, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _tiles.buf = torch.empty(numel)
    return buf[:numel]


def dense_linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W.T + bias through torch's fp32 GEMM on W's rows dequantized by
    ``_C.dequantize`` (exactly to_dense()'s values), at most TILE_BYTES of them at a time; exact up
    to fp32 summation order. Returns x.dtype."""
    n, k = w.shape
    x2 = x.reshape(-1, k).float()
    b = None if bias is None else bias.float()
    dense = w.prepacked(_DENSE_COPY_KEY, _dense_copy)
    with torch_threads(cpu_tuning.cpu_threads()):
        out = torch.nn.functional.linear(x2, dense, b) if dense is not None else tiled_linear(x2, w, b)
    return out.reshape(*x.shape[:-1], n).to(x.dtype).contiguous()


class torch_threads:  # lower case: used like a function, ``with torch_threads(n):``
    """torch's GEMM on at least ``n`` threads (sparseinfer's count) for one dense-routed call:
    ``llm.decode_threads`` leaves torch's own small ops on one thread, and a 2:4 or 50 %-sparse LLM
    whose layers all take the dense route then decoded at 0.4x dense. Setting the count costs ~0.1 us;
    a class rather than a generator context manager, whose entry and exit cost ~1 us on every
    dense-routed call."""

    __slots__ = ("before", "n")

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.before < self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.before < self.n:
            torch.set_num_threads(self.before)


def dense_call(w: PackedWeight, x: torch.Tensor, threads: int):
    """``call(x, bias) -> y`` for fp32 calls like ``x`` on the dense route when ``w`` keeps its fp32
    copy: one ``F.linear`` on ``threads`` threads (a dense-routed layer's per-call lookups cost ~20 us,
    a quarter of a small layer's GEMM); None otherwise (``dense_linear`` then serves each call)."""
    dense = w.prepacked(_DENSE_COPY_KEY, _dense_copy)
    if dense is None or x.dtype != torch.float32:
        return None
    linear, torch_count = torch.nn.functional.linear, torch.get_num_threads
    # The copy goes stale when a packed tensor is written in place: its _version moves (copy_,
    # load_state_dict, set_). An inference tensor counts no writes: there a move is all that shows.
    # Read through map() over C getters, no Python frame: inside a model each Python step costs
    # several times its tight-loop time (cold caches between layers, bench/README.md).
    counted = tuple(t for t, c in w._sources if c)
    uncounted = tuple(t for t, c in w._sources if not c)
    version, address = operator.attrgetter("_version"), operator.methodcaller("data_ptr")

    def current_copy() -> torch.Tensor:
        """The fp32 copy of the packed tensors as they are now (made again if one was written in
        place or moved since: the check costs ~1 us)."""
        return w.prepacked(_DENSE_COPY_KEY, _dense_copy)

    def marks() -> tuple[tuple, tuple]:  # what call() compares, inline, on every call
        return tuple(map(version, counted)), tuple(map(address, uncounted))

    copy, (versions, addresses) = dense, marks()

    def call(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        nonlocal copy, versions, addresses
        if tuple(map(version, counted)) != versions or (uncounted and tuple(map(address, uncounted)) != addresses):
            copy, (versions, addresses) = current_copy(), marks()
        if torch_count() >= threads:
            return linear(x, copy, bias)
        with torch_threads(threads):  # entered only where needed
            return linear(x, copy, bias)

    call.dense_copy = current_copy  # what the native decode step (lean_llama.py) multiplies instead
    return call


def tiled_linear(x2: torch.Tensor, w: PackedWeight, b: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x2 [M, K] (fp32) @ W.T + b, W dequantized tile by tile (no copy kept), each tile
    multiplied as F.linear multiplies a dense weight (x2 @ tile.T, y contiguous: tile @ x2.T into
    y.T and a transposing copy ran 0.48-0.77x of F.linear on the whole weight at M = 256-2048)."""
    n, k = w.shape
    C, handle, threads = _native.require_native(), native_weight(w), cpu_tuning.cpu_threads()
    step = min(n, max(16, TILE_BYTES // (4 * k) // 16 * 16))
    tile = _tile_buffer(step * k).view(step, k)
    if step == n:  # one tile: the whole weight
        C.dequantize(handle, 0, n, tile, threads)
        return torch.nn.functional.linear(x2, tile, b)
    out = torch.empty(x2.shape[0], n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = tile[:stop - start]
        C.dequantize(handle, start, stop, rows, threads)
        out[:, start:stop] = torch.nn.functional.linear(x2, rows, None if b is None else b[start:stop])
    return out


DENSE_KERNEL = "dense fallback (torch fp32 GEMM on the dequantized weight)"


# -- measuring -------------------------------------------------------------------------------------

def time_interleaved(runs: dict, rounds: int, budget: float) -> dict:
    """{name: fn} -> {name: fastest call in seconds}: each round calls every entry once, in an
    order rotated per round, so that load from elsewhere hits all alike; stops after ``rounds``
    or after the round in which ``budget`` seconds ran out (each is warmed up once first)."""
    names = list(runs)
    for fn in runs.values():
        fn()  # warm-up: prepacked layouts, scratch, dense tiles
    best = dict.fromkeys(names, math.inf)
    start = time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            runs[name]()
            best[name] = min(best[name], time.perf_counter() - t)
        if time.perf_counter() - start > budget:
            break
    return best


def rotation_copies(nbytes: int) -> int:
    """How many copies of a weight of ``nbytes`` make ROTATE_BYTES (at least 1, at most ROTATE_COPIES)."""
    return min(ROTATE_COPIES, max(1, -(-ROTATE_BYTES // max(1, nbytes))))


def _copies(w: PackedWeight) -> list[PackedWeight]:
    """``w`` and clones of it, ROTATE_BYTES in all (at most ROTATE_COPIES)."""
    # (deepcopy: from_parts would validate each again, 6x slower)
    return [w] + [copy.deepcopy(w) for _ in range(rotation_copies(w.nbytes) - 1)]


def measure_point(w: PackedWeight, m: int, act: str, paths) -> dict:
    """Times each of ``paths`` for ``m`` rows (at most MEASURE_MAX_M) on ``w`` (its first rows, at
    least MIN_SLICE_ROWS, if one call would exceed CALL_CAP_S), each call on the next of a rotation
    of copies (ROTATE_BYTES: weights come from memory, as in a model). The dense path is timed as it
    would run: from an fp32 copy when ``w`` would keep one (copy_affordable), else tile
    by tile. Returns the record stored per route key."""
    C = _native.require_native()
    n, k = w.shape
    m = min(m, MEASURE_MAX_M)
    est = 2.0 * m * n * k / ASSUMED_FLOPS
    rows = n if est <= CALL_CAP_S else min(n, max(MIN_SLICE_ROWS, int(n * CALL_CAP_S / est) // 16 * 16))
    # (a slice is of a weight too large to be cached anyway; a deepcopy of it would copy all rows)
    parts = _copies(w) if rows == n else [w.rows(0, rows)]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 31 + k))
    out1 = torch.empty(1, rows)
    threads = cpu_tuning.cpu_threads()
    handles = [build_native_weight(part) for part in parts]
    copy = copy_affordable(w)
    turn = dict.fromkeys(paths, 0)

    def rotating(path: str, calls: list):
        def run():
            turn[path] = (turn[path] + 1) % len(calls)
            calls[turn[path]]()
        return run

    def kernel_call(handle, *args):
        # a fresh output per call, as the layer's direct call allocates one (F.linear does too): a
        # reused one stays in the cache and favoured the kernels (int8 at 736 rows, medians: 384x384
        # +3 % on AVX2, 384x384 / 1536x384 +3-8 % on AVX-512)
        return lambda: C.linear(x, handle, torch.empty(m, rows), None, threads, None, act, *args)

    x1 = x[:1]
    small = n * k * 4 <= SMALL_BYTES
    runs = {}
    for i, p in enumerate(paths):
        # each path its own copies: a copy another path just ran would be hot in this one's call
        mine = list(range(len(parts)))[i::len(paths)] or [0]
        if p == "kernel" or p.startswith("kernel:"):
            name = p.partition(":")[2] or None
            calls = [kernel_call(handles[j], name) for j in mine]
            for j in mine:  # a copy's first call builds what it keeps (int8 row tiles): on one row, untimed
                C.linear(x1, handles[j], out1, None, threads, None, act, name or C.kernel_name(handles[j], m, None, act))
        elif p == "dense_int8":
            h8 = [dense_int8_handle(parts[j]) for j in mine]
            calls = [kernel_call(h) for h in h8]
            for h in h8:
                C.linear(x1, h, out1, None, threads, None, act, C.kernel_name(h, m, None, act))
        elif copy or small:  # what dense_linear runs then: F.linear on the kept fp32 copy
            calls = [functools.partial(torch.nn.functional.linear, x, _dequantized(parts[j])) for j in mine]
        else:
            calls = [functools.partial(tiled_linear, x, parts[j], None) for j in mine]
        runs[p] = rotating(p, calls)
    # torch's GEMM on the threads it runs on in the model (dense_linear, dense_call): under
    # llm.decode_threads torch has one, and a 50 %-sparse SmolLM2 measured that way took the CSR kernel
    # at 256 rows and prefilled at 0.81x dense
    with torch_threads(threads):
        times = time_interleaved(runs, ROUNDS, POINT_BUDGET_S)
    return {"times": times, "m": m, "rows": rows, "n": n, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "kernel": C.kernel_name(handles[0], m, None, act), "dense_copy": copy, "copies": len(parts),
            "dense_threads": threads}


def _rank(path: str) -> int:
    return 1 if path.startswith("kernel:") else 0 if path == "kernel" else 1 + PATH_ORDER.index(path)


def choose(times: dict, dense_first: bool = False) -> str:
    """The path to take from measured times: the table's pick ("kernel"), then the other kernels,
    then PATH_ORDER's dense paths; a later one only if it is faster than the best so far by MARGIN.
    ``dense_first`` (the dense path runs from an fp32 copy: dense_runs_from_copy) puts "dense" first:
    a tie goes to dense. Kernels within 5 % of dense in the measurement ran below it in the models:
    50 %-sparse SmolLM2's CSR kernels at 256 rows prefilled at 0.93x dense; on AVX2, 2:4 + int8's
    1536 x 384 layers measured 3.98 ms against dense's 3.86 and ran MiniLM's batch at 0.84-0.98x."""
    best = None
    for p in sorted(times, key=lambda p: -1 if dense_first and p == "dense" else _rank(p)):
        if best is None or times[p] < times[best] * (1 - MARGIN):
            best = p
    return best


def settled(record: dict) -> bool:
    """Whether a stored record decides for good: SETTLED_ROUNDS measurements merged. A record without
    "dense_threads" (made before the dense path was timed on sparseinfer's thread count: it may have
    timed torch's GEMM on one thread) is measured once more; merging keeps the faster dense time."""
    if "dense" in record["times"] and "dense_threads" not in record:
        return False
    return record.get("rounds", 1) >= SETTLED_ROUNDS


def merge(old: dict, new: dict) -> dict:
    """A second measurement of a point: each path's best time of both, one more round."""
    times = {p: min(t, old["times"].get(p, math.inf)) for p, t in new["times"].items()}
    return {**new, "times": times, "rounds": old.get("rounds", 1) + 1}


# -- tables ----------------------------------------------------------------------------------------

def builtin_tables() -> dict:
    """{isa: table} shipped with the package (cpu_routes.json): measured_on, dense_from, csr_crossover."""
    if not _tables:
        try:
            _tables.update(json.loads(TABLE_PATH.read_text()).get("isa", {}))
        except (OSError, ValueError):
            pass
    return _tables


def _entry() -> dict:
    """This machine's stored entry (user cache), read once per process and thread count."""
    key = cpu_tuning.machine_key()
    if key not in _stored:
        _stored[key] = cpu_tuning.stored() or {}
    return _stored[key]


def known_machine() -> bool:
    """Whether the active ISA's built-in table, or a calibration stored here, was measured on this machine."""
    C = _native.require_native()
    table = builtin_tables().get(C.active_isa(), {})
    return cpu_tuning.machine_key() in table.get("measured_on", ()) or bool(_entry().get("rules"))


def _measuring_allowed() -> bool:
    return os.environ.get("SPARSEINFER_MEASURE", "1") != "0" and os.environ.get("SPARSEINFER_TUNING", "1") != "0"


def _rules(isa: str) -> tuple[dict, str]:
    rules = _entry().get("rules")
    if rules:
        return rules, f"calibrated here {_entry().get('when', '?')}"
    return builtin_tables().get(isa, {}), f"built-in {isa} table"


def crossover(rules: dict, family: str, act: str, m: int) -> float | None:
    """Density above which dense beats the CSR kernel at ``m`` rows (None: not in ``rules``)."""
    points = rules.get("csr_crossover", {}).get(f"{family}/{act_class(act)}") or \
        rules.get("csr_crossover", {}).get(f"{family}/fp32")
    if not points:
        return None
    pts = sorted((int(b), float(d)) for b, d in points.items())
    lb = math.log2(max(m, 1))
    if lb <= math.log2(pts[0][0]):
        return pts[0][1]
    for (b0, d0), (b1, d1) in zip(pts, pts[1:]):
        l0, l1 = math.log2(b0), math.log2(b1)
        if lb <= l1:
            return d0 + (d1 - d0) * (lb - l0) / (l1 - l0)
    return pts[-1][1]


def _by_rules(w: PackedWeight, family: str, isa: str, m: int, act: str, paths) -> tuple[str, str]:
    rules, source = _rules(isa)
    dense_from = rules.get("dense_from", {})

    def dense_wins(fam: str) -> int | None:
        start = dense_from.get(f"{fam}/{act_class(act)}")
        return start if start is not None and bucket(m) >= start else None

    if isinstance(w, CSRWeight):
        d = crossover(rules, family, act, m)
        if d is None:
            return "kernel", f"no CSR crossover in the {source}"
        if w.density <= d:
            return "kernel", f"density {w.density:.3g} <= crossover {d:.3g} at M={m} ({source})"
        why = f"density {w.density:.3g} > crossover {d:.3g} at M={m} ({source})"
        if "dense_int8" in paths and dense_wins("int8") is None:
            return "dense_int8", why
        return "dense", why
    start = dense_wins(family)
    if start is not None:
        return "dense", f"{source}: the dense fallback beats {family} kernels from M={start} ({act_class(act)} act)"
    return "kernel", f"{source}: packed kernel"


def _label(path: str, record: dict) -> str:
    if path == "kernel":
        return record.get("kernel") or "kernel"
    return path.partition(":")[2] if path.startswith("kernel:") else path


def _by_times(record: dict, source: str, dense_first: bool = False) -> tuple[str, str]:
    times = record["times"]
    path = choose(times, dense_first)
    shown = ", ".join(f"{_label(p, record)} {times[p] * 1e3:.3g} ms" for p in sorted(times, key=_rank))
    rows = f" on rows 0:{record['rows']} of {record['n']}" if record.get("rows", 0) < record.get("n", 0) else ""
    rounds = record.get("rounds", 1)
    state = f", {rounds} measurements" if rounds > 1 else "" if settled(record) else ", to be measured again"
    return path, f"{source} {record.get('when', '?')}: {shown} at M={record.get('m', '?')}{rows}{state}"


# -- the decision ----------------------------------------------------------------------------------

def decide(w: PackedWeight, handle, m: int, act: str) -> Route:
    """The route of a call with ``m`` rows in (resolved) activation mode ``act`` on ``w``."""
    global _spent
    C = _native.require_native()
    kernel = C.kernel_name(handle, m, None, act)
    rows = {r["name"]: r for r in C.kernel_table(None)}
    row = rows.get(kernel, {})
    # rules of the active ISA (its CSR and N:M rows may come from a level below, measured against its
    # own dense kernels), except for a scalar kernel, whose speed is the same on every x86 / ARM level
    family = handle.kernel_family
    isa = "scalar" if row.get("isa") == "scalar" else C.active_isa()
    paths = candidates(w, handle, m, act)
    key = route_key(w, m, act)
    with _lock:
        record = _entry().get("routes", {}).get(key)
        # A record without a "kernel" time is from elsewhere, and one that timed another kernel than
        # the table picks now (e.g. before an upgrade added a faster one) is not used. One that lacks
        # a candidate (a kernel this build added), or is unsettled, is measured again when allowed.
        usable = record is not None and "kernel" in record["times"] and (
            record.get("kernel") in (None, C.kernel_name(handle, record.get("m", m), None, act)))
        # (a dense time measured tile by tile, where the weight would now keep a copy, is stale too)
        stale_dense = usable and "dense" in paths and not record.get("dense_copy") and copy_affordable(w)
        complete = usable and not stale_dense and all(p in record["times"] for p in paths)
        may_measure = (not known_machine() and _measuring_allowed() and _spent < MEASURE_BUDGET_S
                       and key not in _remeasured)
        if usable and (not may_measure or (complete and settled(record))):
            path, why = _by_times(record, "measured", dense_runs_from_copy(w))
        elif may_measure:
            t0 = time.perf_counter()
            fresh = measure_point(w, m, act, paths)
            _spent += time.perf_counter() - t0
            _remeasured.add(key)
            again = complete  # an unsettled record: merge the two measurements
            record = merge(record, fresh) if again else fresh
            _entry().setdefault("routes", {})[key] = record
            try:
                cpu_tuning.save(routes={key: record})
            except OSError:
                pass  # a read-only cache: the decision holds for this process
            path, why = _by_times(record, "measured again" if again else "measured on first use",
                                  dense_runs_from_copy(w))
        else:
            path, why = _by_rules(w, family, isa, m, act, paths)
            if not known_machine() and _measuring_allowed():
                why += f" (first-use measuring budget of {MEASURE_BUDGET_S:g} s spent)"
    if path.startswith("kernel"):
        name = path.partition(":")[2] or kernel
        act_run = "int8" if rows.get(name, {}).get("int8_act") else "fp32"
        return Route("kernel", name, act_run, why, name if name != kernel else None)
    if path == "dense_int8":
        k8 = C.kernel_name(dense_int8_handle(w), m, None, act)
        return Route(path, k8, "int8" if rows.get(k8, {}).get("int8_act") else "fp32", why)
    n, k = w.shape
    mb = n * k * 4 / (1 << 20)
    if n * k * 4 <= SMALL_BYTES:
        copy = f"an fp32 copy of the weight ({mb:.2g} MiB), kept"
    elif keep_copy(w):
        copy = f"an fp32 copy of the weight ({mb:.3g} MiB), kept within SPARSEINFER_DENSE_COPY_MB={copy_budget() >> 20}"
    else:
        copy = (f"tiles dequantized per call (the fp32 copy budget, SPARSEINFER_DENSE_COPY_MB={copy_budget() >> 20}, "
                f"is spent)")
    return Route(path, DENSE_KERNEL, "fp32", f"{why}; dense from {copy}")


def route(w: PackedWeight, handle, m: int, act: str, threads: int) -> Route:
    """``decide``, memoised on the weight per (rows, act, threads)."""
    memo = w.prepacked(_ROUTES_KEY, lambda w: {})
    key = (m, act, threads, _generation)
    found = memo.get(key)
    if found is None:
        found = decide(w, handle, m, act)
        if len(memo) >= 256:  # many distinct batch sizes: keep it bounded
            memo.clear()
        memo[key] = found
    return found


# -- calibrating rules (sparseinfer calibrate, bench/cpu_dispatch_rules.py) --------------------------

def _random_weight(fmt: str, params: dict, n: int, k: int, density: float, g: torch.Generator) -> PackedWeight:
    w = torch.randn(n, k, generator=g)
    if density < 1:
        w = w * (torch.rand(n, k, generator=g) < density)
    return pack(w, fmt, **params)


def _csr_ratio(record: dict) -> float:
    times = record["times"]
    return times["kernel"] / min(t for p, t in times.items() if p != "kernel")


def crossing(ratio: dict[float, float]) -> float:
    """Density (clamped to 0 ... 1) at which the CSR kernel's time over dense's ({density: ratio}),
    affine between the two measured densities nearest the crossing, reaches 1."""
    pts = sorted(ratio.items())
    i = next((i for i in range(len(pts) - 1) if pts[i + 1][1] >= 1.0), len(pts) - 2)
    (d0, r0), (d1, r1) = pts[i], pts[i + 1]
    slope = max((r1 - r0) / (d1 - d0), 1e-12)
    return min(1.0, max(0.0, d0 + (1.0 - r0) / slope))


def calibrate_rules(n: int = 1024, k: int = 1024, batches=(1, 4, 16, 64, 256, 1024), progress=None) -> dict:
    """Measure this machine's rules: per family and act class the batch from which the dense
    fallback wins (the smallest measured batch where it wins at every batch from there on), and for
    CSR the crossover density per batch (CSR timed at CSR_DENSITIES, affine in the density, against
    the dense paths; a crossing beyond them is timed where it lands and fitted again). Returns
    {"dense_from", "csr_crossover", "routes": raw measurements}."""
    C = _native.require_native()
    g = torch.Generator().manual_seed(0)
    rules = {"dense_from": {}, "csr_crossover": {}, "routes": {}}
    acts = ("fp32", "int8")
    for family, (fmt, params) in sorted(cpu_tuning._FAMILY_FORMATS.items()):
        csr = family.startswith("csr")
        dens = CSR_DENSITIES if csr else (1.0,)
        ws = {d: _random_weight(fmt, params, n, k, d, g) for d in dens}
        for act in acts:
            h = build_native_weight(ws[dens[0]])
            if act == "int8" and not any(C.kernel_name(h, m, None, "int8") != C.kernel_name(h, m, None, "fp32")
                                         for m in batches) and family != "csr_int8":
                continue  # no int8-activation kernel: the same as fp32
            if progress:
                progress(f"{family} ({act} activations)")
            wins, points = [], {}
            for m in batches:
                recs = {d: measure_point(w, m, act, candidates(w)) for d, w in ws.items()}  # table pick vs dense
                for d, w in ws.items():
                    rules["routes"][route_key(w, m, act)] = recs[d]
                if csr:
                    # kernel / dense per measurement (dense does not depend on the density, and a ratio
                    # from one interleaved measurement does not drift with the host's load)
                    ratio = {d: _csr_ratio(r) for d, r in recs.items()}
                    d = crossing(ratio)
                    for _ in range(CSR_REFINE):
                        if not max(ratio) < d < 1 or min(abs(d - x) for x in ratio) < CSR_RESOLUTION:
                            break
                        # extrapolated: time it where it lands (a noisy, flat line put the 16-row point
                        # of the avx512 table at 0.81 between 0.23 and 0.32); not closer than
                        # CSR_RESOLUTION to a measured density, where the slope would be the noise's
                        w = _random_weight(fmt, params, n, k, round(d, 2), g)
                        rec = measure_point(w, m, act, candidates(w))
                        rules["routes"][route_key(w, m, act)] = rec
                        ratio[w.density] = _csr_ratio(rec)
                        d = crossing(ratio)
                    points[str(m)] = round(d, 4)
                else:
                    wins.append((m, choose(recs[1.0]["times"]) == "dense"))
            if csr:
                rules["csr_crossover"][f"{family}/{act}"] = points
            else:
                start = None
                for m, dense in reversed(wins):
                    if not dense:
                        break
                    start = m
                if start is not None:
                    rules["dense_from"][f"{family}/{act}"] = start
    return rules
