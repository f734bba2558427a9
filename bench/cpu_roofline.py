"""Roofline check of the dense-quantized CPU kernels against torch and the peers, in one run.

    python bench/cpu_roofline.py                 # ~2-4 minutes on 2 cores
    python bench/cpu_roofline.py --quick         # fewer rounds, smaller cold rotation (smoke)

Standalone script (not collected by pytest). Everything runs with 2 threads and is measured in
interleaved rounds (provider A, B, C, A, B, C, ...), reporting medians, so that the ratios of one run
hold even on a machine shared with other work; absolute numbers move with the load.

Measured, for a 4096 x 4096 weight:

* batch 1 COLD: each provider rotates through copies of its weight totalling at least
  max(4 x L3, 256 MiB), so every call streams its weight from DRAM;
* batch 64 HOT: one weight, compute-bound.

Providers: torch fp32 ``F.linear``; torch dynamic int8 (``quantized::linear_dynamic`` on a
per-channel int8 weight: FBGEMM, 7-bit activations, ``sparseinfer.apps.benchmarking.fbgemm_int8``);
ONNX Runtime ``MatMulNBits`` int4
(block 128, accuracy_level 4 = int8 activations; com.microsoft domain, 2 intra-op threads, no
spinning); sparseinfer int8 (per-channel) and int4-g128 through ``sparseinfer._C.linear`` in both
activation modes (``act="int8"``: x quantized per call, integer dot products; ``act="fp32"``: exact), and
2:4+int8 / 2:4+int4-g64 with act="int8".

Roofline: the packed bytes a call must read (codes + scales, what the kernel streams) divided by
the copy bandwidth measured in the same rounds (``torch`` copy of 256 MiB, read + write bytes);
"roofline fraction" = roofline time / measured time (1.0 = at the bandwidth limit).

Last, 768 x 768 int4-g128 batch 1 HOT per-call time through ``_C.linear``, ``si.linear`` and a
``CompressedLinear`` module, with where the Python time goes.
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import statistics
import time
from pathlib import Path


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparseinfer as si  # noqa: E402
from sparseinfer import _native  # noqa: E402
from sparseinfer.apps import benchmarking as sb  # noqa: E402
from sparseinfer.backends import BACKENDS  # noqa: E402
from sparseinfer.formats import from_parts  # noqa: E402

THREADS = 2
N = K = 4096
MIN_COLD = 256 << 20


# -- machine ---------------------------------------------------------------------------------------

def l3_bytes() -> int:
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu*/cache/index*"):
        try:
            if Path(index, "level").read_text().strip() == "3":
                text = Path(index, "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
                sizes.append(int(text.rstrip("KM")) * mult)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else 32 << 20


class Copy:
    """Copy bandwidth probe: one 256 MiB torch copy per call (read + write bytes)."""

    def __init__(self, nbytes: int = 256 << 20):
        self.src = torch.ones(nbytes // 4)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * nbytes

    def __call__(self):
        self.dst.copy_(self.src)


class Read:
    def __init__(self, nbytes: int = 256 << 20):
        self.src = torch.ones(nbytes // 4)
        self.bytes = nbytes

    def __call__(self):
        self.src.sum()


# -- providers -------------------------------------------------------------------------------------
# Each: name, bytes (what one call must read), copies (weights to rotate through), call(i) runs copy i.

class Provider:
    """check() returns the output of copy 0; w_eff is the weight the provider really multiplies by
    (dequantized), to separate weight quantization from activation quantization in the errors."""

    def __init__(self, name, nbytes, fns, check=None, w_eff=None):
        self.name, self.bytes, self.fns, self.check, self.w_eff = name, nbytes, fns, check, w_eff
        self.times: list[float] = []


def n_copies(nbytes: int, cold: bool, quick: bool) -> int:
    if not cold:
        return 1
    target = max(4 * l3_bytes(), MIN_COLD) if not quick else 48 << 20
    return max(2, -(-target // nbytes))


def torch_fp32(w, x, cold, quick):
    copies = [w.clone() for _ in range(n_copies(w.numel() * 4, cold, quick))]
    return Provider("torch fp32 F.linear", w.numel() * 4, [lambda c=c: F.linear(x, c) for c in copies],
                    lambda: F.linear(x, copies[0]), w)


def fbgemm_int8(w, x, cold, quick):
    make, call, w_eff = sb.fbgemm_int8(w)  # per-channel int8 weight, 7-bit dynamic activations
    nbytes = w.numel() + 8 * w.shape[0]
    packs = [make() for _ in range(n_copies(nbytes, cold, quick))]
    return Provider("torch dynamic int8 (FBGEMM)", nbytes, [lambda p=p: call(x, p) for p in packs],
                    lambda: call(x, packs[0]), w_eff)


def ort_int4(w, x, cold, quick):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as err:
        print(f"  (ORT skipped: {err})")
        return None
    n, k = w.shape
    p = si.pack(w, "int4", group_size=128)  # symmetric: zero point 8, MatMulNBits' default
    blocks = p.qweight.shape[1] // 64
    inits = [numpy_helper.from_array(p.qweight.reshape(n, blocks, 64).numpy(), "B"),
             numpy_helper.from_array(p.scale.reshape(-1).numpy(), "S")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=128, accuracy_level=4)
    graph = helper.make_graph([node], "roofline", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)]).SerializeToString()

    def session():
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    nbytes = n * k // 2 + n * (k // 128) * 4
    sessions = [session() for _ in range(n_copies(nbytes, cold, quick))]
    xn = x.numpy()
    return Provider("ORT MatMulNBits int4 acc4", nbytes, [lambda s=s: s.run(None, {"x": xn}) for s in sessions],
                    lambda: torch.from_numpy(sessions[0].run(None, {"x": xn})[0]), p.to_dense())


def sparseinfer_kernel(packed, x, act, cold, quick, label):
    C = _native.require_native()
    cpu = BACKENDS["cpu"]
    first = cpu.prepack(packed)
    out = torch.empty(x.shape[0], packed.shape[0])
    C.linear(x, first, out, None, num_threads=THREADS, act=act)  # builds the row tiles in int8 mode
    kernel = C.kernel_name(first, x.shape[0], act=act)
    # what the kernel streams: its row tiles in int8 mode (tile_bytes), except the compact 2:4 + int8
    # steps, built from (and beside) the dense tiles, which hold the packed weight's bytes: 32 codes and
    # 64 mask bits per 64 columns as the canonical 2:4 codes and 2-bit indices
    packed_bytes = sum(t.numel() * t.element_size() for t in packed.tensors().values())
    streamed = first.tile_bytes if act == "int8" and "_compact_" not in kernel else packed_bytes
    handles = [first]
    for _ in range(n_copies(streamed, cold, quick) - 1):
        copy = from_parts(packed.fmt, {n: t.clone() for n, t in packed.tensors().items()}, packed.shape,
                          packed.params())
        h = cpu.prepack(copy)
        C.linear(x, h, out, None, num_threads=THREADS, act=act)
        handles.append(h)
    name = f"sparseinfer {label} act={act} [{kernel}]"

    def check():
        y = torch.empty_like(out)
        C.linear(x, first, y, None, num_threads=THREADS, act=act)
        return y

    return Provider(name, streamed, [lambda h=h: C.linear(x, h, out, None, num_threads=THREADS, act=act)
                                     for h in handles], check, packed.to_dense())


# -- timing ----------------------------------------------------------------------------------------

def measure(providers, probes, rounds: int, calls: int):
    """Interleaved rounds: each round runs `calls` calls of every provider (rotating its copies),
    timing each call; probes (bandwidth) run once per round."""
    for p in providers:
        for f in p.fns[: min(len(p.fns), 3)]:
            f()  # warm-up (lazy prepack, thread pools)
    idx = {p.name: 0 for p in providers}
    for _ in range(rounds):
        for probe in probes:
            t0 = time.perf_counter()
            probe()
            probe.times.append(time.perf_counter() - t0)
        for p in providers:
            for _ in range(calls):
                f = p.fns[idx[p.name] % len(p.fns)]
                idx[p.name] += 1
                t0 = time.perf_counter()
                f()
                p.times.append(time.perf_counter() - t0)


def med_us(times) -> float:
    return statistics.median(times) * 1e6


def report(title, providers, bw_copy, bw_read, cold):
    print(f"\n## {title}")
    print(f"{'provider':<62} {'median us':>10} {'GB/s':>7} {'roof(copy)':>10} {'roof(read)':>10}  copies")
    for p in providers:
        t = med_us(p.times)
        gbs = p.bytes / (t * 1e-6) / 1e9
        print(f"{p.name:<62} {t:>10.1f} {gbs:>7.1f} {p.bytes / bw_copy / (t * 1e-6):>10.2f} "
              f"{p.bytes / bw_read / (t * 1e-6):>10.2f}  {len(p.fns)}")


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# -- 768 x 768 per-call ----------------------------------------------------------------------------

def per_call_768(quick: bool):
    """768 x 768 int4-g128 batch 1 HOT, per call, through each layer of the stack (both activation
    modes) and through ONNX Runtime's own Python entry, with where the Python time goes."""
    from sparseinfer.backends import resolve
    from sparseinfer.runtime.linear import check_linear_args
    from sparseinfer.runtime.modules import CompressedLinear

    C = _native.require_native()
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(768, 768, generator=g)
    w = si.pack(dense, "int4", group_size=128)
    x = torch.randn(1, 768, generator=g)
    mod8, mod32 = CompressedLinear(w, act="int8"), CompressedLinear(w, act="fp32")
    cpu = BACKENDS["cpu"]
    h = cpu.prepack(w)
    out = torch.empty(1, 768)
    ort = ort_int4(dense, x, False, quick)
    iters = 2000 if quick else 20000

    def loop(fn):
        for _ in range(200):
            fn()
        best = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(iters // 5):
                fn()
            best.append((time.perf_counter() - t0) / (iters // 5) * 1e6)
        return statistics.median(best)

    rows = [
        ("ORT MatMulNBits int4 acc4 session.run", ort.fns[0] if ort else None),
        ("torch fp32 F.linear", lambda: F.linear(x, dense)),
        ("_C.linear act=int8, 1 thread", lambda: C.linear(x, h, out, None, 1, None, "int8")),
        ("_C.linear act=fp32, 1 thread", lambda: C.linear(x, h, out, None, 1, None, "fp32")),
        ("si.linear(x, w, act='int8')", lambda: si.linear(x, w, act="int8")),
        ("CompressedLinear(x), act='int8'", lambda: mod8(x)),
        ("CompressedLinear(x), act='fp32'", lambda: mod32(x)),
        ("  check_linear_args", lambda: check_linear_args(x, w, None)),
        ("  resolve(w, x) (memoised)", lambda: resolve(w, x)),
        ("  torch.empty(1, 768)", lambda: torch.empty(1, 768)),
    ]
    print(f"\n## 768 x 768 int4-g128 batch 1 HOT, per call (kernels {C.kernel_name(h, 1, None, 'int8')} / "
          f"{C.kernel_name(h, 1, None, 'fp32')}; batch 1-2 calls split over threads from 128K multiply-adds "
          f"per thread, csrc/README.md)")
    results = {}
    for name, fn in rows:
        if fn is None:
            continue
        results[name] = loop(fn)
        print(f"{name:<52} {results[name]:8.2f} us")
    return results


# -- main ------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, small cold rotation (smoke run)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    C = _native.require_native()
    rounds = args.rounds or (3 if args.quick else 15)
    print(f"sparseinfer._C ISAs {C.available_isas()} active {C.active_isa()}; features {C.cpu_features()}")
    print(f"torch {torch.__version__}, {THREADS} threads, L3 {l3_bytes() >> 20} MiB, load avg {os.getloadavg()}")

    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    p8 = si.pack(w, "int8")                       # per-channel
    p4 = si.pack(w, "int4", group_size=128)       # symmetric, as ORT's default zero point
    p24_8 = si.pack(w, "2:4+int8")                 # int8-activation mode: dense row tiles on VNNI
    p24_4 = si.pack(w, "2:4+int4", group_size=64)
    summary = {}

    for batch, cold, calls in ((1, True, 20), (64, False, 2)):
        x = torch.randn(batch, K, generator=g)
        mode = "COLD" if cold else "HOT"
        print(f"\n... building providers for batch {batch} {mode}")
        providers = [p for p in (
            torch_fp32(w, x, cold, args.quick),
            fbgemm_int8(w, x, cold, args.quick),
            ort_int4(w, x, cold, args.quick),
            sparseinfer_kernel(p8, x, "int8", cold, args.quick, "int8"),
            sparseinfer_kernel(p4, x, "int8", cold, args.quick, "int4-g128"),
            sparseinfer_kernel(p8, x, "fp32", cold, args.quick, "int8"),
            sparseinfer_kernel(p4, x, "fp32", cold, args.quick, "int4-g128"),
            sparseinfer_kernel(p24_8, x, "int8", cold, args.quick, "2:4+int8"),
            sparseinfer_kernel(p24_4, x, "int8", cold, args.quick, "2:4+int4-g64"),
        ) if p is not None]
        exact = x @ w.T
        for p in providers:
            y = p.check()
            p.err = rel_err(y, exact)
            p.err_act = rel_err(y, x @ p.w_eff.T)
        copy, read = Copy(), Read()
        copy.times, read.times = [], []
        measure(providers, [copy, read], rounds, calls if not args.quick else max(1, calls // 4))
        bw_copy = copy.bytes / statistics.median(copy.times)
        bw_read = read.bytes / statistics.median(read.times)
        report(f"4096 x 4096, batch {batch} {mode} (copy bandwidth {bw_copy / 1e9:.1f} GB/s, read "
               f"{bw_read / 1e9:.1f} GB/s, medians of {rounds} interleaved rounds)", providers, bw_copy, bw_read, cold)
        print("relative error ||y - ref|| / ||ref||, ref = x @ W.T (all error) / x @ W_q.T (W_q: the provider's "
              "dequantized weight, so this is the activation-side error):")
        for p in providers:
            print(f"  {p.name.split(' [')[0]:<44} {p.err:9.2e} / {p.err_act:9.2e}")
        summary[batch] = {p.name.split(" [")[0]: med_us(p.times) for p in providers}
        summary[batch]["_roof"] = {p.name.split(" [")[0]: p.bytes / bw_copy / (med_us(p.times) * 1e-6)
                                   for p in providers}
        del providers
        gc.collect()

    per_call = per_call_768(args.quick)

    # -- targets ---------------------------------------------------------------------------------------
    b1, b64 = summary[1], summary[64]
    ours4, ours8 = "sparseinfer int4-g128 act=int8", "sparseinfer int8 act=int8"
    ort, fbg = "ORT MatMulNBits int4 acc4", "torch dynamic int8 (FBGEMM)"
    print("\n## targets (ratios from this run)")

    def line(ok, text):
        print(f"[{'met ' if ok else 'MISS'}] {text}")

    if ort in b1:
        line(b1[ours4] <= 0.85 * b1[ort], f"b1 cold int4: {b1[ours4]:.0f} us = {b1[ours4] / b1[ort]:.2f} x ORT "
             f"({b1[ort]:.0f} us); target <= 0.85")
    line(b1["_roof"][ours4] >= 0.85, f"b1 cold int4 roofline fraction {b1['_roof'][ours4]:.2f}; target >= 0.85")
    line(b1[ours8] <= b1[fbg], f"b1 cold int8: {b1[ours8]:.0f} us = {b1[ours8] / b1[fbg]:.2f} x FBGEMM "
         f"({b1[fbg]:.0f} us); target <= 1.0")
    line(b64[fbg] / b64[ours8] >= 1.2, f"b64 hot int8 W8A8: {b64[ours8]:.0f} us, FBGEMM {b64[fbg]:.0f} us = "
         f"{b64[fbg] / b64[ours8]:.2f} x faster; target >= 1.2")
    # The issue's absolute targets were set on a machine where ORT took 2,431 us (b64 int4) and 4.9 us
    # (768^2 per call): as ratios to ORT measured here, <= 0.66x and <= 1.02x of ORT's time.
    line(b64[ours4] <= 1600, f"b64 hot int4: {b64[ours4]:.0f} us; target <= 1600 (absolute)")
    if ort in b64:
        line(b64[ours4] <= 0.66 * b64[ort], f"b64 hot int4: {b64[ours4] / b64[ort]:.2f} x ORT's time; target <= 0.66 "
             f"(1,600 / 2,431 us on the issue's machine)")
    if ort in b64:
        line(b64[ort] / b64[ours4] >= 2, f"b64 hot int4 act=int8: {b64[ort] / b64[ours4]:.2f} x faster than ORT; "
             "target >= 2 (issue 12)")
    for name, t in b64.items():
        if name.startswith("sparseinfer"):
            line(t <= b64["torch fp32 F.linear"], f"b64 hot {name}: {b64['torch fp32 F.linear'] / t:.2f} x torch fp32; "
                 "target >= 1.0")
    mod = per_call["CompressedLinear(x), act='int8'"]
    line(mod <= 5, f"768^2 b1 hot int4 CompressedLinear {mod:.2f} us; target <= 5 (absolute)")
    ort_call = per_call.get("ORT MatMulNBits int4 acc4 session.run")
    if ort_call:
        line(mod <= 1.02 * ort_call, f"768^2 b1 hot int4 CompressedLinear {mod / ort_call:.2f} x ORT's per-call time "
             f"({ort_call:.1f} us); target <= 1.02 (5 / 4.9 us on the issue's machine)")


if __name__ == "__main__":
    main()
