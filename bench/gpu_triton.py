"""Triton kernels on a GPU: correctness first, then time against cuBLAS fp16 and PyTorch's own paths.

On a CUDA machine (H100 targets in TARGETS below)::

    python bench/gpu_triton.py                          # every kernel, shape and batch
    python bench/gpu_triton.py --shapes 4096x4096 --batches 1,64 --kernels int4-g128,2:4+int4
    python bench/gpu_triton.py --no-graph               # time with plain do_bench (includes launch overhead)

For each weight shape N x K (out x in features) and batch M it checks every Triton kernel
against the float32 reference, then times with ``triton.testing.do_bench_cudagraph`` (one CUDA
graph replay per call: kernel time without Python dispatch overhead; ``--no-graph`` uses
``do_bench``) the Triton path (``si.linear(..., backend="triton")``, autotuned on its first call),
``F.linear`` in fp16 (cuBLAS), and where this PyTorch has them on this GPU: 2:4
``to_sparse_semi_structured``, ``_weight_int4pack_mm`` (tinygemm, bf16) and
``_weight_int8pack_mm``. It prints time, speedup over fp16 cuBLAS and achieved bandwidth (weight +
activation + output bytes / time), then checks the targets.

Without a GPU::

    python bench/gpu_triton.py --interpret --small      # correctness of every kernel on CPU tensors
                                                        # through the Triton interpreter (slow; small shapes)
    python bench/gpu_triton.py --compile-only [--arch 90] [--quick]
                                                        # compile every kernel variant for sm_<arch>
                                                        # (catches GPU-only compile errors; no GPU needed)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
SMALL_SHAPES = [(96, 160), (37, 100)]
BATCHES = [1, 16, 64, 256]
SMALL_BATCHES = [1, 3, 17]
KERNELS = {  # name -> (format, pack parameters, fraction of weights zeroed before packing)
    "int8": ("int8", {}, 0.0),
    "int8-g128": ("int8", {"group_size": 128}, 0.0),
    "int4-g128": ("int4", {"group_size": 128}, 0.0),
    "int4-g128-asym": ("int4", {"group_size": 128, "symmetric": False}, 0.0),
    "2:4": ("2:4", {}, 0.0),
    "2:4+int8": ("2:4+int8", {}, 0.0),
    "2:4+int4": ("2:4+int4", {"group_size": 128}, 0.0),
    "csr-70%": ("csr", {}, 0.7),
    "csr+int8-90%": ("csr+int8", {}, 0.9),
}
SMALL_PARAMS = {"int8-g128": {"group_size": 32}, "int4-g128": {"group_size": 32},
                "int4-g128-asym": {"group_size": 32, "symmetric": False}, "2:4+int4": {"group_size": 16}}
# ||y - ref|| / ||ref|| against the float32 reference: 2 eps of the activation dtype (the weight
# is rounded to it for the tensor cores, then the output).
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# Issue 4 targets on an H100: (kernel, batch, minimum speedup over fp16 cuBLAS).
TARGETS = [("int4-g128", 1, 3.0), ("2:4+int4", 1, 4.0), ("int8", 1, 1.8)] + [
    (k, 64, 1.0) for k in ("int8", "int4-g128", "2:4", "2:4+int8", "2:4+int4")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interpret", action="store_true", help="run on CPU tensors through the Triton interpreter")
    p.add_argument("--small", action="store_true", help="small odd shapes and batches (correctness only)")
    p.add_argument("--compile-only", action="store_true", help="compile every kernel for --arch, no GPU needed")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only (90 = H100)")
    p.add_argument("--quick", action="store_true", help="--compile-only: one specialisation per kernel")
    p.add_argument("--shapes", help="comma-separated NxK list, e.g. 4096x4096,11008x4096")
    p.add_argument("--batches", help="comma-separated batch sizes")
    p.add_argument("--kernels", help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--no-graph", action="store_true", help="time with do_bench instead of CUDA-graph replays")
    return p.parse_args(argv)


# -- offline compilation ------------------------------------------------------------------------

def compile_all(arch: int, quick: bool = False) -> int:
    """Compile each kernel in representative specialisations for sm_<arch> (``quick``: the first
    one of each kernel); returns the number of failures."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparseinfer.kernels import _common, csr_linear, int4_linear, int8_linear, nm_linear

    if _common.interpreting():
        raise SystemExit("--compile-only needs the real compiler: unset TRITON_INTERPRET")
    ptr = {"x_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "s_ptr": "*fp32",
           "z_ptr": "*u8", "e_ptr": "*u8", "crow_ptr": "*i64", "col_ptr": "*i32"}
    tile = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    gemv = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256)
    f16, bf16, f32 = tl.float16, tl.bfloat16, tl.float32
    cases = [
        (int8_linear.int8_w8a16_gemv_kernel, {"q_ptr": "*i8"},
         dict(GROUP=4096, TILE_IN_GROUP=True, HAS_BIAS=False, SPLIT_K=1, **gemv)),
        (int8_linear.int8_w8a16_gemv_kernel, {"q_ptr": "*i8", "x_ptr": "*bf16"},
         dict(GROUP=100, TILE_IN_GROUP=False, HAS_BIAS=True, SPLIT_K=4, **dict(gemv, BLOCK_M=4, BLOCK_K=64))),
        (int8_linear.int8_w8a16_dot_kernel, {"q_ptr": "*i8"},
         dict(GROUP=128, TILE_IN_GROUP=True, HAS_BIAS=True, SPLIT_K=1, DOT_DTYPE=f16, **tile)),
        (int8_linear.int8_w8a16_dot_kernel, {"q_ptr": "*i8", "x_ptr": "*fp32"},
         dict(GROUP=8, TILE_IN_GROUP=False, HAS_BIAS=False, SPLIT_K=2, DOT_DTYPE=f32, **tile)),
        (int4_linear.int4_w4a16_gemv_kernel, {"q_ptr": "*u8"},
         dict(GROUP=128, TILE_IN_GROUP=True, HAS_ZERO=False, HAS_BIAS=False, SPLIT_K=1, **dict(gemv, BLOCK_K=128))),
        (int4_linear.int4_w4a16_gemv_kernel, {"q_ptr": "*u8"},
         dict(GROUP=32, TILE_IN_GROUP=False, HAS_ZERO=True, HAS_BIAS=True, SPLIT_K=2, **dict(gemv, BLOCK_K=64))),
        (int4_linear.int4_w4a16_dot_kernel, {"q_ptr": "*u8", "x_ptr": "*bf16"},
         dict(GROUP=128, TILE_IN_GROUP=True, HAS_ZERO=True, HAS_BIAS=True, SPLIT_K=1, DOT_DTYPE=bf16, **tile)),
        (int4_linear.int4_w4a16_dot_kernel, {"q_ptr": "*u8"},
         dict(GROUP=32, TILE_IN_GROUP=False, HAS_ZERO=False, HAS_BIAS=False, SPLIT_K=2, DOT_DTYPE=f16, **tile)),
        (nm_linear.nm_gemv_kernel, {"v_ptr": "*u8"},
         dict(NSEL=2, MGRP=4, BITS=2, VKIND=2, VGROUP=128, TILE_IN_VGROUP=True, HAS_ZERO=False, HAS_BIAS=False,
              SPLIT_K=1, BLOCK_M=1, BLOCK_N=16, BLOCK_C=128)),
        (nm_linear.nm_gemv_kernel, {"v_ptr": "*fp16"},
         dict(NSEL=2, MGRP=4, BITS=2, VKIND=0, VGROUP=1, TILE_IN_VGROUP=False, HAS_ZERO=False, HAS_BIAS=True,
              SPLIT_K=1, BLOCK_M=1, BLOCK_N=16, BLOCK_C=128)),
        (nm_linear.nm_gemv_kernel, {"v_ptr": "*u8"},
         dict(NSEL=4, MGRP=8, BITS=4, VKIND=2, VGROUP=16, TILE_IN_VGROUP=False, HAS_ZERO=True, HAS_BIAS=True,
              SPLIT_K=2, BLOCK_M=2, BLOCK_N=16, BLOCK_C=64)),
        (nm_linear.nm_gemv_kernel, {"v_ptr": "*i8"},
         dict(NSEL=3, MGRP=32, BITS=8, VKIND=1, VGROUP=4096, TILE_IN_VGROUP=True, HAS_ZERO=False, HAS_BIAS=False,
              SPLIT_K=1, BLOCK_M=4, BLOCK_N=16, BLOCK_C=64)),
        (nm_linear.nm_dot_kernel, {"v_ptr": "*i8"},
         dict(NSEL=2, MGRP=4, M_P2=4, BITS=2, VKIND=1, VGROUP=2048, HAS_ZERO=False, HAS_BIAS=True, SPLIT_K=1,
              DOT_DTYPE=f16, BLOCK_M=64, BLOCK_N=64, BLOCK_G=16, GROUP_M=8)),
        (nm_linear.nm_dot_kernel, {"v_ptr": "*u8"},
         dict(NSEL=4, MGRP=8, M_P2=8, BITS=4, VKIND=2, VGROUP=128, HAS_ZERO=False, HAS_BIAS=False, SPLIT_K=2,
              DOT_DTYPE=bf16, BLOCK_M=16, BLOCK_N=64, BLOCK_G=8, GROUP_M=8)),
        (csr_linear.csr_spmm_kernel, {"v_ptr": "*i8"},
         dict(QUANTIZED=True, HAS_BIAS=True, BLOCK_M=1, BLOCK_NZ=128)),
        (_common.splitk_reduce_kernel, {}, dict(SPLIT_K=4, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=64)),
    ]
    if quick:
        seen = set()
        cases = [c for c in cases if not (c[0] in seen or seen.add(c[0]))]
    failures = 0
    for fn, types, consts in cases:
        sig = {a: "constexpr" if a in consts else {**ptr, **types}.get(a, "i32") for a in fn.arg_names}
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=4, num_stages=3, enable_fp_fusion=True))
            print(f"ok    {fn.__name__:26s} {time.perf_counter() - start:5.1f}s  "
                  f"shared={compiled.metadata.shared:6d}B  "
                  f"{ {k: v for k, v in consts.items() if not k.startswith('BLOCK')} }")
        except Exception as err:  # noqa: BLE001 - report every failing kernel, then exit non-zero
            failures += 1
            print(f"FAIL  {fn.__name__}: {type(err).__name__}: {str(err)[:2000]}")
    return failures


# -- correctness and timing -----------------------------------------------------------------------

def make_weight(name, n, k, device, small):
    import torch

    import sparseinfer as si

    fmt, params, zero_frac = KERNELS[name]
    if small:
        params = SMALL_PARAMS.get(name, params)
    g = torch.Generator(device="cpu").manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g)
    if zero_frac:
        w = w * (torch.rand(n, k, generator=g) >= zero_frac)
    return si.pack(w.to(device), fmt, **params)


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(names, shapes, batches, dtype, device, small) -> int:
    import torch

    import sparseinfer as si
    from sparseinfer.backends import reference_linear

    failures = 0
    for n, k in shapes:
        for name in names:
            w = make_weight(name, n, k, device, small)
            for m in batches:
                g = torch.Generator(device="cpu").manual_seed(m)
                x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
                bias = torch.randn(n, generator=g).to(device)
                start = time.perf_counter()
                y = si.linear(x, w, bias, backend="triton")
                err = rel_err(y, reference_linear(x, w, bias))
                ok = err <= TOL[str(dtype).split(".")[1]] and torch.isfinite(y).all()
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'}  {name:14s} N={n:5d} K={k:5d} M={m:3d}  rel err {err:.2e}  "
                      f"({time.perf_counter() - start:.2f}s)", flush=True)
    return failures


def baselines(w16, x, name):
    """{label: zero-arg callable} of PyTorch paths to compare with, where they exist here."""
    import torch
    import torch.nn.functional as F

    out = {"fp16 cuBLAS": lambda: F.linear(x, w16)}
    n, k = w16.shape
    if name.startswith("2:4"):
        try:
            from torch.sparse import to_sparse_semi_structured

            mask = torch.zeros_like(w16, dtype=torch.bool).view(n, -1, 4)
            mask[..., :2] = True  # any valid 2:4 pattern times the same
            ws = to_sparse_semi_structured(w16 * mask.view(n, k))
            F.linear(x, ws)
            out["torch 2:4 semi-structured"] = lambda: F.linear(x, ws)
        except Exception as err:  # noqa: BLE001 - report and go on: a missing baseline is not a failure
            print(f"      (torch 2:4 unavailable: {type(err).__name__}: {str(err)[:120]})")
    if name.startswith("int4"):
        try:
            xb = x.to(torch.bfloat16)
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=x.device)
            packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
            sz = torch.ones(k // 128, n, 2, dtype=torch.bfloat16, device=x.device)
            torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz)
            out["torch int4 tinygemm (bf16)"] = lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz)
        except Exception as err:  # noqa: BLE001
            print(f"      (torch int4 unavailable: {type(err).__name__}: {str(err)[:120]})")
    if name.startswith("int8"):
        try:
            q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=x.device)
            s = torch.ones(n, dtype=x.dtype, device=x.device)
            torch.ops.aten._weight_int8pack_mm(x, q, s)
            out["torch int8pack"] = lambda: torch.ops.aten._weight_int8pack_mm(x, q, s)
        except Exception as err:  # noqa: BLE001
            print(f"      (torch int8 unavailable: {type(err).__name__}: {str(err)[:120]})")
    return out


def timed(fn, graph: bool) -> float:
    import torch
    import triton.testing

    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=50)
        except Exception as err:  # noqa: BLE001 - e.g. a path that synchronises; fall back
            print(f"      (CUDA graph capture failed: {type(err).__name__}; timing with do_bench)")
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def bench(names, shapes, batches, dtype, graph: bool) -> list:
    import torch

    import sparseinfer as si
    from sparseinfer.backends import BACKENDS

    results = []
    print(f"\n{'shape NxK':>12s} {'M':>4s}  {'path':28s} {'ms':>9s} {'vs fp16':>8s} {'GB/s':>7s}")
    for n, k in shapes:
        for name in names:
            w = make_weight(name, n, k, "cuda", small=False)
            BACKENDS["triton"].prepack(w)  # what load() does, outside the timings
            w16 = w.to_dense(torch.float16)
            for m in batches:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                paths = {f"triton {name}": (lambda: si.linear(x, w, backend="triton"), w.nbytes)}
                for label, fn in baselines(w16, x.to(torch.float16), name).items():
                    paths[label] = (fn, n * k * 2 if label == "fp16 cuBLAS" else None)
                times = {label: timed(fn, graph) for label, (fn, _) in paths.items()}
                base = times["fp16 cuBLAS"]
                for label, (_, wbytes) in paths.items():
                    ms = times[label]
                    moved = (wbytes or 0) + m * k * x.element_size() + m * n * x.element_size()
                    gbs = f"{moved / ms / 1e6:7.0f}" if wbytes else "      -"
                    results.append((name, n, k, m, label, ms))
                    print(f"{n:>5d}x{k:<6d} {m:>4d}  {label:28s} {ms:9.4f} {base / ms:7.2f}x {gbs}", flush=True)
    return results


def check_targets(results) -> None:
    print("\nTargets (H100):")
    for name, batch, want in TARGETS:
        rows = [(n, k, ms) for (nm, n, k, m, label, ms) in results if nm == name and m == batch
                and label.startswith("triton")]
        for n, k, ms in rows:
            base = next(b for (nm, n2, k2, m, label, b) in results
                        if nm == name and (n2, k2, m) == (n, k, batch) and label == "fp16 cuBLAS")
            got = base / ms
            verdict = "PASS" if got >= want else "MISS"
            print(f"  {verdict}  {name:10s} M={batch:<3d} {n}x{k}: {got:.2f}x (want >= {want}x)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        # Must precede the first import of triton: Triton decides interpreter vs compiler when
        # it decorates its own library at import.
        os.environ["TRITON_INTERPRET"] = "1"
        args.small = True
    if args.compile_only:
        failures = compile_all(args.arch, args.quick)
        print(f"\n{'all kernels compiled' if not failures else f'{failures} kernel(s) failed to compile'} "
              f"for sm_{args.arch}")
        return 1 if failures else 0

    import torch

    names = args.kernels.split(",") if args.kernels else list(KERNELS)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise SystemExit(f"unknown kernels {unknown}; choose from {list(KERNELS)}")
    dtype = getattr(torch, args.dtype)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = SMALL_SHAPES if args.small else SHAPES
    batches = [int(b) for b in args.batches.split(",")] if args.batches else (
        SMALL_BATCHES if args.small else BATCHES)
    device = "cpu" if args.interpret else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: use --interpret --small (correctness on CPU) or --compile-only")

    print(f"correctness ({'Triton interpreter, CPU' if args.interpret else torch.cuda.get_device_name()}, "
          f"{args.dtype} activations):")
    failures = check(names, shapes, batches, dtype, device, args.small)
    if failures:
        print(f"\n{failures} correctness failure(s): not timing")
        return 1
    if args.interpret:
        print("\nall kernels match the reference (timings need a GPU)")
        return 0
    results = bench(names, shapes, batches, dtype, graph=not args.no_graph)
    check_targets(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
