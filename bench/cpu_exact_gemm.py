"""Exact-mode (act="fp32") packed kernels against torch fp32 (MKL / oneDNN sgemm), one layer call.

    flock /work/bench.lock python bench/cpu_exact_gemm.py                       # the issue-12 grid
    flock /work/bench.lock python bench/cpu_exact_gemm.py --threads 1 --formats int8 --shapes 384x384
    flock /work/bench.lock python bench/cpu_exact_gemm.py --formats 2:4 --batches 16,64,256 --candidates --fallback

Per point: ``_C.linear(x, W, act="fp32")`` on the kernel the table selects (named in the output;
with --candidates, every kernel of ``_C.kernel_candidates``, measured-only rows included, one line
each; with --fallback also cpu_routes' dense fallback with tiles dequantized per call) and
``F.linear(x, W_dense)`` on the same values in fp32, interleaved (``--rounds`` rounds, best of each),
hot weights, the same thread count for both. Shapes are N x K. Prints a markdown table: speed =
dense time / ours (> 1: ours faster). Kernel speed only: si.linear's routing (which takes the
dense fallback where that is faster) is the dispatch sweep's business (test_bench_sweep.py).
"""

from __future__ import annotations

import argparse
import time

import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import cpu_routes
from sparseinfer.backends.cpu import build_native_weight

PARAMS = {"int8": ("int8", {}), "int4-g64": ("int4", {"group_size": 64}), "int4-g128": ("int4", {"group_size": 128}),
          "2:4": ("2:4", {}), "2:4+int8": ("2:4+int8", {}), "2:4+int4-g64": ("2:4+int4", {"group_size": 64})}


def best_of(fn, budget: float) -> float:
    fn()
    start, best, n = time.perf_counter(), float("inf"), 0
    while n < 3 or (time.perf_counter() - start < budget and n < 50):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int8,int4-g64,2:4,2:4+int8,2:4+int4-g64")
    ap.add_argument("--shapes", default="4096x4096,384x384,1536x384,384x1536", help="N x K, comma-separated")
    ap.add_argument("--batches", default="16,64,256,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default=None, help="an ISA of _C.available_isas() (default: the active one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.1, help="seconds per provider and round")
    ap.add_argument("--candidates", action="store_true", help="time every kernel of _C.kernel_candidates")
    ap.add_argument("--fallback", action="store_true", help="also time the dense fallback (tiles dequantized per call)")
    args = ap.parse_args()
    C = _native.require_native()
    torch.set_num_threads(args.threads)
    isa = args.isa or C.active_isa()
    g = torch.Generator().manual_seed(0)
    print(f"ISA {isa}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| shape | format | M | torch fp32 ms | ours ms | speed | kernel |\n| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        dense = torch.randn(n, k, generator=g)
        for name in args.formats.split(","):
            fmt, params = PARAMS[name]
            w = si.pack(dense, fmt, **params)
            h, wf = build_native_weight(w), w.to_dense(torch.float32)
            for m in map(int, args.batches.split(",")):
                x = torch.randn(m, k, generator=g)
                out = torch.empty(m, n)
                kernels = C.kernel_candidates(h, m, isa, "fp32") if args.candidates else [C.kernel_name(h, m, isa, "fp32")]
                runs = {"torch": lambda x=x, wf=wf: torch.nn.functional.linear(x, wf)}
                for kname in kernels:
                    runs[kname] = lambda x=x, h=h, out=out, kname=kname: C.linear(x, h, out, None, args.threads, isa,
                                                                                  "fp32", kname)
                if args.fallback:
                    runs["dense fallback, tiles per call"] = lambda x=x, w=w: cpu_routes.tiled_linear(x, w, None)
                best = dict.fromkeys(runs, float("inf"))
                for _ in range(args.rounds):
                    for rname, fn in runs.items():
                        best[rname] = min(best[rname], best_of(fn, args.budget))
                for rname in list(runs)[1:]:
                    print(f"| {n}x{k} | {name} | {m} | {best['torch'] * 1e3:.3f} | {best[rname] * 1e3:.3f} | "
                          f"{best['torch'] / best[rname]:.2f} | {rname} |", flush=True)

if __name__ == "__main__":
    main()
