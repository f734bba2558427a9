"""`sparseinfer run ARTIFACT [--text ...]`: load an artifact (no model code) and run it once."""

from __future__ import annotations

import statistics
import time

import torch

import sparseinfer as si
from sparseinfer.act import ACT_MODES
from sparseinfer.apps import models
from sparseinfer.runtime.serialization import read_manifest


def register(sub):
    p = sub.add_parser("run", help="load an artifact and run it on sample input",
                       description="Load ARTIFACT from its exported program and run it. Sentence encoders (made "
                                   "by `sparseinfer compress`) embed --text (or two sample sentences) and print "
                                   "the embeddings' shape and norms; other artifacts run on random inputs of the "
                                   "recorded example shapes.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--text", action="append", metavar="TEXT", help="a sentence to embed (repeatable)")
    p.add_argument("--repeat", type=int, default=5, metavar="R", help="timed runs (median reported); default 5")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, help="pin every compressed layer to this backend")
    p.add_argument("--act", choices=ACT_MODES, default=None,
                   help="activation precision the CPU kernels may use (default: SPARSEINFER_ACT, else auto; "
                        "fp32 = exact; see sparseinfer.act)")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    p.set_defaults(func=_run)


def _timed(fn, repeat: int):
    out = fn()  # warm-up (and the result)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times) if times else float("nan")


def _random_input(spec: dict, name: str, gen: torch.Generator, device):
    if "dtype" not in spec:
        raise ValueError(f"input {name} is a {spec.get('type', '?')}, not a tensor: cannot make a sample input "
                         f"for it; call the loaded model from Python instead")
    dtype = getattr(torch, spec["dtype"])
    shape = spec["shape"]
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype).to(device)
    if dtype == torch.bool:
        return (torch.rand(shape, generator=gen) > 0.5).to(device)
    lo, hi = spec.get("min", 0), spec.get("max", 0)
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=dtype).to(device)


def _describe(out, prefix="output") -> list[str]:
    if isinstance(out, torch.Tensor):
        return [f"{prefix}: {out.dtype} {list(out.shape)}, mean {out.float().mean():.4f}, std {out.float().std():.4f}"
                if out.numel() > 1 else f"{prefix}: {out.dtype} {list(out.shape)}"]
    if isinstance(out, dict) or hasattr(out, "keys"):
        return [line for k in out.keys() for line in _describe(out[k], f"{prefix}.{k}")]
    if isinstance(out, (tuple, list)):
        return [line for i, v in enumerate(out) for line in _describe(v, f"{prefix}[{i}]")]
    return [f"{prefix}: {out!r}"]


def _run(args) -> int:
    if args.repeat < 0:
        raise ValueError(f"--repeat must be >= 0, got {args.repeat}")
    manifest = read_manifest(args.artifact)
    program = manifest.get("program")
    if not program and manifest.get("architecture"):
        raise ValueError(f"{args.artifact} holds a causal LM ({manifest['architecture'].get('class')}): run it with "
                         f"sparseinfer generate {args.artifact} --prompt ...")
    if not program:
        raise ValueError(f"{args.artifact} was saved with export=False: it holds no architecture to run; load it "
                         f"in Python with sparseinfer.load(path, model=skeleton)")
    meta = manifest.get("model", {}).get("metadata", {})
    t0 = time.perf_counter()
    model = si.load(args.artifact, device=args.device, backend=args.backend, act=args.act)
    print(f"loaded {args.artifact} in {time.perf_counter() - t0:.2f} s: {len(manifest['layers'])} compressed layers, "
          f"recipe {manifest.get('recipe')}")
    if meta.get("task") == "sentence-embedding":
        texts = args.text or list(models.SAMPLE_TEXTS)
        tokenizer = models.load_tokenizer(meta["model"])
        batch = {k: v.to(args.device) for k, v in models.tokenize(tokenizer, texts).items()
                 if k in program["inputs"]["kwargs"]}
        with torch.no_grad():
            out, ms = _timed(lambda: model(**batch), args.repeat)
        emb = models.mean_pool(models.last_hidden_state(out), batch["attention_mask"])
        print(f"embeddings: {list(emb.shape)} ({emb.dtype}), mean-pooled over tokens")
        for text, norm in zip(texts, emb.norm(dim=-1).tolist()):
            print(f"  norm {norm:8.4f}  {text[:70]!r}")
        if len(texts) > 1:
            e = torch.nn.functional.normalize(emb, dim=-1)
            print(f"cosine(text 1, text 2) = {(e[0] @ e[1]).item():.4f}")
    else:
        if args.text:
            raise ValueError("--text only applies to sentence-encoder artifacts made by `sparseinfer compress`")
        gen = torch.Generator().manual_seed(args.seed)
        ins = program["inputs"]
        a = [_random_input(s, f"args[{i}]", gen, args.device) for i, s in enumerate(ins.get("args", []))]
        kw = {k: _random_input(s, k, gen, args.device) for k, s in ins.get("kwargs", {}).items()}
        print("inputs (random, example shapes): " + ", ".join(
            [f"{list(t.shape)} {t.dtype}" for t in a] + [f"{k}={list(t.shape)} {t.dtype}" for k, t in kw.items()]))
        with torch.no_grad():
            out, ms = _timed(lambda: model(*a, **kw), args.repeat)
        print("\n".join(_describe(out)))
    print(f"latency: {ms:.2f} ms (median of {args.repeat} runs on {args.device})")
    return 0
