"""compress() and explain(): turn a dense model into a compressed one, and say what it runs."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import resolve
from .formats import pack
from .passes import METHODS, Target
from .passes.calibration import as_calibration
from .recipe import LayerRecipe, Recipe
from .runtime.modules import CompressedConv2d, CompressedLinear

RECIPE_ATTR = "_sparseinfer_recipe"  # where compress() leaves the recipe for save()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _fit_groups(recipe: LayerRecipe, k: int) -> LayerRecipe:
    """A group larger than the layer's K (or an N:M layer's kept values) falls back to per-channel."""
    g = recipe.params.get("group_size")
    if g is None or recipe.fmt is None:
        return recipe
    if "+" in recipe.fmt and ":" in recipe.fmt:
        n, m = (int(v) for v in recipe.fmt.split("+")[0].split(":"))
        k = -(-k // m) * n
    return recipe if g <= k else replace(recipe, params={**recipe.params, "group_size": None})


def _targets(model: nn.Module, recipe: Recipe) -> list[Target]:
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
        elif isinstance(module, nn.Conv2d) and CompressedConv2d.eligible(module) is None:
            weight = module.weight.detach().reshape(module.out_channels, -1)
        else:
            continue
        layer_recipe = recipe.for_layer(name, tied_to_embedding=id(module.weight) in tied)
        if layer_recipe is None:
            continue
        targets.append(Target(name, module, _fit_groups(layer_recipe, weight.shape[1]), weight.float().clone()))
    return targets


def compress(model: nn.Module, recipe=None, calib=None, *, inplace: bool = False, backend: str | None = None,
             progress: bool | None = None, target=None, data=None, tokenizer=None) -> nn.Module:
    """Replace the eligible nn.Linear / nn.Conv2d layers of ``model`` by compressed ones.

    recipe: a string ("int8", "int4-g64", "2:4+int8", "sparse90", ...), a dict with per-layer
    overrides, or a YAML path (see ``sparseinfer.recipe``). calib: calibration batches for
    methods that need them (an iterable of model inputs), or text -- a list of strings or a file
    path -- with ``tokenizer`` (cut into windows of 512 tokens, see ``passes.calibration.text_batches``). The model is copied first unless
    ``inplace``. ``backend`` pins every layer to one backend (default: best available per call).
    target: instead of a recipe, an allowed quality drop (e.g. 0.01), or {"max_drop", "minimize":
    "latency"|"size", "candidates"}: a per-layer recipe is searched on ``data`` (evaluation
    batches) and measured on this machine (see ``sparseinfer.eval.autotune``).
    """
    if target is not None:
        if recipe is not None or inplace:
            raise ValueError("compress: pass a recipe or target=, not both (target= does not support inplace=True)")
        from .eval.autotune import compress_to_target

        return compress_to_target(model, target, data, calib=calib, backend=backend, progress=progress)
    if recipe is None:
        raise ValueError("compress: give a recipe, or target= with data=")
    calib = as_calibration(calib, tokenizer)
    recipe = Recipe.from_any(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    targets = _targets(model, recipe)
    if not targets:
        if recipe.default.fmt is None and all(r.fmt is None for _, r in recipe.layers):
            return model
        raise ValueError(f"recipe {recipe.to_json()!r} matches no nn.Linear / nn.Conv2d layer of {type(model).__name__}")
    if calib is None:
        needing = sorted({t.recipe.text for t in targets if t.recipe.needs_calibration})
        if needing:
            raise ValueError(f"recipe {needing} needs calibration data: pass calib=[batch, ...]")
    for stage in ("prune_method", "quant_method"):
        for method in sorted({getattr(t.recipe, stage) for t in targets}):
            METHODS[method].run([t for t in targets if getattr(t.recipe, stage) == method], calib, model)
    # disable=None lets tqdm show the bar on a terminal only
    for t in tqdm(targets, desc="packing", unit="layer", disable=None if progress is None else not progress):
        packed = pack(t.weight, t.recipe.fmt, **{**t.recipe.params, **t.pack_kwargs})
        bias = t.module.bias.detach() if t.module.bias is not None else None
        layer = CompressedLinear(packed.to(t.module.weight.device), bias, backend)
        if isinstance(t.module, nn.Conv2d):
            c = t.module
            layer = CompressedConv2d(layer, c.kernel_size, c.stride, c.padding, c.dilation)
        _set_submodule(model, t.name, layer)
    setattr(model, RECIPE_ATTR, recipe.to_json())
    return model


class Explanation(list):
    """Rows (dicts) describing each compressed layer; prints as a table."""

    COLUMNS = ("layer", "format", "shape", "packed_bytes", "dense_bytes", "ratio", "backend", "kernel", "path", "act",
               "why")

    def __str__(self) -> str:
        rows = [[str(r[c]) for c in self.COLUMNS] for r in self]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(self.COLUMNS)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        packed = sum(r["packed_bytes"] for r in self)
        dense = sum(r["dense_bytes"] for r in self)
        total = f"total: {len(self)} compressed layers, {packed / 1e6:.2f} MB packed vs {dense / 1e6:.2f} MB fp32"
        return "\n".join([line(self.COLUMNS), *(line(r) for r in rows), total])


def explain(model: nn.Module, batch: int = 1, dtype: torch.dtype = torch.float32) -> Explanation:
    """Per compressed layer: format, packed vs fp32 bytes, and what a call with ``batch`` rows of
    ``dtype`` activations would run on the layer's device: backend, kernel, path ("kernel", or the
    "dense" fallback / "dense_int8" where that was measured faster), the activation precision that
    runs (act) and why (measured times or the table and rule that decided, and the act mode)."""
    rows = Explanation()
    for name, module in model.named_modules():
        if not isinstance(module, CompressedLinear):
            continue
        w = module.packed
        x = torch.empty(batch, w.shape[1], dtype=dtype, device=w.device)
        b = resolve(w, x, module.backend)
        rows.append({"layer": name, "format": w.fmt, "shape": f"{w.shape[0]}x{w.shape[1]}",
                     "packed_bytes": w.nbytes, "dense_bytes": w.dense_nbytes,
                     "ratio": f"{w.dense_nbytes / w.nbytes:.2f}x", "backend": b.name,
                     **b.describe(w, batch, module.act)})
    return rows
