"""Measure the built-in dispatch rules of the active ISA (sparseinfer/backends/cpu_routes.json).

    python bench/cpu_dispatch_rules.py                  # measure and print (about a minute)
    python bench/cpu_dispatch_rules.py --write          # ... and store them as the active ISA's table
    SPARSEINFER_ISA=avx2 python bench/cpu_dispatch_rules.py --write

The same measurement as `sparseinfer calibrate` (cpu_routes.calibrate_rules: every format family,
per activation class and batch, the packed kernel against the dense fallback, and CSR at two
densities against dense) on --size x --size weights, with the built-in batch limits. With --write
the table records the command, the time, the machine key it was measured on and the raw timings;
machines with that key then take the rules without measuring on first use (--known); others
measure each layer shape on first use and use the rules only past their measuring budget.
Run it under the bench lock on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from sparseinfer import _native
from sparseinfer.backends import cpu_routes, cpu_tuning


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="N = K of the timed weights (default 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="store the rules as the active ISA's built-in table")
    ap.add_argument("--known", action="store_true",
                    help="with --write: list this machine key in measured_on (no first-use measuring here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    C = _native.require_native()
    isa, key = C.active_isa(), cpu_tuning.machine_key()
    print(f"# {key}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.time()
    rules = cpu_routes.calibrate_rules(args.size, args.size, progress=lambda m: print(f"  {m}", file=sys.stderr))
    print("dense_from:", json.dumps(rules["dense_from"], sort_keys=True))
    print("csr_crossover:", json.dumps(rules["csr_crossover"], sort_keys=True))
    if not args.write:
        return 0
    data = json.loads(cpu_routes.TABLE_PATH.read_text())
    command = " ".join(["python bench/cpu_dispatch_rules.py", *sys.argv[1:]])
    if os.environ.get("SPARSEINFER_ISA"):
        command = f"SPARSEINFER_ISA={os.environ['SPARSEINFER_ISA']} " + command
    data["isa"][isa] = {
        "source": f"{command} on {key}, {time.strftime('%Y-%m-%d %H:%M')} UTC, {time.time() - t0:.0f} s, "
                  f"load average {os.getloadavg()[0]:.2f}",
        "measured_on": [key] if args.known else [],
        "dense_from": rules["dense_from"], "csr_crossover": rules["csr_crossover"],
        "times": {k: {p: round(t, 7) for p, t in r["times"].items()} for k, r in sorted(rules["routes"].items())},
    }
    cpu_routes.TABLE_PATH.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {cpu_routes.TABLE_PATH} [{isa}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
