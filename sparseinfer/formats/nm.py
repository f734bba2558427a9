"""N:M structured sparsity: in every group of M consecutive weights along K at most N are non-zero.

Layout (Kp = K rounded up to M, Kc = Kp * N / M kept values per row, b = ceil(log2 M) bits)::

    values  [N_out, Kc]  the kept weights of each group, in increasing index order; either
                         float (the weight's dtype) or an int8 / int4 packed matrix of shape
                         (N_out, Kc) -- "2:4+int8", "2:4+int4" -- whose groups run along Kc
                         (a group of 128 int4 values covers 256 columns of a 2:4 weight)
    meta    uint8 [N_out, ceil(Kc * b / 8)]
                         each kept value's index inside its group of M, b bits per value,
                         packed as a little-endian bit stream per row (2:4: one byte holds
                         the 4 indices of 2 groups, first index in the lowest bits)

Selection keeps the N largest magnitudes per group; ties (zeros included) go to the lower
index, which makes packing canonical.
"""

from __future__ import annotations

import math
import re

import torch

from .base import FLOAT_DTYPES, PackedWeight, RecipePart, check_tensor, check_weight, pad_k
from .int4 import Int4Weight
from .int8 import Int8Weight
from .registry import register_format

QUANTIZED_VALUES = {"int8": Int8Weight, "int4": Int4Weight}


_NAME = re.compile(r"^(\d+):(\d+)(?:\+(int8|int4))?$")
_RECIPE = re.compile(r"^(\d+):(\d+)(?:\+(.+))?$")  # the value part is read by the value format


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """fields int [R, C] (each < 2^bits) -> uint8 [R, ceil(C * bits / 8)], little-endian stream."""
    r, c = fields.shape
    shifts = torch.arange(bits, device=fields.device)
    stream = ((fields.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(r, c * bits)
    stream = pad_k(stream, 8).reshape(r, -1, 8)
    return (stream << torch.arange(8, device=fields.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [R, B] -> int64 [R, count]."""
    r = packed.shape[0]
    stream = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(r, -1)[:, : count * bits].reshape(r, count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def check_nm(n: int, m: int, fmt: str, shape) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 2 or not 1 <= n < m:
        raise ValueError(f"pack({fmt!r}): N:M needs integers 1 <= n < m, got n={n}, m={m} (weight shape {tuple(shape)})")


def select_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Indices int64 [N_out, Kp / M, n] of the kept entries, ascending inside each group."""
    groups = pad_k(weight, m).reshape(weight.shape[0], -1, m)
    order = torch.sort(-groups.abs().float(), dim=-1, stable=True).indices  # ties -> lower index
    return order[..., :n].sort(dim=-1).values


@register_format
class NMWeight(PackedWeight):
    kind = "nm"
    grammar = "'N:M' (e.g. '2:4'), 'N:M+int8', 'N:M+int4'"
    recipe_grammar = "N:M[+int8|+int4...]"
    takes_scales = True  # the quantized values' scales

    @classmethod
    def parse_name(cls, name):
        match = _NAME.match(name)
        if not match:
            return None
        return {"n": int(match.group(1)), "m": int(match.group(2)), "values": match.group(3)}

    @classmethod
    def from_recipe(cls, token, text):
        match = _RECIPE.match(token)
        if not match:
            return None
        n, m, quant = int(match.group(1)), int(match.group(2)), match.group(3)
        if not 1 <= n < m:
            raise ValueError(f"recipe {text!r}: N:M needs 1 <= N < M")
        if not quant:
            return RecipePart(f"{n}:{m}")
        for value_format in QUANTIZED_VALUES.values():
            part = value_format.from_recipe(quant, text)
            if part is not None:
                return RecipePart(f"{n}:{m}+{part.fmt}", part.params)
        grammars = " or ".join(v.recipe_grammar for v in QUANTIZED_VALUES.values())
        raise ValueError(f"recipe {text!r}: cannot read {quant!r} after '+'; expected {grammars}")

    @classmethod
    def fit_params(cls, fixed, params, k):
        if fixed["values"] is None:
            return params
        kept = math.ceil(k / fixed["m"]) * fixed["n"]  # value groups count kept values
        return QUANTIZED_VALUES[fixed["values"]].fit_params({}, params, kept)

    @classmethod
    def sparsity_pattern(cls, fixed):
        return fixed["n"], fixed["m"]

    @classmethod
    def value_bits(cls, fixed):
        return QUANTIZED_VALUES[fixed["values"]].bits if fixed["values"] else None

    def __init__(self, values, meta: torch.Tensor, n: int, m: int, k: int):
        super().__init__()
        # contiguous: kernels view the tensors as they are (and follow them when they are written in place)
        self.values = values if isinstance(values, PackedWeight) else values.contiguous()
        self.meta, self.n, self.m = meta.contiguous(), n, m
        self.shape = (meta.shape[0], k)
        self.kp = math.ceil(k / m) * m
        self.kc = self.kp // m * n
        self.value_format = values.fmt if isinstance(values, PackedWeight) else None
        self.fmt = f"{n}:{m}" + (f"+{self.value_format}" if self.value_format else "")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, n: int = 2, m: int = 4, values: str | None = None,
                   fmt: str | None = None, **value_params) -> "NMWeight":
        """Keep the n largest of every m weights; ``values`` = None, "int8" or "int4" (with their params)."""
        fmt = fmt or f"{n}:{m}" + (f"+{values}" if values else "")
        check_weight(weight, fmt)
        check_nm(n, m, fmt, weight.shape)
        rows = weight.shape[0]
        idx = select_nm(weight, n, m)
        kept = pad_k(weight, m).reshape(rows, -1, m).gather(-1, idx).reshape(rows, -1)
        meta = pack_bits(idx.reshape(rows, -1), index_bits(m))
        if values is None:
            if value_params:
                raise ValueError(f"pack({fmt!r}): unexpected parameters {sorted(value_params)} for float N:M values")
            return cls(kept.contiguous(), meta, n, m, weight.shape[1])
        if values not in QUANTIZED_VALUES:
            raise ValueError(f"pack({fmt!r}): unknown value format {values!r}; expected int8 or int4")
        group_size = value_params.get("group_size")
        if isinstance(group_size, int) and group_size > kept.shape[1]:
            raise ValueError(f"pack({fmt!r}): group_size={value_params['group_size']} counts kept values and is "
                             f"larger than the {kept.shape[1]} kept per row (weight shape {tuple(weight.shape)})")
        q = QUANTIZED_VALUES[values].from_dense(kept, fmt=fmt, **value_params)
        packed = cls(q, meta, n, m, weight.shape[1])
        # A kept value that quantized to 0 is indistinguishable from a pruned one: select again on
        # the dequantized weight so that such zeros sit at the lowest free index (canonical form).
        dense = packed.to_dense()
        if not torch.equal(select_nm(dense, n, m), idx):
            return cls.from_dense(dense, n, m, values, fmt, **value_params)
        return packed

    @property
    def dense_dtype(self) -> torch.dtype:
        return torch.float32 if self.value_format else self.values.dtype

    def indices(self) -> torch.Tensor:
        """Column index int64 [N_out, Kc] in the padded weight of every kept value."""
        within = unpack_bits(self.meta, index_bits(self.m), self.kc)
        base = torch.arange(self.kc, device=self.meta.device) // self.n * self.m
        return base + within

    def kept_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The kept values [N_out, Kc], dequantized when quantized."""
        dtype = dtype or self.dense_dtype
        v = self.values.to_dense(torch.float32) if self.value_format else self.values
        return v.to(dtype)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dense_dtype
        rows, k = self.shape
        dense = torch.zeros(rows, self.kp, dtype=dtype, device=self.meta.device)
        dense.scatter_(1, self.indices(), self.kept_values(dtype))
        return dense[:, :k]

    def tensors(self):
        if self.value_format:
            t = {f"values.{name}": v for name, v in self.values.tensors().items()}
        else:
            t = {"values": self.values}
        return {**t, "meta": self.meta}

    def params(self):
        return self.values.params() if self.value_format else {}

    @classmethod
    def from_parts(cls, tensors, shape, params, fmt: str = "2:4"):
        spec = cls.parse_name(fmt)
        if spec is None:
            raise ValueError(f"{fmt!r} is not an N:M format name")
        n, m, vf = spec["n"], spec["m"], spec["values"]
        rows, k = shape
        kc = math.ceil(k / m) * n
        meta = check_tensor(tensors, "meta", torch.uint8, (rows, math.ceil(kc * index_bits(m) / 8)), fmt)
        if vf is None:
            values = tensors.get("values")
            if values is None or values.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{fmt}: missing or non-float tensor 'values'")
            values = check_tensor(tensors, "values", values.dtype, (rows, kc), fmt)
        else:
            sub = {name[len("values."):]: v for name, v in tensors.items() if name.startswith("values.")}
            values = QUANTIZED_VALUES[vf].from_parts(sub, (rows, kc), params)
        within = unpack_bits(meta, index_bits(m), kc).reshape(rows, -1, n)
        if within.numel() and (int(within.max()) >= m or (within.diff(dim=-1) <= 0).any()):
            raise ValueError(f"{fmt}: corrupt metadata (an index >= m={m}, or indices not increasing in a group)")
        return cls(values, meta, n, m, k)

