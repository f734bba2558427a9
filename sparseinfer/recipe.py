"""Recipes: which packed format each layer gets, and which passes produce it.

A recipe is a string for the whole model, or a dict (or a YAML file holding one)::

    "int8"              int8, per-channel scales
    "int8-g128"         int8, groups of 128
    "int4"              int4, groups of formats.int4.DEFAULT_GROUP_SIZE, symmetric ("int4-g64",
                        "int4-pc" per-channel, "int4-g128-asym" with zero points)
    "2:4"  "4:8"  "1:4" N:M sparsity with float values (any N < M)
    "2:4+int8"          N:M, kept values int8 ("2:4+int4", "2:4+int4-g64")
    "sparse90"          90% unstructured magnitude pruning per layer, CSR ("sparse90-global"
                        prunes against one threshold for all layers; "sparse90+int8" CSR int8)
    "dense"             leave the layer alone

A method may prefix a recipe ("wanda:2:4", "gptq:int4"); "magnitude" and "rtn" (round to
nearest) are the defaults and need no calibration data.

    {"default": "int4",
     "layers": {"*.attention.*": "int8", "encoder.layer.5.*": "dense"},   # first match wins
     "ignore": ["pooler.*"],
     "methods": {"prune": "magnitude", "quantize": "rtn"}}

The format part (after any method) is read by the registered formats (``from_recipe`` in
``sparseinfer/formats/*.py``), so a new format brings its own syntax.

Layers whose weight is tied to an embedding (LM heads) and names matching ``lm_head`` stay
dense unless a ``layers`` pattern names them explicitly.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .formats import parse_recipe_part
from .passes import METHODS

DEFAULT_IGNORE = ("lm_head", "*.lm_head")


@dataclass(frozen=True)
class LayerRecipe:
    """What one layer becomes. ``fmt`` None means the layer stays dense."""

    fmt: str | None
    params: dict[str, Any] = field(default_factory=dict)  # pack parameters (group_size, symmetric)
    sparsity: float | None = None  # unstructured pruning before packing (CSR)
    scope: str = "layer"  # "layer" or "global" threshold for unstructured pruning
    prune_method: str = "magnitude"
    quant_method: str = "rtn"
    text: str = ""  # the string it was parsed from

    @property
    def needs_calibration(self) -> bool:
        return any(METHODS[m].needs_calibration for m in (self.prune_method, self.quant_method) if m in METHODS)


def parse_layer_recipe(text: str, methods: dict | None = None) -> LayerRecipe:
    """Parse one recipe string (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"recipe must be a non-empty string, got {text!r}")
    s = text.strip().lower()
    prune_method = (methods or {}).get("prune", "magnitude")
    quant_method = (methods or {}).get("quantize", "rtn")
    head, sep, rest = s.partition(":")
    if sep and head in METHODS:  # "wanda:2:4", "gptq:int4"
        s = rest
        if METHODS[head].stage == "prune":
            prune_method = head
        else:
            quant_method = head
    for m in (prune_method, quant_method):
        if m not in METHODS:
            raise ValueError(f"recipe {text!r}: unknown method {m!r}; known: {sorted(METHODS)}")
    if s == "dense":
        return LayerRecipe(None, text=text)
    part = parse_recipe_part(s, text)  # each registered format reads its own syntax
    return LayerRecipe(part.fmt, part.params, part.sparsity, part.scope, prune_method=prune_method,
                       quant_method=quant_method, text=text)


@dataclass
class Recipe:
    """A whole-model recipe: a default, per-layer glob overrides (first match wins), an ignore list."""

    default: LayerRecipe
    layers: list[tuple[str, LayerRecipe]] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    source: Any = None  # what it was built from, for the manifest

    @classmethod
    def from_any(cls, recipe) -> "Recipe":
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Path) or (isinstance(recipe, str) and recipe.endswith((".yaml", ".yml"))):
            path = Path(recipe)
            if not path.is_file():
                raise ValueError(f"recipe file {str(path)!r} does not exist")
            data = yaml.safe_load(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"recipe file {str(path)!r} must hold a mapping, got {type(data).__name__}")
            return cls.from_any(data)
        if isinstance(recipe, str):
            return cls(parse_layer_recipe(recipe), source=recipe)
        if isinstance(recipe, dict):
            unknown = set(recipe) - {"default", "layers", "ignore", "methods"}
            if unknown:
                raise ValueError(f"recipe: unknown keys {sorted(unknown)}; expected default, layers, ignore, methods")
            methods = recipe.get("methods") or {}
            default = parse_layer_recipe(recipe.get("default", "dense"), methods)
            layers = [(str(p), parse_layer_recipe(r, methods)) for p, r in (recipe.get("layers") or {}).items()]
            ignore = [str(p) for p in recipe.get("ignore") or []]
            return cls(default, layers, ignore, source=recipe)
        raise ValueError(f"recipe must be a string, dict or YAML path, got {type(recipe).__name__}")

    def for_layer(self, name: str, tied_to_embedding: bool = False) -> LayerRecipe | None:
        """The recipe for a layer, or None when it stays dense."""
        for pattern, layer_recipe in self.layers:
            if fnmatch.fnmatchcase(name, pattern):
                return layer_recipe if layer_recipe.fmt else None
        if any(fnmatch.fnmatchcase(name, p) for p in (*self.ignore, *DEFAULT_IGNORE)) or tied_to_embedding:
            return None
        return self.default if self.default.fmt else None

    def to_json(self) -> Any:
        return self.source
