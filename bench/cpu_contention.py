"""Small calls when the cores are shared: each case at M = 1 with the machine quiet and with a
competing busy process, best and median of --calls calls, against torch fp32 F.linear.

    flock /work/bench.lock python bench/cpu_contention.py                 # quiet and loaded phases
    python bench/cpu_contention.py --competitor torch                     # the competitor: torch GEMMs
                                                                           # on 2 threads (default: one spin loop)

The phases alternate (quiet, loaded, quiet, loaded, ...) and each case's calls are interleaved
with the dense ones, so drift from other processes hits all alike. It prints per case the median
and best call in microseconds and the ratio to dense (median), per phase.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import sparseinfer as si

CASES = [("1536x384", "2:4+int8", {}), ("384x1536", "int8", {}), ("384x1536", "int4", {"group_size": 128}),
         ("384x384", "int8", {}), ("768x3072", "int4", {"group_size": 128}), ("4096x4096", "int8", {})]
COMPETITORS = {
    "spin": "while True: pass",
    "torch": "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def run_phase(cases, calls: int, act: str) -> dict:
    out = {}
    for label, w, dense, x in cases:
        si.linear(x, w, act=act), F.linear(x, dense)  # warm-up (routes, layouts)
        ts, td = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            si.linear(x, w, act=act)
            t1 = time.perf_counter()
            F.linear(x, dense)
            t2 = time.perf_counter()
            ts.append(t1 - t0), td.append(t2 - t1)
        out[label] = (statistics.median(ts), min(ts), statistics.median(td), min(td))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--phases", type=int, default=2, help="quiet/loaded pairs")
    ap.add_argument("--competitor", choices=sorted(COMPETITORS), default="spin")
    ap.add_argument("--act", default="auto")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape, fmt, params in CASES:
        n, k = map(int, shape.split("x"))
        w = si.pack(torch.randn(n, k, generator=g), fmt, **params)
        cases.append((f"{fmt} {shape}", w, w.to_dense(), torch.randn(1, k, generator=g)))
    print(f"# {si.backends()['cpu']['detail']}\n# torch threads {torch.get_num_threads()}, competitor "
          f"{args.competitor!r}, load average {os.getloadavg()[0]:.2f}, act={args.act}", flush=True)
    results = {"quiet": [], "loaded": []}
    for _ in range(args.phases):
        results["quiet"].append(run_phase(cases, args.calls, args.act))
        comp = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]])
        try:
            time.sleep(0.5)
            results["loaded"].append(run_phase(cases, args.calls, args.act))
        finally:
            comp.kill()
            comp.wait()
    print(f"{'case':22s} {'phase':6s} {'si median':>10s} {'si best':>8s} {'dense med':>10s} {'med ratio':>9s}")
    for label, *_ in cases:
        for phase, runs in results.items():
            med = statistics.median(r[label][0] for r in runs)
            best = min(r[label][1] for r in runs)
            dmed = statistics.median(r[label][2] for r in runs)
            print(f"{label:22s} {phase:6s} {med * 1e6:10.1f} {best * 1e6:8.1f} {dmed * 1e6:10.1f} {dmed / med:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
