"""Reproduce the numbers and plots of docs/evaluation.md.

    python docs/scripts/evaluation.py [--only digits|minilm]

Writes docs/img/{sweep,sensitivity}_{digits,minilm}.png and docs/scripts/evaluation_results.json,
and prints what the page quotes. Takes a few minutes on two cores (MiniLM dominates).
Latencies depend on the machine and on what else runs on it; quality numbers do not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sparseinfer as si
from sparseinfer.eval import layer_sensitivity, plot_sensitivity, plot_sweep, tune
from sparseinfer.eval.data import digits_classifier, minilm, minilm_batches, sentences
from sparseinfer.eval.sweeps import SweepResult, machine_info

DOCS = Path(__file__).resolve().parents[1]
IMG = DOCS / "img"


def _split(batches, n_tune):
    """First ``n_tune`` samples choose recipes; the rest report them (held out)."""
    tune_part, held = [], []
    seen = 0
    for b in batches:
        size = len(b[1]) if isinstance(b, tuple) else b["input_ids"].shape[0]
        (tune_part if seen < n_tune else held).append(b)
        seen += size
    return tune_part, held


def _tuned(model, tune_data, held_data, budget, minimize, label, **kwargs):
    result = tune(model, tune_data, budget, minimize=minimize, progress=False, **kwargs)
    held = si.evaluate(model, result.model, held_data) if result.recipe["layers"] else None
    shown = {k: v for k, v in kwargs.items() if k != "latency_inputs"}
    print(f"[{label}] tune drop<={budget} minimize={minimize} {shown}: {result}")
    for line in result.log:
        print(f"    {line}")
    if held is not None:
        print(f"    held-out: {held['quality_name']} {held.quality:.4f} drop {held.drop:+.4f}")
    return {**result.summary(), "held_out": None if held is None else {k: v for k, v in held.items()
                                                                       if k not in ("failures",)}}


def digits(results):
    model, batches = digits_classifier()
    tune_data, held_data = _split(batches, 200)  # 2 batches of 100 tune, 339 held out
    for recipe in ("int8", "int4-g32", "2:4"):
        ev = si.evaluate(model, si.compress(model, recipe, progress=False), batches)
        print(f"[digits] {recipe}\n{ev}")
        results["digits"][f"evaluate_{recipe}"] = {k: v for k, v in ev.items()}
    tuned = _tuned(model, tune_data, held_data, 0.01, "size", "digits")
    results["digits"]["tune_size"] = tuned
    results["digits"]["tune_size_conservative"] = _tuned(model, tune_data, held_data, 0.01, "size", "digits",
                                                          conservative=True)
    results["digits"]["tune_latency"] = _tuned(model, tune_data, held_data, 0.01, "latency", "digits")
    grid = {r: r for r in ("int8", "int4-g32", "int4-pc", "2:4", "2:4+int8", "sparse50")}
    grid["auto<=0.01 (size)"] = tuned["recipe"]
    sweep = si.sweep(model, batches, grid, repeat=31, name="digits MLP (539 test digits)", progress=False)
    plot_sweep(sweep, IMG / "sweep_digits.png")
    print(sweep.markdown())
    results["digits"]["sweep"] = sweep.to_dict()
    rows = []
    for fmt in ("int4-g32", "2:4"):
        rows += layer_sensitivity(model, batches, fmt, progress=False)
    plot_sensitivity(rows, IMG / "sensitivity_digits.png", "digits MLP: accuracy drop, one layer compressed")
    results["digits"]["sensitivity"] = rows


def minilm_workload(results):
    model, tokenizer = minilm()
    texts = sentences(200)
    sweep_data = minilm_batches(tokenizer, texts[:100], 25)  # the sweep: 100 sentences
    tune_data = minilm_batches(tokenizer, texts[:48], 24)  # sensitivity / tuning: 48 of them (time)
    held_data = minilm_batches(tokenizer, texts[100:], 25)  # 100 others, never used to choose
    timed = minilm_batches(tokenizer, texts[:8], 8)[0]
    for recipe in ("int8", "int4", "2:4"):
        ev = si.evaluate(model, si.compress(model, recipe, progress=False), sweep_data)
        print(f"[minilm] {recipe}\n{ev}")
        results["minilm"][f"evaluate_{recipe}"] = dict(ev)
    candidates = ("int8", "int4", "2:4+int8")
    tuned = _tuned(model, tune_data, held_data, 0.01, "size", "minilm", candidates=candidates)
    results["minilm"]["tune_size"] = tuned
    results["minilm"]["tune_latency"] = _tuned(model, tune_data, held_data, 0.01, "latency", "minilm",
                                               candidates=candidates, latency_inputs=timed)
    grid = {r: r for r in ("int8", "int4", "2:4", "2:4+int8", "2:4+int4", "sparse50")}
    grid["auto<=0.01 (size)"] = tuned["recipe"]
    sweep = si.sweep(model, sweep_data, grid, latency_inputs=timed, name="all-MiniLM-L6-v2 (100 sentences)",
                     progress=False)
    plot_sweep(sweep, IMG / "sweep_minilm.png")
    print(sweep.markdown())
    results["minilm"]["sweep"] = sweep.to_dict()
    rows = []
    for fmt in ("int4", "2:4"):
        rows += layer_sensitivity(model, tune_data, fmt, progress=False)
    plot_sensitivity(rows, IMG / "sensitivity_minilm.png", "all-MiniLM-L6-v2: 1 - mean cosine, one layer compressed")
    results["minilm"]["sensitivity"] = rows
    worst = sorted(rows, key=lambda r: -r["drop"])[:5]
    print("[minilm] most sensitive:", [(r["layer"], r["format"], round(r["drop"], 5)) for r in worst])


def replot(results):
    titles = {"digits": "digits MLP: accuracy drop, one layer compressed",
              "minilm": "all-MiniLM-L6-v2: 1 - mean cosine, one layer compressed"}
    for name, title in titles.items():
        if name in results:
            plot_sweep(SweepResult(**results[name]["sweep"]), IMG / f"sweep_{name}.png")
            plot_sensitivity(results[name]["sensitivity"], IMG / f"sensitivity_{name}.png", title)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("digits", "minilm"))
    parser.add_argument("--replot", action="store_true", help="redraw the plots from evaluation_results.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads while measuring (default 1: on an oversubscribed machine torch's OpenMP "
                             "barriers stall dense matmuls tens of ms, which would flatter every kernel)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = DOCS / "scripts" / "evaluation_results.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.replot:
        replot(results)
        return
    results["machine"] = machine_info()
    for name, fn in (("digits", digits), ("minilm", minilm_workload)):
        if args.only in (None, name):
            results[name] = {}
            fn(results)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {out} and plots under {IMG}")


if __name__ == "__main__":
    main()
