"""Apply a recipe to a model: find the layers it compresses, run its passes, pack, swap modules.

``compress_with_recipe`` is ``sparseinfer.compress`` without ``target=`` (which searches recipes
with ``sparseinfer.eval`` and sits above it, in ``sparseinfer.api``).
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn
from tqdm.auto import tqdm

from ..formats import format_of, pack
from ..recipe import LayerRecipe, Recipe
from ..runtime import attention
from ..runtime.embedding import CompressedEmbedding, gathers_rows
from ..runtime.fused import fuse_shared_inputs
from ..runtime.modules import CompressedConv2d, CompressedLinear
from ..runtime.serialization import RECIPE_ATTR
from . import METHODS
from .base import Target

__all__ = ["RECIPE_ATTR", "compress_with_recipe", "fit_groups", "recipe_layers", "targets"]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fit_groups(recipe: LayerRecipe, k: int) -> LayerRecipe:
    """The recipe's pack parameters fitted to a layer with K inputs, by its format's rule (a group
    larger than the values it groups falls back to per-channel)."""
    if recipe.fmt is None:
        return recipe
    params = format_of(recipe.fmt).fit_params(recipe.params, k)
    return recipe if params == recipe.params else replace(recipe, params=params)


def recipe_layers(model: nn.Module, recipe, require: bool = False) -> list[tuple[str, nn.Module, LayerRecipe]]:
    """(name, module, layer recipe) of every nn.Linear / eligible nn.Conv2d that ``recipe`` compresses;
    ``require``: ValueError when there is none."""
    recipe = Recipe.from_any(recipe)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, module in model.named_modules():
        conv_ok = isinstance(module, nn.Conv2d) and CompressedConv2d.eligible(module) is None
        if isinstance(module, nn.Linear) or conv_ok:
            layer_recipe = recipe.for_layer(name, tied_to_embedding=id(module.weight) in tied)
            if layer_recipe is not None:
                out.append((name, module, layer_recipe))
    if require and not out:
        raise ValueError(f"recipe {recipe.to_json()!r} matches no nn.Linear / nn.Conv2d layer of "
                         f"{type(model).__name__}")
    return out


def targets(model: nn.Module, recipe: Recipe) -> list[Target]:
    """The ``Target`` of every layer ``recipe`` compresses, its weight in GEMM form [N, K]."""
    out = []
    for name, module, layer_recipe in recipe_layers(model, recipe):
        weight = module.weight.detach().reshape(module.weight.shape[0], -1)
        out.append(Target(name, module, fit_groups(layer_recipe, weight.shape[1]), weight.float().clone()))
    return out


def compress_with_recipe(model: nn.Module, recipe, calib=None, *, inplace: bool = False, backend: str | None = None,
                         progress: bool | None = None) -> nn.Module:
    """``sparseinfer.compress`` with a recipe (see there)."""
    recipe = Recipe.from_any(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    found = targets(model, recipe)
    if not found:
        if recipe.default.fmt is None and all(r.fmt is None for _, r in recipe.layers):
            return model
        raise ValueError(f"recipe {recipe.to_json()!r} matches no nn.Linear / nn.Conv2d layer of "
                         f"{type(model).__name__}")
    if calib is None:
        needing = sorted({t.recipe.text for t in found if t.recipe.needs_calibration})
        if needing:
            raise ValueError(f"recipe {needing} needs calibration data: pass calib=[batch, ...]")
    for stage in ("prune_method", "quant_method"):
        for method in sorted({getattr(t.recipe, stage) for t in found}):
            METHODS[method].run([t for t in found if getattr(t.recipe, stage) == method], calib, model)
    # disable=None lets tqdm show the bar on a terminal only
    embeddings = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for t in tqdm(found, desc="packing", unit="layer", disable=None if progress is None else not progress):
        packed = pack(t.weight, t.recipe.fmt, **{**t.recipe.params, **t.pack_kwargs})
        bias = t.module.bias.detach() if t.module.bias is not None else None
        layer = CompressedLinear(packed.to(t.module.weight.device), bias, backend)
        if isinstance(t.module, nn.Conv2d):
            c = t.module
            layer = CompressedConv2d(layer, c.kernel_size, c.stride, c.padding, c.dilation)
        _set_submodule(model, t.name, layer)
        tied = embeddings.get(id(t.module.weight))
        if tied is not None and isinstance(layer, CompressedLinear) and gathers_rows(layer.packed):
            # a head tied to the input embedding (named by the recipe): the embedding reads its rows from
            # the packed head, so the matrix stays stored once; a CSR head unties (the embedding keeps it)
            emb = model.get_submodule(tied)
            _set_submodule(model, tied, CompressedEmbedding(layer, emb.padding_idx))
    setattr(model, RECIPE_ATTR, recipe.to_json())
    # q / k / v and gate / up read one input: one packed call each (runtime/fused.py); MiniLM
    # int8 at the batch of 16: 1.78-1.79x -> 1.83x dense in memory, 1.72-1.81x -> 1.90-1.91x loaded
    fuse_shared_inputs(model)
    attention.install(model)  # a transformers model's attention on sparseinfer's kernel (runtime/attention.py)
    return model
