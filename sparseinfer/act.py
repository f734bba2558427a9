"""Activation modes: the precision a call lets the CPU kernels use for x (int8 / int4 / N:M+int8 /
N:M+int4 weights; every other kernel is exact in any mode).

    "auto"  the default: int8 activations where this machine has an int8-activation kernel for the
            format and batch and it is the faster one; exact fp32 activations otherwise
    "fp32"  exact: x stays fp32 (the kernels match the reference to fp32 summation order)
    "int8"  permission to quantize x per row segment (~0.6 % normwise error, csrc/README.md): the
            kernels may use int8 activations wherever they have them. The kernel tables list an
            int8-activation kernel only where it is the faster one, so today it runs what "auto"
            runs; it is kept as the explicit permission ("auto" is the library's choice)

This module is the one definition of the allowed values: ``sparseinfer._C`` accepts exactly this
set (``_C.act_modes()``, checked by tests/test_act.py), and ``SPARSEINFER_ACT`` (read once, here)
sets the mode of calls that name none.
"""

from __future__ import annotations

import os

ACT_MODES = ("auto", "fp32", "int8")
DEFAULT_ACT = "auto"
_ENV = "SPARSEINFER_ACT"
_process_default: str | None = None


def check_act(act: str | None, where: str) -> None:
    """ValueError naming ``where`` unless ``act`` is an activation mode or None (the process default)."""
    if act is not None and act not in ACT_MODES:
        raise ValueError(f"{where}: act must be one of {ACT_MODES} or None, got {act!r}")


def default_act() -> str:
    """The mode of calls that name none: ``SPARSEINFER_ACT`` (read on first use), else "auto"."""
    global _process_default
    if _process_default is None:
        value = os.environ.get(_ENV) or DEFAULT_ACT
        if value not in ACT_MODES:
            raise ValueError(f"{_ENV}={value!r} is not an activation mode; use one of {', '.join(ACT_MODES)}")
        _process_default = value
    return _process_default


def resolve_act(act: str | None) -> str:
    """``act``, or the process default when None."""
    return default_act() if act is None else act
