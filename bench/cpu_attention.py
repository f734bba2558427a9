"""Attention over whole sequences: sparseinfer's kernel (runtime/attention.py) against torch's SDPA and
transformers' eager attention, in one interleaved run.

    python bench/cpu_attention.py                  # the shapes below, 2 threads, best of 40 rounds (~30 s)
    python bench/cpu_attention.py --threads 1 --rounds 20

Standalone script (not collected by pytest). q / k / v are views of one joint [B, L, (H + 2 Hkv) D]
tensor, as a model's joined q / k / v call leaves them; padding masks hide the last keys of some
sentences as a tokenizer's padding does. Every provider returns [B, L, H, D] (what the output
projection reads: torch's results made contiguous in that layout, as transformers does). Prints one
markdown table: best time per call, sparseinfer's speed against each, and its G multiply-adds / s
(2 B H Lq Lk D per call, the keys a causal or padded row sees counted as torch computes them: all).
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F

from sparseinfer import _native
from sparseinfer.backends.cpu_routes import time_interleaved
from sparseinfer.runtime import attention

# (name, batch, heads, kv heads, rows, head size, padding, causal); "large logits": q scaled by 30, scores
# spread over hundreds (softmax weights below e^-87: subnormal products where they are not floored)
SHAPES = [
    ("MiniLM, batch of 16 (demo)", 16, 12, 12, 46, 32, True, False),
    ("MiniLM, batch of 16, large logits", 16, 12, 12, 46, 32, True, False),
    ("MiniLM, one sentence (demo)", 1, 12, 12, 33, 32, False, False),
    ("BERT-base, 8 x 128", 8, 12, 12, 128, 64, True, False),
    ("SmolLM2 prefill, 256 tokens", 1, 9, 3, 256, 64, False, True),
    ("Llama-shaped prefill, 512 tokens", 1, 32, 8, 512, 64, False, True),
]


def inputs(batch, heads, kv, rows, dim, padding, gen):
    qkv = torch.randn(batch, rows, (heads + 2 * kv) * dim, generator=gen)
    q, k, v = (t.view(batch, rows, -1, dim).transpose(1, 2) for t in qkv.split([heads * dim, kv * dim, kv * dim], -1))
    mask = None
    if padding:  # sentence b holds rows - 5b tokens (at least 1), as a padded batch of sorted lengths
        lengths = torch.tensor([max(1, rows - 5 * b) for b in range(batch)])
        mask = (torch.arange(rows)[None] < lengths[:, None])[:, None, None, :].expand(batch, 1, rows, rows)
    return q, k, v, mask


def torch_sdpa(q, k, v, mask, causal, groups):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=groups > 1).transpose(1, 2).contiguous()


def eager(q, k, v, mask, causal, groups):
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), torch.finfo(s.dtype).min)
    return (s.softmax(-1) @ v).transpose(1, 2).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    C = _native.require_native()
    gen = torch.Generator().manual_seed(0)
    print(f"ISA {C.active_isa()}, {args.threads} threads, best of {args.rounds} interleaved rounds\n")
    print("| shape | B x H/Hkv x L x D | sparseinfer | torch SDPA | eager | vs SDPA | vs eager | G multiply-adds/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, batch, heads, kv, rows, dim, padding, causal in SHAPES:
        q, k, v, mask = inputs(batch, heads, kv, rows, dim, padding, gen)
        if "large logits" in name:
            q = q * 30
        groups = heads // kv
        with torch.inference_mode():
            fns = {
                "ours": functools.partial(attention.kernel, q, k, v, mask, None, causal, gqa=True),
                "sdpa": functools.partial(torch_sdpa, q, k, v, mask, causal, groups),
                "eager": functools.partial(eager, q, k, v, mask, causal, groups),
            }
            ours = fns["ours"]()
            assert ours is not None, f"{name}: the kernel refused"
            err = (ours - fns["sdpa"]()).abs().max().item()
            assert err < 1e-4, f"{name}: differs from torch's SDPA by {err:.2e}"
            best = time_interleaved(fns, args.rounds, math.inf)
        macs = 2 * batch * heads * rows * rows * dim
        print(f"| {name} | {batch} x {heads}/{kv} x {rows} x {dim}{' (padded)' if padding else ''}"
              f"{' causal' if causal else ''} | {best['ours'] * 1e6:,.0f} µs | {best['sdpa'] * 1e6:,.0f} µs | "
              f"{best['eager'] * 1e6:,.0f} µs | {best['sdpa'] / best['ours']:.2f}x | {best['eager'] / best['ours']:.2f}x | "
              f"{macs / best['ours'] / 1e9:.1f} |")


if __name__ == "__main__":
    main()
