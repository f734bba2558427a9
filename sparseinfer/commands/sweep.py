"""`sparseinfer sweep`: a grid of recipes measured for size, quality and latency on this machine,
with the Pareto frontier, its knee, a PNG plot and markdown / HTML / JSON reports.

    sparseinfer sweep                          # all-MiniLM-L6-v2, 6 recipes, 100 sentences
    sparseinfer sweep --model digits           # the digits MLP classifier (accuracy)
    sparseinfer sweep --recipes int8 int4-g64 --out runs/minilm
    sparseinfer sweep --model digits --tune 0.01 --minimize size   # add the autotuned recipe
"""

from __future__ import annotations

import json

import torch

from ..eval import data as d
from ..eval import sweep, tune, write_report

RECIPES = {
    "minilm": ["int8", "int4", "2:4", "2:4+int8", "2:4+int4", "sparse50"],
    "digits": ["int8", "int4-g32", "int4-pc", "2:4", "2:4+int8", "sparse50"],
}
QUICK_RECIPES = {"minilm": ["int8", "int4", "2:4"], "digits": ["int8", "int4-g32", "2:4"]}


def register(sub):
    p = sub.add_parser("sweep", help="recipes vs size, quality, latency; Pareto frontier, knee, plot, report",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(RECIPES), default="minilm",
                   help="minilm: all-MiniLM-L6-v2 on sentences (cosine); digits: an MLP on sklearn digits (accuracy)")
    p.add_argument("--recipes", nargs="+", metavar="RECIPE", help="recipes to measure (default: a grid per model)")
    p.add_argument("--samples", type=int, help="evaluation samples (default: 100 sentences / the 539 test digits)")
    p.add_argument("--batch-size", type=int, default=25, help="sentences per batch (minilm; default 25)")
    p.add_argument("--latency-batch", type=int, default=8,
                   help="sentences per timed call (minilm; default 8); digits are timed on batches of 100")
    p.add_argument("--repeat", type=int, default=7, help="timed calls per recipe; the median is kept (default 7)")
    p.add_argument("--tune", type=float, metavar="DROP",
                   help="also choose a per-layer recipe with quality drop <= DROP (e.g. 0.01) and add it as 'auto'")
    p.add_argument("--minimize", choices=("latency", "size"), default="latency", help="what --tune minimises")
    p.add_argument("--backend", help="pin compressed layers to one backend (reference, cpu, ...; default: best)")
    p.add_argument("--threads", type=int, help="torch / kernel threads while measuring (default: torch's)")
    p.add_argument("--out", help="directory for sweep.{json,png,md,html} (default: ./sweep-<model>)")
    p.add_argument("--quick", action="store_true", help="3 recipes, few samples and repeats (a smoke test)")
    p.set_defaults(func=_run)


def _workload(args):
    if args.model == "digits":
        model, batches = d.digits_classifier()
        if args.samples is not None:
            batches = _take(batches, args.samples)
        return model, batches, None, "digits MLP (sklearn digits)"
    if args.batch_size < 1 or args.latency_batch < 1:
        raise ValueError("--batch-size and --latency-batch must be at least 1")
    model, tokenizer = d.minilm()
    n = args.samples or (16 if args.quick else 100)
    texts = d.sentences(n)
    batch_size = min(args.batch_size, 8) if args.quick else args.batch_size
    timed = d.minilm_batches(tokenizer, texts[:args.latency_batch], args.latency_batch)[0]
    return model, d.minilm_batches(tokenizer, texts, batch_size), timed, "all-MiniLM-L6-v2"


def _take(batches, n: int):
    if n < 1:
        raise ValueError(f"--samples must be at least 1, got {n}")
    out = []
    for x, y, g in batches:
        if n <= 0:
            break
        out.append((x[:n], y[:n], g[:n]))
        n -= len(y[:n])
    return out


def _run(args) -> int:
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    recipes = args.recipes or (QUICK_RECIPES if args.quick else RECIPES)[args.model]
    repeat, warmup = (min(args.repeat, 2), 1) if args.quick else (args.repeat, 2)
    model, batches, timed, name = _workload(args)
    grid = {r: r for r in recipes}
    if args.tune is not None:
        result = tune(model, batches, args.tune, minimize=args.minimize, repeat=max(repeat, 3), warmup=warmup,
                      latency_inputs=timed, backend=args.backend)
        print(f"tune (drop <= {args.tune}, minimize {args.minimize}): {result}")
        for line in result.log:
            print(f"  {line}")
        grid[f"auto<={args.tune:g}"] = result.recipe
    result = sweep(model, batches, grid, warmup=warmup, repeat=repeat, name=name, latency_inputs=timed,
                   backend=args.backend)
    paths = write_report(result, args.out or f"sweep-{args.model}")
    print(result.markdown())
    knee = result.rows[result.knee]
    print(f"\nPareto frontier: {', '.join(result.rows[i]['label'] for i in result.front)}; knee: {knee['label']}")
    if args.tune is not None:
        print(f"auto recipe: {json.dumps(grid[f'auto<={args.tune:g}'])}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
