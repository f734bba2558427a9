"""Canonical packed weight formats and the ``pack`` entry point.

Format names::

    "int8"                 Int8Weight   (group_size=None|power of two)
    "int4"                 Int4Weight   (group_size=128, symmetric=True)
    "N:M"     e.g. "2:4"   NMWeight with float values (any 1 <= N < M)
    "N:M+int8", "N:M+int4" NMWeight with quantized values (their group_size counts kept values)
    "csr", "csr+int8"      CSRWeight
"""

from __future__ import annotations

from typing import Any

import torch

from .base import PackedWeight
from .csr import CSRWeight
from .int4 import Int4Weight
from .int8 import Int8Weight
from .nm import NMWeight, parse_nm_name

__all__ = ["PackedWeight", "Int8Weight", "Int4Weight", "NMWeight", "CSRWeight", "pack", "parse_format",
           "from_parts"]

def parse_format(fmt: str) -> dict[str, Any]:
    """Split a format name into its family and fixed parameters; ValueError if unknown."""
    if not isinstance(fmt, str):
        raise ValueError(f"format must be a string, got {type(fmt).__name__}")
    name = fmt.strip().lower()
    if name in ("int8", "int4"):
        return {"kind": name}
    if name in ("csr", "csr+int8"):
        return {"kind": "csr", "values": "int8" if name.endswith("int8") else None}
    nm = parse_nm_name(name)
    if nm:
        return {"kind": "nm", **nm}
    raise ValueError(
        f"unknown format {fmt!r}; expected one of 'int8', 'int4', 'N:M' (e.g. '2:4'), 'N:M+int8', 'N:M+int4', "
        f"'csr', 'csr+int8'"
    )


def pack(weight: torch.Tensor, fmt: str, **params) -> PackedWeight:
    """Pack a dense weight [out_features, in_features] into format ``fmt``.

    Parameters by format: int8 ``group_size`` (None = per-channel); int4 ``group_size`` (128),
    ``symmetric`` (True); N:M+int8/int4 the same for their values; ``scale``/``zero`` tensors may
    be given to quantize with precomputed (e.g. GPTQ) parameters. Raises ValueError naming the
    parameter and the weight shape when an argument is invalid.
    """
    spec = parse_format(fmt)
    fmt = fmt.strip().lower()
    try:
        if spec["kind"] == "int8":
            return Int8Weight.from_dense(weight, fmt=fmt, **params)
        if spec["kind"] == "int4":
            return Int4Weight.from_dense(weight, fmt=fmt, **params)
        if spec["kind"] == "nm":
            return NMWeight.from_dense(weight, spec["n"], spec["m"], spec["values"], fmt=fmt, **params)
        return CSRWeight.from_dense(weight, spec["values"], fmt=fmt, **params)
    except TypeError as err:  # an unknown keyword argument
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise ValueError(f"pack({fmt!r}): bad parameters {sorted(params)} for weight shape {shape}: {err}") from None


def from_parts(fmt: str, tensors: dict[str, torch.Tensor], shape, params: dict[str, Any]) -> PackedWeight:
    """Rebuild a packed weight from its named tensors, true shape and pack parameters, validating
    every tensor's dtype and shape (used by load and by the custom ops)."""
    spec = parse_format(fmt)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"{fmt}: bad shape {shape}")
    if spec["kind"] == "int8":
        return Int8Weight.from_parts(tensors, shape, params)
    if spec["kind"] == "int4":
        return Int4Weight.from_parts(tensors, shape, params)
    if spec["kind"] == "nm":
        return NMWeight.from_parts(tensors, shape, params, fmt)
    return CSRWeight.from_parts(tensors, shape, params, fmt)
