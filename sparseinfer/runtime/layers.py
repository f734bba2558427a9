"""Compressed layers <-> manifest entries: describe each layer on save; on load, rebuild and validate
the packed weights (``from_parts``) and fill them into a skeleton model."""

from __future__ import annotations

import torch
from torch import nn

from ..act import resolve_act
from ..backends import resolve
from ..formats import from_parts
from .embedding import CompressedEmbedding
from .errors import ArtifactError
from .manifest import CONSTANT_PREFIX
from .modules import CompressedConv2d, CompressedLinear, _buffer_name


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _conv_config(conv) -> dict[str, list[int]]:
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]
    return {k: pair(getattr(conv, k)) for k in ("kernel_size", "stride", "padding", "dilation")}


def layer_entries(model: nn.Module) -> dict[str, dict]:
    """Manifest entries of the compressed layers: CompressedConv2d at its own name (its inner
    CompressedLinear is implied), CompressedLinear elsewhere."""
    entries: dict[str, dict] = {}
    inner = set()
    for name, module in model.named_modules():
        if isinstance(module, CompressedConv2d):
            inner.add(id(module.linear))
            entries[name] = _linear_entry(module.linear, f"{name}.linear" if name else "linear", "CompressedConv2d")
            entries[name]["conv"] = _conv_config(module)
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear) and id(module) not in inner:
            entries[name] = _linear_entry(module, name, "CompressedLinear")
    return entries


def embedding_entries(model: nn.Module) -> dict[str, str]:
    """{CompressedEmbedding name: name of the compressed head whose packed rows it reads}."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedEmbedding):
            if id(m.head) not in names:
                raise ValueError(f"save: embedding {name!r} reads a compressed head that is not part of the model")
            out[name] = names[id(m.head)]
    return out


def _linear_entry(layer: CompressedLinear, prefix: str, kind: str) -> dict:
    w = layer.packed
    key = lambda n: f"{prefix}.{n}" if prefix else n
    return {"module": kind, "fmt": w.fmt, "shape": list(w.shape), "params": w.params(),
            "tensors": {n: key(_buffer_name(n)) for n in w.tensors()},
            "bias": key("bias") if layer.bias is not None else None,
            "nbytes": w.nbytes, "dense_nbytes": w.dense_nbytes}


def packed_layers(manifest: dict, tensors: dict) -> dict[str, tuple]:
    """{layer name: (PackedWeight, bias or None, entry)}, each validated by ``from_parts``."""
    out = {}
    for name, e in manifest["layers"].items():
        try:
            parts = {n: tensors[k] for n, k in e["tensors"].items()}
            packed = from_parts(e["fmt"], parts, e["shape"], e["params"])
            if packed.params() != e["params"]:  # an unknown or mistyped parameter would be read as a default
                raise ValueError(f"params {e['params']} are not those of the format ({packed.params()})")
            bias = tensors[e["bias"]] if e["bias"] is not None else None
            if bias is not None and tuple(bias.shape) != (packed.shape[0],):
                raise ValueError(f"bias of shape {tuple(bias.shape)} for {packed.shape[0]} outputs")
            if e["module"] == "CompressedConv2d" and not isinstance(e.get("conv"), dict):
                raise ValueError("a CompressedConv2d entry needs its conv parameters")
        except KeyError as err:
            raise ArtifactError(f"layer {name!r}: the manifest names tensor or field {err} that is missing") from None
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"layer {name!r}: the manifest does not match the tensors: {err}") from None
        out[name] = (packed, bias, e)
    return out


def fill_skeleton(model: nn.Module, manifest: dict, tensors: dict, layers: dict, backend: str | None) -> nn.Module:
    """Replace the manifest's layers of a user-built (dense or compressed) model by compressed
    ones built from the artifact, then load every other tensor strictly."""
    for name, (packed, bias, e) in layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"the model has no layer {name!r}, which the artifact compressed "
                                f"(is this the right model class?)") from None
        n, k = packed.shape
        linear = CompressedLinear(packed, bias, backend)
        if e["module"] == "CompressedConv2d":
            conv = e["conv"]
            if isinstance(current, nn.Conv2d):
                got = (current.out_channels, current.in_channels * current.kernel_size[0] * current.kernel_size[1])
                cfg = _conv_config(current)
            elif isinstance(current, CompressedConv2d):
                got, cfg = (current.linear.out_features, current.linear.in_features), _conv_config(current)
            else:
                raise ArtifactError(f"layer {name!r}: the artifact holds a conv layer but the model has "
                                    f"{type(current).__name__}")
            if got != (n, k) or cfg != conv:
                raise ArtifactError(f"layer {name!r}: the model's conv {got} {cfg} does not match the artifact's "
                                    f"{(n, k)} {conv}")
            new = CompressedConv2d(linear, *(tuple(conv[f]) for f in ("kernel_size", "stride", "padding", "dilation")))
        else:
            if isinstance(current, nn.Linear) or isinstance(current, CompressedLinear):
                got = (current.out_features, current.in_features)
            else:
                raise ArtifactError(f"layer {name!r}: the artifact holds a linear layer but the model has "
                                    f"{type(current).__name__}")
            if got != (n, k):
                raise ArtifactError(f"layer {name!r}: the model's layer is {got[0]}x{got[1]}, the artifact's {n}x{k}")
            new = linear
        if not name:
            raise ArtifactError("a model that is itself one compressed layer cannot be filled; wrap it in a module")
        set_submodule(model, name, new)
    for name, head in (manifest.get("embeddings") or {}).items():
        fill_embedding(model, name, head, layers)
    dense = {k: v for k, v in tensors.items() if not k.startswith(CONSTANT_PREFIX)}
    try:
        result = model.load_state_dict(dense, strict=False, assign=True)
    except RuntimeError as err:
        raise ArtifactError(f"the artifact's tensors do not fit the model: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(f"the artifact does not match the model (is this the right model class?): the model has "
                            f"tensors the artifact lacks {result.missing_keys[:8]}, the artifact has tensors the "
                            f"model lacks {result.unexpected_keys[:8]}")
    for alias, target in manifest["aliases"].items():  # assign=True gave tied names separate tensors: re-tie
        if not alias.startswith(CONSTANT_PREFIX):
            owner, _, attr = alias.rpartition(".")
            t_owner, _, t_attr = target.rpartition(".")
            setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(t_owner), t_attr))
    return model


def fill_embedding(model: nn.Module, name: str, head: str, layers: dict) -> None:
    """Replace the embedding ``name`` by one reading the rows of the compressed layer ``head``."""
    if head not in layers or layers[head][2]["module"] != "CompressedLinear":
        raise ArtifactError(f"embedding {name!r} reads layer {head!r}, which the artifact does not hold as a "
                            f"compressed linear layer")
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"the model has no embedding {name!r}, which the artifact ties to {head!r}") from None
    linear = model.get_submodule(head)
    if not isinstance(current, (nn.Embedding, CompressedEmbedding)) or (
            current.num_embeddings, current.embedding_dim) != (linear.out_features, linear.in_features):
        raise ArtifactError(f"{name!r} is not an embedding of {linear.out_features}x{linear.in_features} "
                            f"(the shape of {head!r})")
    try:
        set_submodule(model, name, CompressedEmbedding(linear, current.padding_idx))
    except ValueError as err:
        raise ArtifactError(f"embedding {name!r}: {err}") from None


def prepack(model: nn.Module) -> None:
    """Each layer's weight in the layout of the backend a one-row call would take, with what its
    activation mode needs (``Backend.prepack``)."""
    done = set()
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            act = m.act
            if m._group is not None:  # its calls run on the group's joint weight (fused.py)
                m = m._group.joint
            if id(m) in done:
                continue
            done.add(id(m))
            w = m.packed
            row = torch.empty(1, w.shape[1], device=w.device)  # names the device and dtype for resolve
            resolve(w, row, m.backend).prepack(w, resolve_act(act))
