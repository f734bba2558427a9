"""`sparseinfer demo`'s latency columns, interleaved: MiniLM-L6 dense and compressed with each recipe,
timed round by round in one process (dense, then every recipe, per round), so that load from other
processes on a shared machine hits all of them alike. The demo itself times dense once first and
each recipe after it, which on a busy machine moves its ratios by tens of percent.

    python bench/demo_interleaved.py                      # the demo's recipe list
    python bench/demo_interleaved.py --recipes 2:4 sparse50 int8

The inputs are the demo's: its latency batch (the first 16 sentences, natural order, padded to the
longest) and one sentence; default act (SPARSEINFER_ACT, else auto). Each model runs once untimed
first, with no first-use measuring budget (so route measurements, if this machine's cache lacks them, happen there), then
--rounds rounds; speed = dense time / recipe time of the median round (and of the best one, and the
median of the rounds' own ratios: the steadiest of the three on a shared host).

--load adds a row per recipe for its model saved and loaded back (``si.save`` with the batch as the
example input, ``si.load``: the exported program, as a deployment runs it).

A "dense+attention" row is the dense model on sparseinfer's attention kernel alone (runtime/attention.py),
which every compressed model runs too; --torch-attention adds a row per recipe for its model on torch's
attention (as before that kernel), timed in the same rounds.

--force pick,last,dense adds rows for each recipe with every layer's route replaced (a what-if, by
replacing cpu_routes.decide): "pick" the table's kernel, "last" the last of _C.kernel_candidates
(e.g. a measured-only kernel), "dense" the dense fallback (with its fp32 copy where it would keep one).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time

import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.apps import demo, models
from sparseinfer.backends import cpu_routes
from sparseinfer.eval.data import sentences
from sparseinfer.runtime import attention


def forced(kind: str):
    """A cpu_routes.decide that sends every call one way (see --force)."""
    C = _native.require_native()

    def decide(w, handle, m, act):
        if kind == "dense":
            cpu_routes.keep_copy(w)
            return cpu_routes.Route("dense", cpu_routes.DENSE_KERNEL, "fp32", "forced")
        names = C.kernel_candidates(handle, m, None, act)
        name = names[0] if kind == "pick" else names[-1]
        return cpu_routes.Route("kernel", name, "fp32", "forced", None if name == names[0] else name)
    return decide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=list(demo.DEFAULT_RECIPES), help="default: the demo's list")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16, help="sentences in the batched input (the demo's 16)")
    ap.add_argument("--act", default=None)
    ap.add_argument("--load", action="store_true", help="add rows for each recipe saved and loaded back")
    ap.add_argument("--force", default="", help="comma-separated: pick, last, dense (rows with every route forced)")
    ap.add_argument("--torch-attention", action="store_true",
                    help="add a row per recipe for its model on torch's attention (as before runtime/attention.py)")
    args = ap.parse_args()
    model, tokenizer, _ = models.load_hf(models.MINILM)
    texts = sentences(args.batch + demo.CALIB_SENTENCES)
    calib = [models.tokenize(tokenizer, texts[args.batch:][i:i + 16]) for i in range(0, demo.CALIB_SENTENCES, 16)]
    inputs = {"batch": models.tokenize(tokenizer, texts[:args.batch]), "one": models.tokenize(tokenizer, texts[:1])}
    nets = {"dense": model}
    attend = copy.deepcopy(model)  # the dense model on sparseinfer's attention kernel, which si.compress installs
    if attention.install(attend):
        nets[demo.ATTENTION_ROW] = attend
    for r in args.recipes:
        nets[r] = si.set_act(si.compress(model, r, calib=calib, progress=False), args.act)
    if args.torch_attention:
        for r in args.recipes:
            nets[f"{r} [torch attention]"] = copy.deepcopy(nets[r])
            nets[f"{r} [torch attention]"].set_attn_implementation("sdpa")
    if args.load:
        saved = tempfile.TemporaryDirectory()  # removed when main() returns
        for r in args.recipes:
            path = os.path.join(saved.name, f"{len(nets)}.sinf")
            si.save(nets[r], path, example_inputs=dict(inputs["batch"]))
            nets[f"{r} [load]"] = si.load(path, act=args.act)
    forces = [f for f in args.force.split(",") if f]
    variants = {name: (net, None) for name, net in nets.items()}
    variants.update({f"{r} [{f}]": (nets[r], f) for r in args.recipes for f in forces})
    times = {(name, size): [] for name in variants for size in inputs}
    measured = cpu_routes.decide
    cpu_routes.MEASURE_BUDGET_S = math.inf  # every recipe's routes measured, as in a process of its own
    with torch.inference_mode():
        for net in nets.values():
            for batch in inputs.values():
                net(**batch)  # warm-up (and first-use route measurements)
        for _ in range(args.rounds):
            for size, batch in inputs.items():
                for name, (net, force) in variants.items():
                    cpu_routes.decide = measured if force is None else forced(force)
                    cpu_routes.reset()  # the memoised routes of the last variant are stale
                    net(**batch)
                    reps = 1 if size == "batch" else 5
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        net(**batch)
                    times[(name, size)].append((time.perf_counter() - t0) / reps)
    cpu_routes.decide = measured
    rows = inputs["batch"]["input_ids"].shape
    print(f"MiniLM-L6, {torch.get_num_threads()} threads, ISA {_native.require_native().active_isa()}, "
          f"batch {rows[0]}x{rows[1]} tokens, one sentence {inputs['one']['input_ids'].shape[1]} tokens, "
          f"{args.rounds} interleaved rounds\n")
    print("| recipe | batch ms (median) | speed (median / best round / per round) | one sentence ms | speed (median / "
          "best / per round) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in variants:
        cells = []
        for size in inputs:
            mine, dense = times[(name, size)], times[("dense", size)]
            med, best = statistics.median(mine), min(mine)
            per_round = statistics.median(d / t for d, t in zip(dense, mine))  # each round's own dense
            cells += [f"{med * 1e3:.1f}",
                      f"{statistics.median(dense) / med:.2f}x / {min(dense) / best:.2f}x / {per_round:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
