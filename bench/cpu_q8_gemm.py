"""The int8-activation GEMM (issue 12, item 1) against torch fp32 and FBGEMM at GEMM batch sizes, in one run.

    python bench/cpu_q8_gemm.py                        # 4096^2 + MiniLM / BERT shapes, M = 16, 64, 256 (~2 min)
    python bench/cpu_q8_gemm.py --shapes 384x384 --batches 64 --rounds 5

Standalone script (not collected by pytest). 2 threads; every point times its providers in interleaved
rounds (torch fp32 ``F.linear``, FBGEMM dynamic int8 (``sparseinfer.apps.benchmarking.fbgemm_int8``), and
``sparseinfer._C.linear(act="int8")`` on int8 (per channel), int4-g128, 2:4+int8 and 2:4+int4-g64
weights), hot weights, best of the rounds. Where the CPU has AMX, every format also runs its AVX-512
VNNI kernel (named), for the "x VNNI" ratio; else, where it has AVX-512 VNNI, every format also runs
the VNNI kernel's other register tile (4 x 64, a measured candidate: "x the 4x4 tile"), and 2:4+int8 /
2:4+int4 the AVX2 level (the register-gather N:M kernels), which is what they ran before the dense row tiles.
Prints one markdown table: time per call and speed vs torch fp32 (and vs FBGEMM for int8)."""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.apps import benchmarking as sb
from sparseinfer.backends.cpu import build_native_weight
from sparseinfer.backends.cpu_routes import time_interleaved

THREADS = 2
FORMATS = {"int8": {}, "int4-g128": {"group_size": 128}, "2:4+int8": {}, "2:4+int4-g64": {"group_size": 64}}
VNNI_KERNELS = {"int8": "int8_q8_gemm_vnni_avx512", "int4-g128": "int4_q8_gemm_vnni_avx512",
                "2:4+int8": "nm_int8_q8_tiles_vnni_avx512", "2:4+int4-g64": "nm_int4_q8_tiles_vnni_avx512"}
TILE4X4_KERNELS = {f: k.replace("_vnni_", "_vnni4x4_") for f, k in VNNI_KERNELS.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,384x384,1536x384,384x1536", help="NxK,... (out x in)")
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    C = _native.require_native()
    vnni = "avx512" in C.available_isas() and C.cpu_features().get("avx512_vnni")
    amx = vnni and C.cpu_features().get("amx_int8")
    print(f"ISA {C.active_isa()} (available {C.available_isas()}), features {C.cpu_features()}, {THREADS} threads, "
          f"best of {args.rounds} interleaved rounds")
    print("\n| N×K | M | torch fp32 | FBGEMM int8 | " + " | ".join(f"{f} act=int8" for f in FORMATS) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in FORMATS) + " |")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, generator=g) * 0.02
        make, call_fbgemm, _ = sb.fbgemm_int8(w)
        fb = make()
        handles = {}
        for f, params in FORMATS.items():
            handles[f] = build_native_weight(si.pack(w, f.split("-g")[0], **params))
        for m in (int(v) for v in args.batches.split(",")):
            x = torch.randn(m, k, generator=g)
            out = torch.empty(m, n)
            fns = {"fp32": lambda x=x, w=w: F.linear(x, w), "fbgemm": lambda x=x, fb=fb, f=call_fbgemm: f(x, fb)}
            for f, h in handles.items():
                fns[f] = lambda h=h, x=x, out=out: C.linear(x, h, out, None, num_threads=THREADS, act="int8")
                if amx:
                    fns[f + "@vnni"] = lambda h=h, x=x, out=out, k=VNNI_KERNELS[f]: C.linear(
                        x, h, out, None, num_threads=THREADS, act="int8", kernel=k)
                elif vnni:
                    fns[f + "@4x4"] = lambda h=h, x=x, out=out, k=TILE4X4_KERNELS[f]: C.linear(
                        x, h, out, None, num_threads=THREADS, act="int8", kernel=k)
                if vnni and not amx and f.startswith("2:4"):
                    fns[f + "@avx2"] = lambda h=h, x=x, out=out: C.linear(x, h, out, None, num_threads=THREADS,
                                                                          isa="avx2", act="int8")
            t = time_interleaved(fns, args.rounds, math.inf)
            cells = []
            for f, h in handles.items():
                cell = f"{t[f] * 1e6:,.0f} µs = {t['fp32'] / t[f]:.2f}×"
                if f == "int8":
                    cell += f" ({t['fbgemm'] / t[f]:.2f}× FBGEMM)"
                if f + "@vnni" in t:
                    cell += f" ({t[f + '@vnni'] / t[f]:.2f}× VNNI)"
                if f + "@4x4" in t:
                    cell += f" ({t[f + '@4x4'] / t[f]:.2f}× the 4x4 tile)"
                if f + "@avx2" in t:
                    cell += f" ({t[f + '@avx2'] / t[f]:.1f}× the AVX2 N:M kernel)"
                cell += f" `{C.kernel_name(h, m, act='int8')}`" if m == 64 else ""
                cells.append(cell)
            print(f"| {n}×{k} | {m} | {t['fp32'] * 1e6:,.0f} µs | {t['fbgemm'] * 1e6:,.0f} µs = "
                  f"{t['fp32'] / t['fbgemm']:.2f}× | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
