"""`sparseinfer compress MODEL RECIPE -o OUT`: compress a Hugging Face encoder and save an artifact."""

from __future__ import annotations

import sys

import sparseinfer as si
from sparseinfer import models
from sparseinfer.eval.data import sentences
from sparseinfer.recipe import Recipe


def register(sub):
    p = sub.add_parser("compress", help="compress a model with a recipe and save an artifact",
                       description="Compress MODEL ('minilm' = the packaged all-MiniLM-L6-v2, or a local Hugging "
                                   "Face model folder) with RECIPE (e.g. int8, int4-g64, 2:4+int8, sparse90, or a "
                                   "YAML file) and write the artifact directory OUT.")
    p.add_argument("model", metavar="MODEL", help="'minilm' or a Hugging Face model folder")
    p.add_argument("recipe", metavar="RECIPE", help="recipe string or YAML file (see sparseinfer.recipe)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--calib-sentences", type=int, default=64, metavar="N",
                   help="sentences of calibration data for recipes that need it (wanda, gptq, ...); default 64")
    p.add_argument("--no-export", action="store_true",
                   help="save tensors and manifest only (load with load(path, model=skeleton))")
    p.set_defaults(func=_run)


def _run(args) -> int:
    recipe = Recipe.from_any(args.recipe)  # bad recipe: ValueError before loading anything
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
