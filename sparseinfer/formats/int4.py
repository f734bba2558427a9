"""int4: 4-bit weights, two per byte, with per-group float32 scales and optional zero points.

Layout (N = out_features, K = in_features, g = group size, Kp = K rounded up to g (and to an
even number), G = Kp / g)::

    qweight  uint8   [N, Kp / 2]  element k of row n in byte k // 2: low nibble = even k
    scale    float32 [N, G]
    zero     uint8   [N, G]       only when symmetric=False; symmetric weights use zero = 8

    W[n, k] ~= (code(n, k) - zero[n, k // g]) * scale[n, k // g],   code in 0..15

Symmetric: the entry of largest magnitude in a group maps to code 0 (= -8 + 8, see base.py).
Asymmetric: scale = (max - min) / 15 over the group's range widened to include 0.
"""

from __future__ import annotations

import math

import torch

from .base import (DEFAULT, PackedWeight, RecipePart, asymmetric_quantize, check_group_size, check_tensor,
                   check_weight, fit_group_params, fit_group_size, pad_k, read_quant_recipe, symmetric_quantize)
from .registry import register_format

DEFAULT_GROUP_SIZE = 128  # the one definition (recipes ask for it); rows shorter than it get one group


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes int [..., 2j] in 0..15 -> uint8 [..., j], low nibble first."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., j] -> int32 [..., 2j] codes in 0..15."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int32)


def _check_zero(zero, shape, fmt: str) -> torch.Tensor:
    """Caller-given zero points: integers 0..15 of shape [N, G] (a uint8 cast would wrap -3 to 253)."""
    if not isinstance(zero, torch.Tensor) or tuple(zero.shape) != tuple(shape):
        got = tuple(zero.shape) if isinstance(zero, torch.Tensor) else type(zero).__name__
        raise ValueError(f"pack({fmt!r}): zero must be a tensor of shape {tuple(shape)} (one per group), got {got}")
    if zero.is_floating_point() and not torch.equal(zero, zero.round()):
        raise ValueError(f"pack({fmt!r}): zero points must be integers")
    if zero.numel() and (zero.min() < 0 or zero.max() > 15):
        raise ValueError(f"pack({fmt!r}): zero points must lie in 0..15, got {zero.min().item()}..{zero.max().item()}")
    return zero.to(torch.int32)


@register_format
class Int4Weight(PackedWeight):
    kind = "int4"
    bits = 4
    grammar = "'int4'"
    recipe_grammar = "int4[-gN|-pc][-asym]"
    takes_scales = True

    @classmethod
    def parse_name(cls, name):
        return {} if name == "int4" else None

    @classmethod
    def from_recipe(cls, token, text):
        options = read_quant_recipe(token, "int4")
        if options is None:
            return None
        group, sym = options
        group_size = None if group == "pc" else int(group[1:]) if group else DEFAULT_GROUP_SIZE
        return RecipePart("int4", {"group_size": group_size, "symmetric": sym != "asym"})

    @classmethod
    def fit_params(cls, fixed, params, k):
        return fit_group_params(params, k)

    @classmethod
    def value_bits(cls, fixed):
        return cls.bits

    def __init__(self, qweight, scale, zero, k: int, group_size: int | None):
        super().__init__()
        # contiguous: kernels view the tensors as they are (and follow them when they are written in place)
        self.qweight, self.scale = qweight.contiguous(), scale.contiguous()
        self.zero = None if zero is None else zero.contiguous()
        self.shape = (qweight.shape[0], k)
        self.group_size = group_size  # as given to pack; None = per-channel
        self.g = qweight.shape[1] * 2 // scale.shape[1]  # effective group length
        self.symmetric = zero is None
        self.fmt = "int4"

    @staticmethod
    def _group_len(group_size, k, fmt, shape) -> int:
        g = check_group_size(group_size, k, fmt, shape)
        return g + (g & 1)  # per-channel with odd K: pad the row to a whole byte

    @classmethod
    def from_dense(cls, weight: torch.Tensor, group_size: int | None = DEFAULT, symmetric: bool = True,
                   scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                   fmt: str = "int4") -> "Int4Weight":
        """Quantize ``weight`` [N, K]. ``scale`` (and ``zero`` when asymmetric) [N, G] may be given.
        ``group_size`` by default: DEFAULT_GROUP_SIZE, or one group per row when K is shorter."""
        check_weight(weight, fmt)
        n, k = weight.shape
        if group_size is DEFAULT:
            group_size = fit_group_size(DEFAULT_GROUP_SIZE, k)
        g = cls._group_len(group_size, k, fmt, weight.shape)
        groups = pad_k(weight.float(), g).reshape(n, -1, g)
        if scale is not None:
            scale = check_tensor({"scale": scale.float()}, "scale", torch.float32, groups.shape[:2], fmt)
            if not symmetric and zero is None:
                raise ValueError(f"pack({fmt!r}): symmetric=False with a given scale needs zero as well")
        if zero is not None:
            if symmetric:
                raise ValueError(f"pack({fmt!r}): zero points were given but symmetric=True (zero is 8); "
                                 f"pass symmetric=False")
            zero = _check_zero(zero, groups.shape[:2], fmt)
        if symmetric:
            codes, scale = symmetric_quantize(groups, 4, scale)
            codes, zero = codes + 8, None
        else:
            codes, scale, zero = asymmetric_quantize(groups, 4, scale, zero)
            zero = zero.to(torch.uint8)
        return cls(pack_nibbles(codes.reshape(n, -1)), scale, zero, k, group_size)

    def codes(self) -> torch.Tensor:
        """Unpacked codes int32 [N, Kp] in 0..15."""
        return unpack_nibbles(self.qweight)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.float32
        n, k = self.shape
        codes = self.codes().reshape(n, -1, self.g)
        zero = 8 if self.zero is None else self.zero.to(torch.int32).unsqueeze(-1)
        groups = (codes - zero).float() * self.scale.unsqueeze(-1)
        return groups.reshape(n, -1)[:, :k].to(dtype)

    def tensors(self):
        t = {"qweight": self.qweight, "scale": self.scale}
        if self.zero is not None:
            t["zero"] = self.zero
        return t

    def params(self):
        return {"group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_parts(cls, tensors, shape, params, fmt: str = "int4"):
        (n, k), gs = shape, params.get("group_size")
        g = cls._group_len(gs, k, "int4", shape)
        kp = math.ceil(k / g) * g
        zero = None
        if not params.get("symmetric", True):
            zero = check_tensor(tensors, "zero", torch.uint8, (n, kp // g), "int4")
            if int(zero.max()) > 15:
                raise ValueError("int4: zero points must lie in 0..15")
        return cls(check_tensor(tensors, "qweight", torch.uint8, (n, kp // 2), "int4"),
                   check_tensor(tensors, "scale", torch.float32, (n, kp // g), "int4"), zero, k, gs)
