"""`sparseinfer calibrate`: measure the CPU backend's dispatch choices on this machine and keep them."""

from __future__ import annotations

import sys

from sparseinfer import _native
from sparseinfer.backends import cpu_routes, cpu_tuning
from sparseinfer.backends.cpu import set_threads


def register(sub):
    p = sub.add_parser("calibrate", help="measure the CPU kernels' batch limits and kernel / dense routes here",
                       description="Time each CPU kernel family's kernels against each other over batch sizes "
                                   "(GEMV vs GEMM limits), each family against the dense fallback and CSR against "
                                   "dense, print the result next to the built-in choices, and store it in the user "
                                   "cache (~/.cache/"
                                   "sparseinfer, or $SPARSEINFER_CACHE_DIR), where the cpu backend picks it up. "
                                   "Takes a minute or two; run it on a quiet machine.")
    p.add_argument("--threads", type=int, default=None,
                   help="threads the kernels use (default: si.set_threads / SPARSEINFER_NUM_THREADS, else torch's)")
    p.add_argument("--size", type=int, default=1024, help="N = K of the timed weights (default 1024, at least 256)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, store nothing")
    p.set_defaults(func=_run)


def _run(args) -> int:
    _native.require_native()
    if args.size < 256:  # int4 groups of 128, 2:4+int4 groups of 64 kept values
        raise ValueError(f"--size must be at least 256, got {args.size}")
    if args.threads:
        set_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say(f"calibrating for {cpu_tuning.machine_key()}")
    entry = cpu_tuning.calibrate(n=args.size, k=args.size, progress=lambda m: say(f"  timing {m}"))
    print(f"batch limits on {entry['machine']} (kernel: built-in -> measured):")
    for name in sorted(entry["limits"]):
        print(f"  {name:32s} {entry['shipped'].get(name, '?'):>4} -> {entry['limits'][name]}")
    cpu_tuning.apply(entry)  # the routes compare the dense paths with the kernels these limits select
    try:
        rules = cpu_routes.calibrate_rules(args.size, args.size, progress=lambda m: say(f"  kernel vs dense: {m}"))
    finally:
        if args.dry_run:
            for r in _native._C.kernel_table():
                _native._C.set_batch_limit(r["name"], -1)
            cpu_tuning.apply()  # what was stored before
    print("dense fallback from batch (family/act):", rules["dense_from"] or "never")
    print("CSR / dense crossover densities (family/act: {batch: density}):")
    for kind, points in sorted(rules["csr_crossover"].items()):
        print(f"  {kind:16s} {points}")
    if args.dry_run:
        return 0
    entry["rules"] = {"dense_from": rules["dense_from"], "csr_crossover": rules["csr_crossover"]}
    path = cpu_tuning.save({**entry, "routes": rules["routes"]})
    cpu_routes.reset()
    print(f"stored in {path}")
    return 0
