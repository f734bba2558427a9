"""`sparseinfer generate ARTIFACT --prompt ...`: load a causal LM artifact (no model code), stream greedy
tokens, and report prefill and decode speed."""

from __future__ import annotations

import sys
import time

import sparseinfer as si
from sparseinfer.act import ACT_MODES
from sparseinfer.backends import cpu_routes
from sparseinfer.lean_llama import KV_CACHES
from sparseinfer.llm import DECODERS, compile_model, decode_threads, greedy


def register(sub):
    p = sub.add_parser("generate", help="generate text with a causal LM artifact",
                       description="Load ARTIFACT (made by `sparseinfer compress` from a causal LM, or by "
                                   "si.save(model, path, tokenizer=...)), decode greedily from --prompt while "
                                   "printing the tokens, then report prefill and decode tokens/s.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default 64")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="threads for the compressed kernels (default: all of torch's); the rest of each "
                        "batch-1 step runs on one thread (see sparseinfer.llm.decode_threads)")
    p.add_argument("--act", choices=ACT_MODES, default=None,
                   help="activation precision the CPU kernels may use (default: SPARSEINFER_ACT, else auto)")
    p.add_argument("--decoder", choices=DECODERS, default="auto",
                   help="the forward each step runs: native (one C++ call per token; float32 models), "
                        "lean (sparseinfer.lean_llama's Python steps: transformers' logits bit for bit; "
                        "transformers' Llama / Mistral only), transformers (the model's own), auto (default: "
                        "native, else lean, where supported)")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="model",
                   help="the KV cache's precision: model (default: the model's dtype) or fp16 (half the bytes a "
                        "step reads from a long context's cache; lean and native decoders)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first (sparseinfer.llm.compile_model; it runs transformers' "
                        "forward, not the lean decoder): compiling takes minutes on a few cores (the first "
                        "prefill and decode step), and with int8 activations the tokens may differ from eager's "
                        "after a while")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    t0 = time.perf_counter()
    model = si.load(args.artifact, act=args.act)
    tokenizer = si.load_tokenizer(args.artifact)
    loaded = time.perf_counter() - t0
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    shown, tokens = "", []

    def stream(token: int) -> None:  # decode the whole text each time: merges of multi-byte tokens stay right
        nonlocal shown
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    if args.compile:
        compile_model(model)
        with decode_threads(args.threads):  # compile prefill and decode now, so that the speeds below are the model's
            t1 = time.perf_counter()
            greedy(model, ids, 2, decoder=args.decoder)
        print(f"compiled in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    sys.stdout.write(args.prompt if not args.chat else "")
    measured = cpu_routes.measuring_seconds()
    with decode_threads(args.threads):
        g = greedy(model, ids, args.max_new_tokens, eos_token_id=model.generation_config.eos_token_id, on_token=stream,
                   decoder=args.decoder, kv_cache=args.kv_cache)
    measured = cpu_routes.measuring_seconds() - measured
    print()
    print(f"loaded in {loaded:.1f} s; prefill {g.prompt_tokens} tokens in {g.prefill_s * 1e3:.0f} ms "
          f"({g.prefill_tokens_per_s:.1f} tokens/s); decode {len(g.tokens) - 1} tokens at "
          f"{g.decode_tokens_per_s:.1f} tokens/s ({g.decoder} decoder)", file=sys.stderr)
    if measured >= 0.05:  # a first run on this machine: say so, or the figures above look like the model's
        print(f"these include {measured:.2f} s of timing kernel routes on first use (layer shapes and batch sizes "
              f"this machine's route cache had not settled; the results are stored for later runs)", file=sys.stderr)
    return 0
