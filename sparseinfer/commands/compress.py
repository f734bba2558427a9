"""`sparseinfer compress MODEL RECIPE -o OUT`: compress a Hugging Face encoder, or a causal LM (a local
Hugging Face folder or a GGUF file), and save an artifact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sparseinfer as si
from sparseinfer.apps import models
from sparseinfer.eval.data import sentences
from sparseinfer.llm import load_causal_lm
from sparseinfer.recipe import Recipe, parse_layer_recipe


def register(sub):
    p = sub.add_parser("compress", help="compress a model with a recipe and save an artifact",
                       description="Compress MODEL ('minilm' = the packaged all-MiniLM-L6-v2, a local Hugging "
                                   "Face model folder, or a causal LM as a folder or a .gguf file) with RECIPE (e.g. "
                                   "int8, int4-g64, 2:4+int8, sparse90, or a YAML file) and write the artifact "
                                   "directory OUT. A causal LM's artifact holds its config and tokenizer: "
                                   "`sparseinfer generate OUT --prompt ...` runs it.")
    p.add_argument("model", metavar="MODEL", help="'minilm', a Hugging Face model folder, or a .gguf file")
    p.add_argument("recipe", metavar="RECIPE", help="recipe string or YAML file (see sparseinfer.recipe)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--calib-sentences", type=int, default=64, metavar="N",
                   help="sentences of calibration data for recipes that need it (wanda, gptq, ...); default 64")
    p.add_argument("--calib-file", metavar="TXT", help="causal LMs: calibration text (a UTF-8 file) for recipes "
                   "that need it; cut into --calib-tokens token chunks")
    p.add_argument("--calib-tokens", type=int, default=256, metavar="T", help="tokens per calibration chunk "
                   "(default 256; at most 32 chunks are used)")
    p.add_argument("--lm-head", metavar="RECIPE", help="causal LMs: compress the LM head (tied to the embedding or "
                   "not) with this recipe, e.g. int8 (default: it stays dense)")
    p.add_argument("--no-export", action="store_true",
                   help="save tensors and manifest only (load with load(path, model=skeleton))")
    p.set_defaults(func=_run)


def _run(args) -> int:
    recipe = Recipe.from_any(args.recipe)  # bad recipe: ValueError before loading anything
    if _is_causal_lm(args.model):
        return _run_causal_lm(args, recipe)
    if args.calib_file or args.lm_head:
        raise ValueError(f"--calib-file / --lm-head are for causal LMs; {args.model!r} is not one")
    if args.calib_sentences < 1:
        raise ValueError(f"--calib-sentences must be at least 1, got {args.calib_sentences}")
    model, tokenizer, path = models.load_hf(args.model)
    calib = None
    if recipe.default.needs_calibration or any(r.needs_calibration for _, r in recipe.layers):
        texts = sentences(args.calib_sentences)
        calib = [models.tokenize(tokenizer, texts[i:i + 16]) for i in range(0, len(texts), 16)]
    compressed = si.compress(model, recipe, calib=calib)
    metadata = {"model": args.model if args.model == models.MINILM else str(path), "task": "sentence-embedding",
                "pooling": "mean"}
    try:
        out = si.save(compressed, args.output, models.example_inputs(tokenizer), export=not args.no_export,
                      metadata=metadata)
    except si.runtime.serialization.ExportError as err:
        print(f"sparseinfer compress: error: {err}", file=sys.stderr)
        return 2
    print(si.explain(compressed))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


MAX_CALIB_CHUNKS = 32


def _is_causal_lm(model: str) -> bool:
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (ValueError, OSError, AttributeError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _run_causal_lm(args, recipe) -> int:
    if args.no_export:
        raise ValueError("--no-export: a causal LM's artifact records its config, not an exported program")
    if args.lm_head:
        parse_layer_recipe(args.lm_head)
        source = recipe.to_json()
        source = dict(source) if isinstance(source, dict) else {"default": source}
        source["layers"] = {"lm_head": args.lm_head, **(source.get("layers") or {})}
        recipe = Recipe.from_any(source)
    needs_calib = recipe.default.needs_calibration or any(r.needs_calibration for _, r in recipe.layers)
    if needs_calib and not args.calib_file:
        raise ValueError(f"recipe {args.recipe!r} needs calibration data: give --calib-file TEXT_FILE")
    if args.calib_tokens < 8:
        raise ValueError(f"--calib-tokens must be at least 8, got {args.calib_tokens}")
    model, tokenizer = load_causal_lm(args.model)
    calib = None
    if args.calib_file:
        text = Path(args.calib_file).read_text(encoding="utf-8")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        t = args.calib_tokens
        calib = [{"input_ids": ids[i:i + t][None]} for i in range(0, len(ids) - t + 1, t)][:MAX_CALIB_CHUNKS]
        if not calib:
            raise ValueError(f"--calib-file {args.calib_file!r} holds {len(ids)} tokens, fewer than one chunk of "
                             f"--calib-tokens {t}")
    compressed = si.compress(model, recipe, calib=calib)
    out = si.save(compressed, args.output, tokenizer=tokenizer,
                  metadata={"model": str(Path(args.model).resolve()), "task": "causal-lm"})
    print(si.explain(compressed))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB); run it with: sparseinfer generate {out} --prompt '...'")
    return 0
