"""What a pass edits (``Target``) and the registry of methods recipes name ("magnitude", "rtn", ...).

A method has a stage: "prune" methods run first and zero weights (or choose N:M survivors);
"quantize" methods run second and may fix quantization parameters (``pack_kwargs["scale"]`` ...)
for ``pack``. Register one with ``@register_method(name, stage)`` in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:  # the recipe layer sits above the passes (it names their methods)
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
