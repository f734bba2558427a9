"""The ``sparseinfer::packed_linear`` custom op.

Compressed layers call it while being exported, so that an exported program records each
compressed matmul as one opaque op whose inputs are the canonical packed tensors (lifted to
buffers) plus a JSON ``spec`` (format, true shape, pack parameters, tensor names). ``load``
swaps every such call back for a CompressedLinear module; running the op directly also works.
"""

from __future__ import annotations

import json

import torch

from ..formats import from_parts
from .linear import linear


def make_spec(w) -> str:
    return json.dumps({"fmt": w.fmt, "shape": list(w.shape), "params": w.params(), "names": list(w.tensors())},
                      sort_keys=True)


def packed_from_spec(tensors, spec: str):
    s = json.loads(spec)
    return from_parts(s["fmt"], dict(zip(s["names"], tensors)), s["shape"], s["params"])


@torch.library.custom_op("sparseinfer::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, tensors: list[torch.Tensor], spec: str, bias: torch.Tensor | None) -> torch.Tensor:
    return linear(x, packed_from_spec(tensors, spec), bias)


@packed_linear.register_fake
def _(x, tensors, spec, bias):
    n = json.loads(spec)["shape"][0]
    return x.new_empty(*x.shape[:-1], n)
