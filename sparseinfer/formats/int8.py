"""int8: symmetric 8-bit weights with per-channel or per-group float32 scales.

Layout (N = out_features, K = in_features, g = group size, Kp = K rounded up to g, G = Kp / g)::

    qweight  int8    [N, Kp]   W[n, k] ~= qweight[n, k] * scale[n, k // g]; columns >= K are 0
    scale    float32 [N, G]    per group; G == 1 is per-channel

The entry of largest magnitude in a group maps to code -128 (signed absmax, see base.py).
"""

from __future__ import annotations

import math

import torch

from .base import (PackedWeight, RecipePart, check_group_size, check_tensor, check_weight, fit_group_params, pad_k,
                   read_quant_recipe, symmetric_quantize)
from .registry import register_format


@register_format
class Int8Weight(PackedWeight):
    kind = "int8"
    bits = 8
    grammar = "'int8'"
    recipe_grammar = "int8[-gN|-pc]"
    takes_scales = True

    @classmethod
    def parse_name(cls, name):
        return {} if name == "int8" else None

    @classmethod
    def from_recipe(cls, token, text):
        options = read_quant_recipe(token, "int8")
        if options is None:
            return None
        group, sym = options
        if sym == "asym":
            raise ValueError(f"recipe {text!r}: int8 is symmetric only")
        return RecipePart("int8", {"group_size": int(group[1:]) if group and group != "pc" else None})

    @classmethod
    def fit_params(cls, fixed, params, k):
        return fit_group_params(params, k)

    @classmethod
    def value_bits(cls, fixed):
        return cls.bits

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, k: int, group_size: int | None):
        super().__init__()
        self.qweight, self.scale = qweight.contiguous(), scale.contiguous()  # kernels view them as they are
        self.shape = (qweight.shape[0], k)
        self.group_size = group_size  # as given to pack; None = per-channel
        self.g = qweight.shape[1] // scale.shape[1]  # effective group length
        self.fmt = "int8"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, group_size: int | None = None, scale: torch.Tensor | None = None,
                   fmt: str = "int8") -> "Int8Weight":
        """Quantize ``weight`` [N, K]; ``scale`` [N, G] may be given (e.g. by GPTQ) instead of computed."""
        check_weight(weight, fmt)
        n, k = weight.shape
        g = check_group_size(group_size, k, fmt, weight.shape)
        groups = pad_k(weight.float(), g).reshape(n, -1, g)
        if scale is not None:
            scale = check_tensor({"scale": scale.float()}, "scale", torch.float32, groups.shape[:2], fmt)
        codes, scale = symmetric_quantize(groups, 8, scale)
        return cls(codes.to(torch.int8).reshape(n, -1), scale, k, group_size)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        n, k = self.shape
        groups = self.qweight.reshape(n, -1, self.g).float() * self.scale.unsqueeze(-1)
        return groups.reshape(n, -1)[:, :k].to(dtype)

    def tensors(self):
        return {"qweight": self.qweight, "scale": self.scale}

    def params(self):
        return {"group_size": self.group_size}

    @classmethod
    def from_parts(cls, tensors, shape, params, fmt: str = "int8"):
        (n, k), gs = shape, params.get("group_size")
        g = check_group_size(gs, k, "int8", shape)
        kp = math.ceil(k / g) * g
        return cls(check_tensor(tensors, "qweight", torch.int8, (n, kp), "int8"),
                   check_tensor(tensors, "scale", torch.float32, (n, kp // g), "int8"), k, gs)
