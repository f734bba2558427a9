"""Instructions per call of a compressed layer's Python path, against nn.Linear: callgrind counts,
which a shared, noisy machine does not move (wall-clock timings of a 1-2 us difference do not
resolve there, bench/README.md).

    python bench/call_overhead.py                          # sparse50 (dense route), int8 (kernel), nn.Linear
    python bench/call_overhead.py --recipes 2:4 --calls 100 600

Each case runs twice in a child process under ``valgrind --tool=callgrind``, with the fewer and the
more calls of one small layer (64 x 64, 2 rows, in inference mode, one thread, no spinning thread
pools); the difference of the two totals over the difference of the calls is the cost of one call
(import, compression and first use cancel out). A child takes ~1.5 minutes under valgrind.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys


def child(recipe: str, calls: int) -> None:
    import torch

    import sparseinfer as si

    torch.manual_seed(0)
    torch.set_num_threads(1)
    si.set_threads(1)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64))
    if recipe != "nn.Linear":
        net = si.compress(net, recipe, progress=False)
    layer, x = net[0], torch.randn(1, 2, 64)
    gc.collect()
    gc.freeze()  # what import and compression left is never scanned again: collections cost the same in both runs
    with torch.inference_mode():
        for _ in range(calls):
            layer(x)


def instructions(recipe: str, calls: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0", SPARSEINFER_SPIN_US="0", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
                          "--child", recipe, str(calls)], env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run of {recipe} ({calls} calls) failed:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["sparse50", "int8"])
    ap.add_argument("--calls", nargs=2, type=int, default=[200, 1200], metavar=("FEW", "MANY"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("call_overhead.py needs valgrind (Debian / Ubuntu: apt-get install valgrind)")
    few, many = args.calls
    if many <= few:
        sys.exit(f"--calls: MANY ({many}) must exceed FEW ({few})")
    print("| layer | instructions per call |\n| --- | ---: |")
    for recipe in ["nn.Linear", *args.recipes]:
        per_call = (instructions(recipe, many) - instructions(recipe, few)) / (many - few)
        print(f"| {recipe} | {per_call:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
