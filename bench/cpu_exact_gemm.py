"""Exact-mode (act="fp32") packed kernels against torch fp32 (MKL / oneDNN sgemm), one layer call.

    flock /work/bench.lock python bench/cpu_exact_gemm.py                       # the issue-12 grid
    flock /work/bench.lock python bench/cpu_exact_gemm.py --threads 1 --formats int8 --shapes 384x384

Per point: ``_C.linear(x, W, act="fp32")`` on the kernel the table selects (named in the output)
and ``F.linear(x, W_dense)`` on the same values in fp32, interleaved (``--rounds`` rounds, best
of each), hot weights, the same thread count for both. Shapes are N x K. Prints a markdown table:
speed = dense time / ours (> 1: ours faster). ``--without ROW[,ROW]`` also times, in the same
interleaved rounds, the call with those table rows disabled (``_C.set_batch_limit(row, 0)``, restored
after each timing): the kernel the table would pick without them, e.g. ``--isa avx2 --formats 2:4
--without nm_gemv_avx2,nm_gemm_avx2`` times the N:M panel kernel next to the sparse-aware one.
Kernel speed only: si.linear's routing (which takes the dense fallback where that is faster) is the
dispatch sweep's business (test_bench_sweep.py).
"""

from __future__ import annotations

import argparse
import time

import torch

import sparseinfer as si
from sparseinfer import _native
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
    ap.add_argument("--without", default="", help="table rows to disable for a third column (comma-separated)")
    ap.add_argument("--budget", type=float, default=0.1, help="seconds per provider and round")
    args = ap.parse_args()
    C = _native.require_native()
    torch.set_num_threads(args.threads)
    isa = args.isa or C.active_isa()
    g = torch.Generator().manual_seed(0)
    without = [r for r in args.without.split(",") if r]
    limits = {r["name"]: r["max_m"] for r in C.kernel_table(isa)}
    unknown = [r for r in without if r not in limits]
    if unknown:
        raise SystemExit(f"--without: no row named {unknown} in the {isa} table")

    def time_without(fn):
        for r in without:
            C.set_batch_limit(r, 0)
        try:
            return best_of(fn, args.budget)
        finally:
            for r in without:
                C.set_batch_limit(r, limits[r])

    print(f"ISA {isa}, {args.threads} thread(s), torch {torch.__version__}\n")
    head = "| shape | format | M | torch fp32 ms | ours ms | speed | kernel |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: | --- |"
    if without:
        head += " without ms | speed | kernel | ours / without |"
        rule += " ---: | ---: | --- | ---: |"
    print(head + "\n" + rule)
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
                t_dense = t_ours = t_without = float("inf")
                run_dense = lambda x=x, wf=wf: torch.nn.functional.linear(x, wf)
                run_ours = lambda x=x, h=h, out=out: C.linear(x, h, out, None, args.threads, isa, "fp32")
                for _ in range(args.rounds):
                    t_dense = min(t_dense, best_of(run_dense, args.budget))
                    t_ours = min(t_ours, best_of(run_ours, args.budget))
                    if without:
                        t_without = min(t_without, time_without(run_ours))
                kernel = C.kernel_name(h, m, isa=isa, act="fp32")
                line = (f"| {n}x{k} | {name} | {m} | {t_dense * 1e3:.3f} | {t_ours * 1e3:.3f} | "
                        f"{t_dense / t_ours:.2f} | {kernel} |")
                if without:
                    for r in without:
                        C.set_batch_limit(r, 0)
                    other = C.kernel_name(h, m, isa=isa, act="fp32")
                    for r in without:
                        C.set_batch_limit(r, limits[r])
                    line += (f" {t_without * 1e3:.3f} | {t_dense / t_without:.2f} | {other} |"
                             f" {t_without / t_ours:.2f} |")
                print(line, flush=True)


if __name__ == "__main__":
    main()
