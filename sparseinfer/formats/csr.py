"""CSR: compressed sparse rows, for unstructured sparsity.

Layout (N = out_features, nnz = stored non-zeros)::

    crow    int64 [N + 1]   row n holds entries crow[n] .. crow[n+1]-1
    col     int32 [nnz]     column of each entry, strictly increasing within a row (no repeats:
                            backends would disagree on a repeated column, summing it or not)
    values  [nnz]           float (the weight's dtype), or int8 with
    scale   float32 [N]     a per-row scale (csr+int8, signed absmax as in int8)

Only non-zero entries are stored (an int8 code of 0 is dropped), which makes packing canonical.
"""

from __future__ import annotations

import re

import torch

from .base import FLOAT_DTYPES, PackedWeight, RecipePart, check_tensor, check_weight, symmetric_quantize
from .registry import register_format

_RECIPE = re.compile(r"^sparse(\d+(?:\.\d+)?)(?:-(global|layer))?(?:\+(.+))?$")


@register_format
class CSRWeight(PackedWeight):
    kind = "csr"
    grammar = "'csr', 'csr+int8'"
    recipe_grammar = "sparseXX[-global][+int8]"

    @classmethod
    def parse_name(cls, name):
        return {"values": "int8" if name.endswith("int8") else None} if name in ("csr", "csr+int8") else None

    @classmethod
    def from_recipe(cls, token, text):
        """"sparse90": prune 90 % of each layer's weights by magnitude (or the method's score), then CSR;
        "-global" prunes against one threshold for all layers; "+int8" quantizes the kept values."""
        match = _RECIPE.match(token)
        if not match:
            return None
        percent, scope, quant = match.groups()
        sparsity = float(percent) / 100
        if not 0 < sparsity < 1:
            raise ValueError(f"recipe {text!r}: the sparsity of sparseXX must lie strictly between 0 and 100 percent "
                             f"(sparse{percent} would keep {'every' if sparsity <= 0 else 'no'} weight)")
        if quant and quant != "int8":
            raise ValueError(f"recipe {text!r}: CSR values can be float or int8 only")
        return RecipePart("csr+int8" if quant else "csr", {}, sparsity, scope or "layer")

    @classmethod
    def value_bits(cls, fixed):
        return 8 if fixed["values"] == "int8" else None

    def __init__(self, crow, col, values, scale, k: int):
        super().__init__()
        # contiguous: kernels view the tensors as they are (and follow them when they are written in place)
        self.crow, self.col, self.values = crow.contiguous(), col.contiguous(), values.contiguous()
        self.scale = None if scale is None else scale.contiguous()
        self.shape = (crow.shape[0] - 1, k)
        self.quantized = scale is not None
        self.fmt = "csr+int8" if self.quantized else "csr"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, values: str | None = None, fmt: str = "csr") -> "CSRWeight":
        check_weight(weight, fmt)
        scale = None
        if values == "int8":
            codes, scale = symmetric_quantize(weight.float(), 8)
            weight = codes.to(torch.int8)
        elif values is not None:
            raise ValueError(f"pack({fmt!r}): unknown CSR value format {values!r}; expected int8 or none")
        mask = weight != 0
        crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = mask.sum(dim=1).cumsum(0)
        col = mask.nonzero()[:, 1].to(torch.int32)  # row-major order: rows, then columns ascending
        return cls(crow, col, weight[mask].contiguous(), scale, weight.shape[1])

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @property
    def dense_dtype(self) -> torch.dtype:
        return torch.float32 if self.quantized else self.values.dtype

    def row_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """values [nnz], dequantized."""
        dtype = dtype or self.dense_dtype
        if not self.quantized:
            return self.values.to(dtype)
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), self.crow.diff())
        return (self.values.float() * self.scale[rows]).to(dtype)

    def rows(self, start: int, stop: int) -> "CSRWeight":
        n, k = self.shape
        if not 0 <= start < stop <= n:
            raise ValueError(f"rows: need 0 <= start < stop <= {n}, got {start}:{stop}")
        lo, hi = int(self.crow[start]), int(self.crow[stop])
        scale = None if self.scale is None else self.scale[start:stop]
        return CSRWeight(self.crow[start:stop + 1] - lo, self.col[lo:hi], self.values[lo:hi], scale, k)

    @classmethod
    def concat_rows(cls, weights: list["CSRWeight"]) -> "CSRWeight":
        first = weights[0]
        crow, offset = [first.crow[:1]], 0
        for w in weights:  # each weight's row starts, shifted past the entries of those before it
            crow.append(w.crow[1:] + offset)
            offset += w.nnz
        joint = {"crow": torch.cat(crow), "col": torch.cat([w.col for w in weights]),
                 "values": torch.cat([w.values for w in weights])}
        if first.quantized:
            joint["scale"] = torch.cat([w.scale for w in weights])
        return cls.from_parts(joint, (sum(w.shape[0] for w in weights), first.shape[1]), first.params(), first.fmt)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dense_dtype
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), self.crow.diff())
        dense = torch.zeros(self.shape, dtype=dtype, device=self.crow.device)
        dense[rows, self.col.long()] = self.row_values(dtype)
        return dense

    def tensors(self):
        t = {"crow": self.crow, "col": self.col, "values": self.values}
        if self.quantized:
            t["scale"] = self.scale
        return t

    def params(self):
        return {}

    @classmethod
    def from_parts(cls, tensors, shape, params, fmt: str = "csr"):
        rows, k = shape
        crow = check_tensor(tensors, "crow", torch.int64, (rows + 1,), fmt)
        nnz = int(crow[-1]) if crow.numel() else 0
        if int(crow[0]) != 0 or (crow.diff() < 0).any() or (crow.diff() > k).any():
            raise ValueError(f"{fmt}: corrupt crow (must start at 0, be non-decreasing, at most K={k} per row)")
        col = check_tensor(tensors, "col", torch.int32, (nnz,), fmt)
        if nnz and (int(col.min()) < 0 or int(col.max()) >= k):
            raise ValueError(f"{fmt}: column index out of range 0..{k - 1}")
        _check_increasing(crow, col, fmt)
        if fmt == "csr+int8":
            values = check_tensor(tensors, "values", torch.int8, (nnz,), fmt)
            scale = check_tensor(tensors, "scale", torch.float32, (rows,), fmt)
        else:
            values = tensors.get("values")
            if values is None or values.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{fmt}: missing or non-float tensor 'values'")
            values, scale = check_tensor(tensors, "values", values.dtype, (nnz,), fmt), None
        return cls(crow, col, values, scale, k)


def _check_increasing(crow: torch.Tensor, col: torch.Tensor, fmt: str) -> None:
    """Columns strictly increase within each row (crow already checked)."""
    if col.numel() < 2:
        return
    first = torch.zeros(col.numel(), dtype=torch.bool, device=col.device)
    first[crow[:-1][crow.diff() > 0]] = True  # the first entry of every non-empty row
    bad = (col[1:] <= col[:-1]) & ~first[1:]
    if bad.any():
        e = int(bad.nonzero()[0]) + 1
        row = int(torch.searchsorted(crow, torch.tensor(e, device=crow.device), right=True)) - 1
        raise ValueError(f"{fmt}: the column indices of row {row} must be strictly increasing, got "
                         f"{int(col[e - 1])} then {int(col[e])} (entries {e - 1}, {e})")
