"""N:M and CSR CPU kernels against PyTorch and peers, with roofline fractions, in one run.

    python bench/cpu_sparse_roofline.py                 # 4096 x 4096: batch 1 cold, batch 64 hot
    python bench/cpu_sparse_roofline.py --quick         # 1024 x 1024, few rounds (a smoke run)

What runs (N x K weight ``randn * 0.05``; CSR = the same weight with the 90% smallest of each row
zeroed; every provider on ``--threads`` threads, 2 by default):

    torch fp32          F.linear on the dense fp32 weight                                  (baseline)
    torch int8 dyn      quantized::linear_dynamic (FBGEMM, per-channel int8, 7-bit dynamic activations)
    ORT int4            onnxruntime MatMulNBits, 4 bits, block 128, accuracy_level 4 (int8 activations),
                        session.intra_op.allow_spinning = 0 (when onnxruntime is installed)
    torch csr90         torch.sparse_csr_tensor (W @ x.T).T on the 90%-sparse weight
    si <fmt> [act]      sparseinfer._C.linear on the packed weight; act = fp32 (exact) or int8 (the
                        activation-quantized mode of N:M + int8 / int4, csrc/README.md)

Cold = the weight comes from memory: each call uses the next of enough copies to cover
max(2 x L3, 64 MiB). Hot = one copy, called repeatedly. Providers are interleaved within each
round, so load from other processes hits all of them alike; times are medians over rounds.
``roof`` = (packed weight bytes / measured copy bandwidth) / time: the fraction of the memory
roofline reached (batch-1 cold rows only; hot weights come from cache). Every provider's output is
checked against the exact product of the weight it multiplies by before timing (1e-4 exact,
5e-2 with quantized activations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.apps import benchmarking as sb
from sparseinfer.backends import cpu_tuning
from sparseinfer.backends.cpu import build_native_weight
from sparseinfer.formats import from_parts

TOL_EXACT, TOL_INT8_ACT = 1e-4, 5e-2
SPARSITY = 0.9


# -- weights and providers ----------------------------------------------------------------------------

def dense_weight(n, k):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k)) * 0.05


def pruned(w):
    idx = w.abs().argsort(dim=1, stable=True)[:, : int(round(SPARSITY * w.shape[1]))]
    return w.clone().scatter_(1, idx, 0.0)


class Provider:
    """name, packed bytes, the weight it multiplies by, a tolerance, make() -> one copy, call(x, copy)."""

    def __init__(self, name, nbytes, w_eff, tol, make, call, prepare=lambda x: x, kernel=""):
        self.name, self.nbytes, self.w_eff, self.tol = name, nbytes, w_eff, tol
        self.make, self.call, self.prepare, self.kernel = make, call, prepare, kernel


def ort_int4(w, threads):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    n, k = w.shape
    p = si.pack(w, "int4", group_size=128)  # symmetric: zero point 8, MatMulNBits' default
    blocks = p.qweight.shape[1] // 64
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=128, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(p.qweight.reshape(n, blocks, 64).numpy(), "B"),
                               numpy_helper.from_array(p.scale.reshape(-1).numpy(), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)]).SerializeToString()

    def make():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    return Provider("ORT int4 (MatMulNBits, acc 4)", n * k // 2 + n * blocks * 2 * 4, p.to_dense(), TOL_INT8_ACT, make,
                    lambda x, s: torch.from_numpy(s.run(None, {"x": x})[0]), prepare=lambda x: x.numpy(),
                    kernel="onnxruntime MatMulNBits")


def torch_int8_dynamic(w):
    n, k = w.shape
    make, call, w_eff = sb.fbgemm_int8(w)
    return Provider("torch int8 dyn (FBGEMM)", n * k + 8 * n, w_eff, TOL_INT8_ACT, make, call,
                    kernel="quantized::linear_dynamic")


def torch_csr(wp):
    nnz = int((wp != 0).sum())

    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return wp.to_sparse_csr()

    return Provider("torch csr90", (wp.shape[0] + 1) * 8 + nnz * 12, wp, TOL_EXACT, make, lambda x, c: (c @ x.T).T,
                    kernel="torch.sparse_csr matmul")


def si_provider(label, w, fmt, params, act, threads, batch):
    C = _native.require_native()
    p = si.pack(w, fmt, **params)
    first = iter([p])

    def make():
        q = next(first, None) or from_parts(p.fmt, {k: t.clone() for k, t in p.tensors().items()}, p.shape, p.params())
        return build_native_weight(q)

    def call(x, h):
        out = torch.empty(x.shape[0], p.shape[0])
        C.linear(x, h, out, None, num_threads=threads, act=act)
        return out

    kernel = C.kernel_name(build_native_weight(p), batch, act=act)
    return Provider(f"si {label}" + (" [int8 act]" if act == "int8" else ""), p.nbytes, p.to_dense(),
                    TOL_INT8_ACT if act == "int8" else TOL_EXACT, make, call, kernel=kernel)


def providers(n, k, threads, batch, quick):
    w = dense_weight(n, k)
    wp = pruned(w)
    out = [Provider("torch fp32", n * k * 4, w, TOL_EXACT, lambda: w.clone(), F.linear, kernel="F.linear")]
    out.append(torch_int8_dynamic(w))
    ort = ort_int4(w, threads)
    if ort is not None:
        out.append(ort)
    out.append(torch_csr(wp))
    g128 = {"group_size": 128}
    for label, fmt, params, acts in [("2:4", "2:4", {}, ["fp32"]), ("2:4+int8", "2:4+int8", {}, ["fp32", "int8"]),
                                     ("2:4+int4-g128", "2:4+int4", g128, ["fp32", "int8"]),
                                     ("int8", "int8", {}, ["int8"]), ("int4-g128", "int4", g128, ["int8"])]:
        for act in acts:
            out.append(si_provider(label, w, fmt, params, act, threads, batch))
    for label, fmt in [("csr90", "csr"), ("csr90+int8", "csr+int8")]:
        out.append(si_provider(label, wp, fmt, {}, "fp32", threads, batch))
    return out


# -- timing ----------------------------------------------------------------------------------------

def run_case(provs, n, k, batch, mode, rounds, hot_reps):
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch))
    rows = []
    copies = {}
    for p in provs:
        count = 1 if mode == "hot" else sb.cold_copies(p.nbytes)
        copies[p.name] = [p.make() for _ in range(count)]
        xin = p.prepare(x)
        y = p.call(xin, copies[p.name][0])
        ref = x.double() @ p.w_eff.double().T
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err <= p.tol, f"{p.name} batch {batch}: relative error {err:.2e} > {p.tol:.0e}"
        rows.append({"provider": p.name, "kernel": p.kernel, "bytes": p.nbytes, "rel_err": err, "times": []})
    for _ in range(rounds):
        for p, row in zip(provs, rows):
            xin = p.prepare(x)
            ws = copies[p.name]
            for wc in ws if mode == "cold" else ws * hot_reps:
                t = time.perf_counter()
                p.call(xin, wc)
                row["times"].append(time.perf_counter() - t)
    for row in rows:
        row["median_s"] = statistics.median(row["times"])
        del row["times"]
    copies.clear()
    return {"n": n, "k": k, "batch": batch, "mode": mode, "rows": rows}


def report(case, bw):
    rows = case["rows"]
    base = {r["provider"]: r["median_s"] for r in rows}
    peers = ["torch fp32", "torch int8 dyn (FBGEMM)", "ORT int4 (MatMulNBits, acc 4)", "torch csr90"]
    peers = [p for p in peers if p in base]
    print(f"\n### {case['n']}x{case['k']}, batch {case['batch']}, {case['mode']}\n")
    head = ["what", "kernel", "MiB", "median", "GB/s", "roof"] + [f"vs {p.split(' (')[0]}" for p in peers]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        t = r["median_s"]
        roof = (r["bytes"] / (bw["copy_gbps"] * 1e9)) / t if case["mode"] == "cold" else None
        cells = [r["provider"], r["kernel"], f"{r['bytes'] / 2**20:.1f}", f"{t * 1e6:.0f} µs",
                 f"{r['bytes'] / t / 1e9:.1f}", "—" if roof is None else f"{roof:.0%}"]
        cells += [f"{base[p] / t:.2f}×" for p in peers]
        print("| " + " | ".join(cells) + " |")


def targets(cases):
    def t(case, name):
        return next((r["median_s"] for r in case["rows"] if r["provider"] == name), None)

    print("\n### Targets\n")
    for case in cases:
        b, mode = case["batch"], case["mode"]
        checks = [("si 2:4+int8 [int8 act]", "torch int8 dyn (FBGEMM)", 1.5),
                  ("si 2:4+int4-g128 [int8 act]", "ORT int4 (MatMulNBits, acc 4)", 1.5),
                  ("si csr90+int8", "torch csr90", 3.0),
                  ("si 2:4", "torch fp32", 64 / 34.0)]
        for ours, peer, want in checks:
            a, p = t(case, ours), t(case, peer)
            if a and p:
                ok = "met" if p / a >= want else "missed"
                print(f"- batch {b} {mode}: {ours} vs {peer}: {p / a:.2f}× (target {want:.2f}×: {ok})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--hot-reps", type=int, default=3)
    ap.add_argument("--batches", default="1:cold,64:hot", help="comma list of batch:mode")
    ap.add_argument("--quick", action="store_true", help="1024 x 1024, 3 rounds")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    if args.quick:
        args.n = args.k = 1024
        args.rounds = 3
    torch.set_num_threads(args.threads)
    C = _native.require_native()
    print(f"# sparseinfer CPU sparse kernels: {cpu_tuning.cpu_model()}, ISA {C.active_isa()}, "
          f"{args.threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    bw = sb.measure_bandwidth(256 << 20 if not args.quick else 64 << 20, 5)
    print(f"memory: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s (read + write bytes); "
          f"L3 {sb.l3_cache_bytes() >> 20} MiB, cold rotation over >= {sb.cold_bytes_target() >> 20} MiB")
    cases = []
    for spec in args.batches.split(","):
        batch, mode = spec.split(":")
        provs = providers(args.n, args.k, args.threads, int(batch), args.quick)
        case = run_case(provs, args.n, args.k, int(batch), mode, args.rounds, args.hot_reps)
        cases.append(case)
        report(case, bw)
    targets(cases)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bw, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
