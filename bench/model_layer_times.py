"""Where a compressed MiniLM gains or loses against dense, per kind of linear layer, inside the model.

    python bench/model_layer_times.py --recipe 2:4                 # one sentence, 40 rounds
    python bench/model_layer_times.py --recipe sparse50 --batch --apart
    python bench/model_layer_times.py --recipe copy               # the method's check: a deep copy of dense
    python bench/model_layer_times.py --recipe sparse50 --apart --plain-copy   # the floor of the Python path

Every linear layer of the encoder (nn.Linear in the dense model, CompressedLinear in the compressed
one) gets a clock around its forward; the two models run alternately, round by round, and each
round sums the time of each kind of layer (query, key, value, attention output, intermediate,
output: six layers each). Printed: the whole forward and each kind, dense and compressed (medians),
and the median of the per-round ratios, and the rest of the forward (attention, norms, activations:
the whole less the layers, per round). A joined group (q / k / v) runs as one call, counted
where the first member is called (query); ``--apart`` parts the groups first. The clocks add
the same ~0.2 us to every call of both models. ``--plain-copy`` replaces the forward of every
compressed layer that keeps an fp32 copy with a bare ``F.linear`` on it (the groups parted): what a
dense-routed layer would cost with no Python path of its own, the floor its own path is held to.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import statistics
import time

import torch

import sparseinfer as si
from sparseinfer.apps import demo, models
from sparseinfer.backends import cpu_routes
from sparseinfer.eval.data import sentences


def clocked(model: torch.nn.Module, kind_of, sums: dict) -> None:
    """Wraps the forward of every layer ``kind_of(name, module)`` names, adding its time to ``sums``."""
    clock = time.perf_counter_ns
    for name, module in model.named_modules():
        kind = kind_of(name, module)
        if kind is None:
            continue
        sums.setdefault(kind, 0)
        forward = module.forward

        def timed(x, forward=forward, kind=kind):
            start = clock()
            y = forward(x)
            sums[kind] += clock() - start
            return y
        module.forward = timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="2:4")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", action="store_true", help="the demo's batch of 16 sentences instead of one")
    ap.add_argument("--apart", action="store_true", help="part joined groups (q / k / v) before timing")
    ap.add_argument("--plain-copy", action="store_true",
                    help="compressed layers with an fp32 copy run a bare F.linear on it (implies --apart)")
    args = ap.parse_args()
    model, tokenizer, _ = models.load_hf(models.MINILM)
    texts = sentences(16 + demo.CALIB_SENTENCES)
    calib = [models.tokenize(tokenizer, texts[16:][i:i + 16]) for i in range(0, demo.CALIB_SENTENCES, 16)]
    x = models.tokenize(tokenizer, texts[:16] if args.batch else texts[:1])
    # "copy": dense against its deep copy, which should read 1.00x on every kind (the method's check)
    compressed = copy.deepcopy(model) if args.recipe == "copy" else si.compress(model, args.recipe, calib=calib,
                                                                                  progress=False)
    if args.apart or args.plain_copy:
        for m in compressed.modules():
            if isinstance(m, si.CompressedLinear) and m._group is not None:
                m._group.part()
    if args.plain_copy:
        for m in compressed.modules():
            if isinstance(m, si.CompressedLinear):
                fp32 = m.packed.prepacked(cpu_routes._DENSE_COPY_KEY, cpu_routes._dense_copy)
                if fp32 is not None:
                    m.forward = functools.partial(torch.nn.functional.linear, weight=fp32, bias=m.bias)

    def kind_of(layer_type):
        def kind(name, module):
            if isinstance(module, layer_type) and ".layer." in name:
                return re.sub(r"^.*\.layer\.\d+\.", "", name)
            return None
        return kind

    sums = {"dense": {}, args.recipe: {}}
    clocked(model, kind_of(torch.nn.Linear), sums["dense"])
    clocked(compressed, kind_of(torch.nn.Linear if args.recipe == "copy" else si.CompressedLinear), sums[args.recipe])
    nets = {"dense": model, args.recipe: compressed}
    whole = {tag: [] for tag in nets}
    kinds = {tag: {k: [] for k in sums[tag]} for tag in nets}
    reps = 1 if args.batch else 5
    with torch.inference_mode():
        for net in nets.values():
            net(**x)  # first use: routes measured, copies made
        for r in range(args.rounds):
            for tag in (list(nets) if r % 2 else list(nets)[::-1]):
                sums[tag].update(dict.fromkeys(sums[tag], 0))
                start = time.perf_counter()
                for _ in range(reps):
                    nets[tag](**x)
                whole[tag].append((time.perf_counter() - start) / reps * 1e6)
                for k, ns in sums[tag].items():
                    kinds[tag][k].append(ns / reps / 1e3)

    def row(label, d, c):
        ratio = statistics.median([a / b for a, b in zip(d, c) if b])
        print(f"| {label} | {statistics.median(d):,.0f} | {statistics.median(c):,.0f} | {ratio:.3f}x |")

    size = "the batch of 16" if args.batch else "one sentence"
    print(f"MiniLM-L6, {size}, {args.rounds} alternated rounds, {torch.get_num_threads()} threads, "
          f"recipe {args.recipe}{' (groups parted)' if args.apart or args.plain_copy else ''}"
          f"{', bare F.linear on the fp32 copies' if args.plain_copy else ''}; us per forward\n")
    print(f"| layers | dense | {args.recipe} | speed (median of per-round ratios) |\n| --- | ---: | ---: | ---: |")
    row("whole forward", whole["dense"], whole[args.recipe])
    rest = {tag: [w - sum(kinds[tag][k][r] for k in kinds[tag]) for r, w in enumerate(whole[tag])] for tag in nets}
    row("everything but the linear layers", rest["dense"], rest[args.recipe])
    for k in sorted(kinds["dense"]):
        if k in kinds[args.recipe]:
            row(k, kinds["dense"][k], kinds[args.recipe][k])


if __name__ == "__main__":
    main()
