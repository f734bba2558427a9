"""Exercises sparseinfer._C's bindings and the weight-lifetime path; run by
tests/test_native_sanitizers.py in a Python that loads an AddressSanitizer + UBSan build of the
extension (csrc/tests/build.py extension), so that any out-of-bounds or freed-memory access, or
undefined behaviour, in bindings.cpp or a kernel it calls aborts the run.

    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        python tests/native/binding_checks.py /path/to/_C-<hash>.cpython-311-x86_64-linux-gnu.so

The module at that path is installed as ``sparseinfer._C`` before sparseinfer is imported. Prints
one line per group of checks and ``OK <n> checks``; an assertion or a sanitizer report fails it.
Every call runs on every ISA this CPU has, scalar first: ASan sees the scalar kernels' loads, while
SIMD masked loads (intrinsics) are not instrumented.
"""

from __future__ import annotations

import importlib.util
import sys
import threading


def _install(path: str):
    spec = importlib.util.spec_from_file_location("sparseinfer._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["sparseinfer._C"] = module
    return module


C = _install(sys.argv[1])

import torch  # noqa: E402

import sparseinfer as si  # noqa: E402
from sparseinfer import _native  # noqa: E402
from sparseinfer.backends import reference_linear  # noqa: E402
from sparseinfer.backends.cpu import build_native_weight  # noqa: E402

assert _native._C is C, "sparseinfer imported another _C than the sanitized one"
CHECKS = 0
# Small shapes: the point is every code path under the sanitizers, not throughput. N = 33 and K = 100
# leave partial tiles and groups; K = 256 reaches the int8-activation N:M kernels (64-column blocks).
FORMATS = [("int8", {"group_size": None}), ("int4", {"group_size": 32, "symmetric": False}),
           ("2:4", {}), ("2:4+int8", {"group_size": 32}), ("2:4+int4", {"group_size": 32}),
           ("csr", {}), ("csr+int8", {})]
G = torch.Generator().manual_seed(0)
ISAS = C.available_isas()


def check(cond: bool, what: str) -> None:
    global CHECKS
    assert cond, what
    CHECKS += 1


def weight(fmt: str, params: dict, n: int = 33, k: int = 256, scale: float = 1.0):
    w = torch.randn(n, k, generator=G) * scale
    if fmt.startswith("csr"):
        w = w * (torch.rand(n, k, generator=G) < 0.3)
    return si.pack(w, fmt, **params)


def run(h, x: torch.Tensor, act: str, isa: str | None = None, threads: int = 2, kernel: str | None = None) -> torch.Tensor:
    out = torch.full(x.shape[:-1] + (h.shape[0],), float("nan"), dtype=x.dtype)
    return C.linear(x, h, out, None, threads, isa, act, kernel)


def close(y: torch.Tensor, w, x: torch.Tensor, act: str) -> bool:
    ref = reference_linear(x.reshape(-1, x.shape[-1]).float(), w).reshape(*x.shape[:-1], -1)
    tol = 2e-2 if act == "int8" else 1e-4 if x.dtype == torch.float32 else 1e-2
    return torch.isfinite(y).all().item() and ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item() < tol


def every_format_and_shape() -> None:
    for fmt, params in FORMATS:
        w = weight(fmt, params)
        h = build_native_weight(w)
        for isa in ISAS:
            for act in ("fp32", "int8"):
                for shape in [(1, 256), (3, 256), (17, 256), (2, 5, 256)]:
                    for dtype in (torch.float32, torch.bfloat16):
                        x = torch.randn(*shape, generator=G).to(dtype)
                        check(close(run(h, x, act, isa), w, x, act), f"{fmt} {isa} {act} {shape} {dtype}")
                        rows = x.numel() // 256
                        for name in C.kernel_candidates(h, rows, isa, act)[1:]:  # measured-only rows, named
                            check(close(run(h, x, act, isa, kernel=name), w, x, act),
                                  f"{fmt} {isa} {act} {shape} {dtype} {name}")
                x = torch.randn(7, 512, generator=G)[:, :256]  # strided rows
                check(close(run(h, x, act, isa), w, x, act), f"{fmt} {isa} {act} strided rows")
                check(run(h, torch.ones(2, 0, 256), act, isa).shape == (2, 0, 33), f"{fmt} {isa} {act} no rows")
    print("formats and shapes: ok", flush=True)


def refused(fn, error=ValueError, match: str = "") -> None:
    try:
        fn()
    except error as err:
        check(match in str(err), f"message {str(err)!r} lacks {match!r}")
        return
    raise AssertionError(f"no {error.__name__} ({match})")


def bad_arguments() -> None:
    w = weight("int8", {"group_size": None})
    h = build_native_weight(w)
    x = torch.randn(3, 256, generator=G)
    refused(lambda: run(h, x[:, :255], "fp32"), match="does not match")
    refused(lambda: run(h, x.t().contiguous().t(), "fp32"), match="unit stride")
    refused(lambda: C.linear(x.to(torch.int32), h, torch.empty(3, 33), None, 1), match="dtype")
    refused(lambda: C.linear(x, h, torch.empty(3, 32), None, 1), match="shape")
    refused(lambda: C.linear(x, h, torch.empty(3, 33, dtype=torch.float16), None, 1), match="dtype")
    buf = torch.empty(3 * 256 + 3 * 33)
    refused(lambda: C.linear(buf[:768].view(3, 256), h, buf[700:799].view(3, 33), None, 1), match="overlap")
    refused(lambda: C.linear(x, h, torch.empty(3, 33), torch.ones(32), 1), match="bias")
    refused(lambda: C.linear(x, h, torch.empty(3, 33), None, 0), match="num_threads")
    refused(lambda: C.linear(x, h, torch.empty(3, 33), None, 1, "sse9"), match="isa")
    refused(lambda: C.linear(x, h, torch.empty(3, 33), None, 1, None, "int3"), match="act")
    refused(lambda: C.linear("x", h, torch.empty(3, 33), None, 1), TypeError, "torch.Tensor")
    refused(lambda: C.pack_int8(w.qweight, w.scale, 257), match="K = 257")
    refused(lambda: C.pack_int8(w.qweight.to(torch.uint8), w.scale, 256), match="dtype")
    refused(lambda: C.pack_int4(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 3), None, 16), match="scale")
    refused(lambda: C.pack_nm(torch.zeros(4, 8, dtype=torch.uint8), 4, 4, 16, torch.zeros(4, 8)), match="N:M")
    crow, col, vals = torch.tensor([0, 2, 3]), torch.tensor([1, 1, 0], dtype=torch.int32), torch.ones(3)
    refused(lambda: C.pack_csr(crow, col, vals, None, 4), match="strictly increasing")
    refused(lambda: C.pack_csr(crow, torch.tensor([1, 4, 0], dtype=torch.int32), vals, None, 4), match="outside")
    refused(lambda: C.pack_csr(torch.tensor([0, 3, 2]), col, vals, None, 4), match="crow")
    check(C.pack_csr(crow, torch.tensor([0, 1, 0], dtype=torch.int32), vals, None, 4).shape == (2, 4), "csr ok")
    print("bad arguments: ok", flush=True)


def moved_and_rewritten_sources() -> None:
    """Every source tensor of every format: its storage moved (share_memory_, set_), then written in
    place; each call must read the current memory and contents, never the freed or stale ones."""
    for fmt, params in FORMATS:
        for isa in ISAS:
            for act in ("fp32", "int8"):
                w, other = weight(fmt, params), weight(fmt, params, scale=3.0)
                same = all(a.shape == b.shape for a, b in zip(w.tensors().values(), other.tensors().values()))
                h = build_native_weight(w)
                x = torch.randn(5, 256, generator=G)
                check(close(run(h, x, act, isa), w, x, act), f"{fmt} {isa} {act} before")
                for name, t in w.tensors().items():
                    t.share_memory_()
                    check(close(run(h, x, act, isa), w, x, act), f"{fmt} {isa} {act} {name} after share_memory_")
                    t.set_(t.clone())
                    check(close(run(h, x, act, isa), w, x, act), f"{fmt} {isa} {act} {name} after set_")
                if same:  # in place, as load_state_dict does
                    for t, src in zip(w.tensors().values(), other.tensors().values()):
                        t.copy_(src)
                    check(close(run(h, x, act, isa), other, x, act), f"{fmt} {isa} {act} after copy_")
    w = weight("csr", {})
    h = build_native_weight(w)
    w.col[-1] = 10_000  # a write that breaks the format: the rebuild validates again and refuses
    refused(lambda: run(h, torch.randn(2, 256, generator=G), "fp32"), match="outside")
    iw = weight("int8", {"group_size": None})
    h = build_native_weight(iw)
    iw.qweight.set_(torch.zeros(3, 3, dtype=torch.int8))
    refused(lambda: run(h, torch.randn(2, 256, generator=G), "fp32"), match="qweight")
    print("moved and rewritten sources: ok", flush=True)


def concurrent_rebuilds() -> None:
    """Calls from several threads while the main thread rewrites the weight in place: each write makes
    the next call rebuild the weight and its int8-activation tiles, which must never free the tiles a
    running call reads. (Moving a tensor's storage while a kernel reads it is a race in the caller, as
    for any torch op, so only in-place writes here.)"""
    w, other = weight("int8", {"group_size": None}, n=64, k=512), weight("int8", {"group_size": None}, n=64, k=512)
    first = w.qweight.clone()
    h = build_native_weight(w)
    x = torch.randn(8, 512, generator=G)
    stop, errors = threading.Event(), []

    def caller():
        try:
            while not stop.is_set():
                assert torch.isfinite(run(h, x, "int8", threads=2)).all()
        except Exception as err:  # reported below
            errors.append(err)

    workers = [threading.Thread(target=caller) for _ in range(3)]
    for t in workers:
        t.start()
    for i in range(100):
        w.qweight.copy_(other.qweight if i % 2 else first)
    stop.set()
    for t in workers:
        t.join()
    check(not errors, f"concurrent calls failed: {errors[:1]}")
    print("concurrent rebuilds: ok", flush=True)


def decoder() -> None:
    """_C.Decoder's whole step on every ISA: packed (int8, int4, 2:4+int8) and dense fp32 projections,
    odd sizes (head_dim 10, hidden 36), every cache position up to the last, both activation modes;
    the steps agree across ISAs; a position past the cache is refused."""
    global CHECKS
    hidden, heads, kv, d, inter, layers, max_len, vocab = 36, 4, 2, 10, 22, 2, 7, 19

    def proj(n, k, fmt, params):
        if fmt == "dense":
            return torch.randn(n, k, generator=G)
        return build_native_weight(si.pack(torch.randn(n, k, generator=G), fmt, **params))

    fmts = [("int8", {"group_size": None}), ("int4", {"group_size": 16}), ("2:4+int8", {"group_size": 16}),
            ("dense", {})]
    spec = []
    for i in range(layers):
        f = [fmts[(i + j) % len(fmts)] for j in range(4)]  # each layer its own mix of formats
        spec.append((torch.rand(hidden, generator=G) + 0.5, 1e-5,
                     [proj(heads * d, hidden, *f[0]), proj(2 * kv * d, hidden, *f[1])], proj(hidden, heads * d, *f[2]),
                     torch.rand(hidden, generator=G) + 0.5, 1e-5,
                     [proj(2 * inter, hidden, *f[3])], proj(hidden, inter, *f[0])))
    head = proj(vocab, hidden, "int4", {"group_size": 16})
    pos = torch.arange(max_len, dtype=torch.float32)[:, None] * 0.1 * torch.arange(1, d + 1)
    cos, sin = pos.cos().contiguous(), pos.sin().contiguous()
    xs = torch.randn(max_len, hidden, generator=G)
    gate_up_bias, head_bias = torch.randn(2 * inter, generator=G), torch.randn(vocab, generator=G)
    for act in ("fp32", "int8"):
        results = {}
        for isa in ISAS:
            k_cache, v_cache = torch.zeros(layers, kv, max_len, d), torch.zeros(layers, kv, max_len, d)
            layers_args = [(n1, e1, [(w, None, act, None) for w in qkv], (o, None, act, None), n2, e2,
                            [(w, gate_up_bias, act, None) for w in gu], (dn, None, act, None))
                           for n1, e1, qkv, o, n2, e2, gu, dn in spec]
            dec = C.Decoder((hidden, heads, kv, d, inter, 0.3), cos, sin, k_cache, v_cache, layers_args,
                            torch.ones(hidden), 1e-5, (head, head_bias, act, None), 2, isa)
            out = []
            for p in range(max_len):
                y = torch.full((vocab,), float("nan"))
                dec.step(xs[p], p, y)
                out.append(y)
            results[isa] = torch.stack(out)
            check(torch.isfinite(results[isa]).all(), f"decoder {isa} {act}: non-finite logits")
            refused(lambda dec=dec: dec.step(xs[0], max_len, torch.empty(vocab)), match="outside the cache")
            CHECKS += 1
        first = next(iter(results.values()))
        for isa, r in results.items():
            tol = 1e-4 if act == "fp32" else 0.05  # int8 activations: a last-bit change can move a code
            check(((r - first).abs().max() / first.abs().max()).item() < tol, f"decoder {isa} {act} differs")
    print("decoder: ok", flush=True)


def attention() -> None:
    """_C.attention on every ISA: a padding mask (stride-0 rows), causal rows, grouped-query heads, q / k /
    v as views of one joint tensor, rows that see no key; then arguments it refuses."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, kv, rows, dim = 3, 4, 2, 37, 20
    qkv = torch.randn(batch, rows, (heads + 2 * kv) * dim, generator=gen)
    q, k, v = (t.view(batch, rows, -1, dim).transpose(1, 2) for t in qkv.split([heads * dim, kv * dim, kv * dim], -1))
    visible = torch.arange(rows)[None] < torch.tensor([rows, 5, 1])[:, None]
    visible[1, 0] = False
    mask = visible[:, None, None, :].expand(batch, 1, rows, rows).view(torch.uint8)
    results = {}
    for isa in ISAS:
        for causal in (False, True):
            out = torch.full((batch, rows, heads, dim), float("nan"))
            check(C.attention(q, k, v, out, mask, dim ** -0.5, causal, 3, isa), f"attention {isa} refused a padding mask")
            check(bool(torch.isfinite(out).all()), f"attention {isa}: non-finite output")
            results[(isa, causal)] = out
    for (isa, causal), out in results.items():
        first = results[(ISAS[0], causal)]
        check(((out - first).abs().max() <= 1e-5 * first.abs().max()).item(), f"attention {isa} differs")
    out = torch.empty(batch, rows, heads, dim)
    refused(lambda: C.attention(q, k, v, out, mask[:2]), match="mask must have shape")
    refused(lambda: C.attention(q, k, v, out[:, :-1]), match="out must have shape")
    shared = torch.randn(batch, rows, heads, dim)  # q's own memory as out
    refused(lambda: C.attention(shared.transpose(1, 2), k, v, shared), match="out must not overlap q")
    print("attention: ok", flush=True)


every_format_and_shape()
bad_arguments()
decoder()
attention()
moved_and_rewritten_sources()
concurrent_rebuilds()
print(f"OK {CHECKS} checks")
