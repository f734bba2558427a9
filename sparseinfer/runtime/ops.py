"""The ``sparseinfer::packed_linear`` custom op.

Compressed layers call it while being exported, so that an exported program records each
compressed matmul as one opaque op whose inputs are the canonical packed tensors (lifted to
buffers) plus a JSON ``spec`` (format, true shape, pack parameters, tensor names). ``load``
swaps every such call back for a CompressedLinear module; running the op directly also works.
"""

from __future__ import annotations

import itertools
import json
import weakref

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


# -- torch.compile ---------------------------------------------------------------------------------
# Under torch.compile a compressed layer calls ``sparseinfer::layer_linear(x, handle, n)``: one opaque op
# whose handle names the live CompressedLinear (its packed weight, prepacked layouts, bias, backend and
# act), so the compiled graph neither rebuilds the packed weight nor re-reads its spec per call.
# ``prepare_compile(model)`` hands out the handles; a layer without one takes ``packed_linear`` above.

_LAYERS: dict[int, "weakref.ref"] = {}
_next_handle = itertools.count(1)


def register_layer(layer) -> int:
    handle = next(_next_handle)
    _LAYERS[handle] = weakref.ref(layer, lambda _ref, h=handle: _LAYERS.pop(h, None))
    return handle


@torch.library.custom_op("sparseinfer::layer_linear", mutates_args=())
def layer_linear(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:  # a layer or a group: both have run(x)
    ref = _LAYERS.get(handle)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"sparseinfer::layer_linear: compressed layer {handle} no longer exists")
    return layer.run(x)  # linear() through the layer's memoised direct call


@layer_linear.register_fake
def _(x, handle, n):
    return x.new_empty(*x.shape[:-1], n)
