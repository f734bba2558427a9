"""Compress time of SparseGPT 2:4 against 2:4+int4 (SparseGPT+GPTQ in one sweep), interleaved.

    python docs/scripts/compress_time.py --layers 4 --windows 4 --repeats 3 --lock /work/bench.lock

A random Llama with SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 9 heads, 3 KV heads; fewer
layers), calibration on random token windows of 512. The recipes alternate, each compress timed
alone (holding ``--lock`` when given), and the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import sparseinfer as si

sys.path.insert(0, str(Path(__file__).parent))
from llm_accuracy import JOINT, locked  # noqa: E402

RECIPES = {"sparsegpt:2:4": "sparsegpt:2:4", "sparsegpt+gptq:2:4+int4-g128": JOINT}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lock", default=None)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3)
    model = LlamaForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 4096, (1, 512))} for _ in range(args.windows)]
    times: dict[str, list[float]] = {name: [] for name in RECIPES}
    for _ in range(args.repeats):
        for name, recipe in RECIPES.items():
            with locked(args.lock):
                t0 = time.perf_counter()
                si.compress(model, recipe, calib=calib, progress=False)
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name}: median {med[name]:.1f} s  ({', '.join(f'{t:.1f}' for t in ts)})")
    a, b = med.values()
    print(f"ratio joint / sparsegpt:2:4 = {b / a:.2f}")


if __name__ == "__main__":
    main()
