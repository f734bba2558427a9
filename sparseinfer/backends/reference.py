"""The reference backend: plain PyTorch math on the dequantized weight.

It runs every format on every device and is the oracle every kernel is tested against. It
materialises the dense weight per call, so it is slow and memory-hungry on purpose-free paths:
it exists to be obviously right.
"""

from __future__ import annotations

import torch

from ..formats import PackedWeight
from .base import Backend


def reference_linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias with W = w.to_dense(), accumulated in float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ w.to_dense(acc).to(x.device).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0

    def availability(self):
        return True, "plain PyTorch (dequantize, then matmul); always available"

    def supports(self, w, x):
        return True

    def linear(self, x, w, bias, act=None):
        return reference_linear(x, w, bias)  # the oracle is exact whatever ``act`` allows

    def kernel_name(self, w, batch, act=None):
        return "reference:dequantize+matmul"
