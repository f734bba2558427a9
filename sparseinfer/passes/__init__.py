"""Compression passes. A pass edits ``Target``s -- the dense GEMM-form weight of each layer to
be compressed and the keyword arguments its ``pack`` call will get -- and never calls a kernel.

Methods register under a name used in recipes ("magnitude", "rtn", ...). A method has a stage:
"prune" methods run first and zero weights (or choose N:M survivors); "quantize" methods run
second and may fix quantization parameters (``pack_kwargs["scale"]`` ...) for ``pack``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..recipe import LayerRecipe


@dataclass
class Target:
    name: str
    module: nn.Module  # the original nn.Linear / nn.Conv2d
    recipe: LayerRecipe
    weight: torch.Tensor  # float32 [N, K] GEMM form, edited by passes
    pack_kwargs: dict[str, Any] = field(default_factory=dict)
    quantized: bool = False  # a calibrated quantizer already fixed its grid (a joint prune + quantize sweep)


@dataclass(frozen=True)
class Method:
    name: str
    stage: str  # "prune" or "quantize"
    needs_calibration: bool
    run: Callable[[list[Target], Any, nn.Module], None]  # (targets, calib, model)


METHODS: dict[str, Method] = {}


def register_method(name: str, stage: str, needs_calibration: bool = False):
    def wrap(fn):
        METHODS[name] = Method(name, stage, needs_calibration, fn)
        return fn

    return wrap


from . import prune, quantize, wanda, sparsegpt, gptq  # noqa: E402,F401  (register the built-in methods)

__all__ = ["Target", "Method", "METHODS", "register_method"]
