"""`sparseinfer demo`: the README's main job (see sparseinfer/apps/demo.py)."""

from __future__ import annotations

from sparseinfer.act import ACT_MODES
from sparseinfer.apps import demo
from sparseinfer.apps.demo import DEFAULT_RECIPES


def register(sub):
    p = sub.add_parser("demo", help="compress all-MiniLM-L6-v2 with several recipes and compare them",
                       description="Load the real all-MiniLM-L6-v2 offline, compress it with several recipes and "
                                   "print size, compression vs fp32, embedding cosine similarity to the dense "
                                   "model on real sentences, and latency vs dense; then save one compressed model, "
                                   "load it back and check it matches.")
    p.add_argument("--sentences", type=int, default=None, metavar="N", help="sentences to embed (default 256)")
    p.add_argument("--recipes", nargs="+", default=None, metavar="RECIPE",
                   help=f"recipes to compare (default: {' '.join(DEFAULT_RECIPES)})")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="sentences per forward pass (default 64)")
    p.add_argument("--act", choices=ACT_MODES, default=None,
                   help="activation precision the compressed models' CPU kernels may use (default: "
                        "SPARSEINFER_ACT, else auto = int8 activations where that kernel is faster, ~0.6%% "
                        "error; fp32 = exact; see sparseinfer.act)")
    p.add_argument("--latency-batch", type=int, default=16, metavar="B",
                   help="sentences in the batch whose latency is timed (default 16)")
    p.add_argument("--repeat", type=int, default=None, metavar="R", help=f"timed runs per model (default {demo.REPEATS})")
    p.add_argument("--save-load", default="2:4+int8", metavar="RECIPE",
                   help="recipe whose model is saved and loaded back (default 2:4+int8; 'none' to skip)")
    p.add_argument("--quick", action="store_true", help="a quick run: 16 sentences, 2 recipes, 2 timed runs")
    p.set_defaults(func=_run)


def _run(args) -> int:
    for name, value in (("--sentences", args.sentences), ("--batch-size", args.batch_size), ("--repeat", args.repeat),
                        ("--latency-batch", args.latency_batch)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    recipes = args.recipes or (demo.QUICK_RECIPES if args.quick else demo.DEFAULT_RECIPES)
    n = args.sentences or (16 if args.quick else 256)
    repeat = args.repeat or (2 if args.quick else None)  # None: demo.run's default
    save_load = None if args.save_load.lower() == "none" else args.save_load
    if save_load and args.quick and save_load not in recipes:
        save_load = recipes[-1]
    result = demo.run(n, recipes, args.batch_size, repeat, save_load, latency_batch=args.latency_batch,
                      act=args.act)
    sl = result["save_load"]
    return 0 if sl is None or sl["matches"] else 1
