"""What the weight-lifetime check (csrc/README.md) adds to a call: ``_C.Weight.current`` runs exactly
the check every ``_C.linear`` makes (a ``data_ptr()`` and a ``_version`` read per source tensor),
timed next to the whole call it belongs to, on a small weight (where per-call costs show) and a large
one, one thread, medians over interleaved rounds.

    flock /work/bench.lock python bench/weight_check_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends.cpu import build_native_weight


def per_call_ns(fns: dict, calls: int, rounds: int = 15) -> dict:
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e9)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    C = _native.require_native()
    torch.set_num_threads(1)
    print(f"ISA {C.active_isa()}, 1 thread")
    print("| weight | sources | check | whole _C.linear (batch 1) | share |")
    print("| --- | --- | --- | --- | --- |")
    for fmt, (n, k) in [("int8", (64, 64)), ("2:4+int8", (64, 64)), ("csr+int8", (64, 64)), ("int8", (4096, 4096))]:
        w = si.pack(torch.randn(n, k), fmt)
        h = build_native_weight(w)
        x, out = torch.randn(1, k), torch.empty(1, n)
        t = per_call_ns({"base": lambda: h.fmt, "check": lambda: h.current,
                         "call": lambda: C.linear(x, h, out, None, 1)}, 20000 if n == 64 else 200)
        check = t["check"] - t["base"]  # the property call itself, subtracted
        print(f"| {fmt} {n}x{k} | {len(w.tensors())} | {check:.0f} ns | {t['call'] / 1e3:.2f} us | "
              f"{100 * check / t['call']:.2f} % |")


if __name__ == "__main__":
    main()
