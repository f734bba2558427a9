"""GPTQ-act int4-g128 layer error on SmolLM2 layers: dampening and the scale search, without a full compress.

For a few Linear layers of the dense model, H = 2/n X^T X from the first calibration tokens (as
``llm_accuracy.py`` picks them) and from the held-out windows; each setting quantizes with the
calibration H, and the relative output error tr((W-Q) H (W-Q)^T) / tr(W H W^T) (x 1e3) is given on
both, [calibration, held-out]: a setting that only fits the calibration text shows in the second.
Settings: percdamp 0.01 / 0.1, each with the scale search as the library runs it ("wclip": column
errors weighted by diag(H)), the unweighted search ("plain", the code before 2026-12-05 evening)
and no search ("noclip"). ~4 CPU-minutes at 1 thread.

    python docs/scripts/gptq_layer_error.py [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from llm_accuracy import GGUF, load, split_text

import sparseinfer.passes.gptq as gptq_mod

LAYERS = ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.15.self_attn.o_proj",
          "model.layers.15.mlp.gate_proj", "model.layers.28.mlp.down_proj", "model.layers.28.self_attn.v_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load(GGUF)
    calib, _, held = split_text(tok, args.calib_tokens, 8 * 512 + 64)
    mods = dict(model.named_modules())
    grams, key = {}, ["cal"]

    def hook(name):
        def f(_m, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            g = grams.setdefault((key[0], name), [0, 0])
            g[0], g[1] = g[0] + x.T @ x, g[1] + x.shape[0]
        return f

    hooks = [mods[n].register_forward_hook(hook(n)) for n in LAYERS]
    ids = tok("\n\n".join(calib), return_tensors="pt")["input_ids"][0][:args.calib_tokens]
    with torch.no_grad():
        for i in range(0, len(ids), 512):
            model(ids[i:i + 512].unsqueeze(0))
        key[0] = "held"
        for i in range(0, 8 * 512, 512):
            model(held[i:i + 512].unsqueeze(0))
    for h in hooks:
        h.remove()
    hess = {k: 2 * g / n for k, (g, n) in grams.items()}
    real = gptq_mod._group_params

    def plain(values, bits, symmetric, clip=True, col_weight=None):
        return real(values, bits, symmetric, clip, None)

    for name in LAYERS:
        w = mods[name].weight.detach().float()
        hc, hh = hess[("cal", name)], hess[("held", name)]

        def rel(q, h, w=w):
            e = (w - q).double()
            return round((torch.trace(e @ h @ e.T) / torch.trace(w.double() @ h @ w.double().T)).item() * 1e3, 4)

        row = {"layer": name, "calib_tokens": args.calib_tokens}
        for pd in (0.01, 0.1):
            for label, clip, patch in (("wclip", True, None), ("plain", True, plain), ("noclip", False, None)):
                gptq_mod._group_params = patch or real
                try:
                    q, _, _ = gptq_mod.gptq_quantize(w, hc, bits=4, group_size=128, act_order=True, percdamp=pd,
                                                     clip=clip)
                finally:
                    gptq_mod._group_params = real
                row[f"pd{pd}_{label}"] = [rel(q, hc), rel(q, hh)]
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
