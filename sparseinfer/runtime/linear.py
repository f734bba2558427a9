"""``linear``: the one entry point every compressed layer calls."""

from __future__ import annotations

import torch

from ..act import ACT_MODES, check_act, default_act  # noqa: F401  (ACT_MODES: re-exported)
from ..backends import resolve
from ..formats import PackedWeight

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_linear_args(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> None:
    if not isinstance(w, PackedWeight):
        raise TypeError(f"linear: w must be a PackedWeight (from sparseinfer.pack), got {type(w).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"linear: x must be a torch.Tensor, got {type(x).__name__}")
    n, k = w.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"linear: x of shape {tuple(x.shape)} does not match weight {w.fmt} of shape ({n}, {k}): "
                         f"the last dim must be K={k}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"linear: activation dtype {x.dtype} is not supported (x shape {tuple(x.shape)}); "
                         f"use float32, bfloat16 or float16")
    if x.device != w.device:
        raise ValueError(f"linear: x is on {x.device} but the packed weight is on {w.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"linear: bias must have shape ({n},), got {got}")
        if bias.device != x.device:
            raise ValueError(f"linear: bias is on {bias.device} but x is on {x.device}")


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, backend: str | None = None,
           act: str | None = None):
    """y [..., N] = x [..., K] @ W.T + bias, with W the packed weight ``w`` of shape (N, K).

    x: float32, bfloat16 or float16, any number of leading dims; the result has x's dtype.
    backend: "reference", "cpu", "triton", or None for the best available for x's device,
    the weight's format and x's dtype (see ``sparseinfer.backends()``).
    act: "auto" (the default) runs int8 activations where an int8-activation kernel exists for the
    format and batch and is the faster one, exact fp32 activations otherwise; "fp32" keeps x in float
    (exact up to fp32 summation order); "int8" is the explicit permission to quantize x per row
    segment and use integer dot products (cpu: int8, int4, N:M+int8/int4 weights; ~0.6 % normwise on
    Gaussian x, csrc/README.md). Kernels without an int8 mode stay exact in every mode. None: the
    process default (``SPARSEINFER_ACT``, "auto" unless set). See ``sparseinfer.act``.
    """
    check_linear_args(x, w, bias)
    check_act(act, "linear")
    act = act or default_act()  # raises on a bad SPARSEINFER_ACT, whichever backend runs
    b = resolve(w, x, backend)
    if x.dim() == 2 or b.takes_leading_dims:  # no reshapes on the hot path
        return b.linear(x, w, bias, act)
    lead = x.shape[:-1]
    y = b.linear(x.reshape(-1, w.shape[1]), w, bias, act)
    return y.reshape(*lead, w.shape[0])
