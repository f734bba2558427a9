"""The CPU backend's handles on ``sparseinfer._C``: thread count and ``_C.Weight`` views of packed
weights. The backend (cpu.py), its routes (cpu_routes.py) and its tuning (cpu_tuning.py) all use them."""

from __future__ import annotations

import os

import torch

from .. import _native
from ..formats import CSRWeight, Int4Weight, Int8Weight, NMWeight, PackedWeight

_PREPACK_KEY = "cpu"
_UNSET = object()
_threads = _UNSET  # set_threads(); None: follow torch.get_num_threads(); _UNSET: SPARSEINFER_NUM_THREADS not read yet


def set_threads(n: int | None) -> None:
    """Threads the CPU kernels split output rows over; None follows torch.get_num_threads()."""
    global _threads
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"set_threads: n must be a positive int or None, got {n!r}")
    _threads = n


def threads() -> int:
    """set_threads()'s count, else SPARSEINFER_NUM_THREADS (read on first use, so that a bad value
    fails the call that needs it, not ``import sparseinfer``), else torch.get_num_threads()."""
    if _threads is _UNSET:
        value = os.environ.get("SPARSEINFER_NUM_THREADS")
        try:
            set_threads(int(value) if value else None)
        except ValueError:
            raise ValueError(f"SPARSEINFER_NUM_THREADS must be a positive integer, got {value!r}") from None
    return _threads or torch.get_num_threads()


def contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _pack_quant(C, w: Int8Weight | Int4Weight):
    k = w.shape[1]
    if isinstance(w, Int8Weight):
        return C.pack_int8(contig(w.qweight), contig(w.scale), k)
    zero = None if w.zero is None else contig(w.zero)
    return C.pack_int4(contig(w.qweight), contig(w.scale), zero, k)


def build_native_weight(w: PackedWeight):
    """The ``_C.Weight`` for a canonical packed weight (validated by the extension)."""
    C = _native.require_native()
    if isinstance(w, (Int8Weight, Int4Weight)):
        return _pack_quant(C, w)
    if isinstance(w, NMWeight):
        values = _pack_quant(C, w.values) if w.value_format else contig(w.values)
        return C.pack_nm(contig(w.meta), w.n, w.m, w.shape[1], values)
    if isinstance(w, CSRWeight):
        scale = contig(w.scale) if w.quantized else None
        return C.pack_csr(contig(w.crow), contig(w.col), contig(w.values), scale, w.shape[1])
    raise TypeError(f"cpu backend: no kernels for {type(w).__name__} (format {getattr(w, 'fmt', '?')!r})")


def native_weight(w: PackedWeight):
    """``build_native_weight(w)``, memoised on ``w`` (what the backend's calls use); the ``_C.Weight``
    checks its own sources on every call, so the memo needs no stamp."""
    return w.prepacked(_PREPACK_KEY, build_native_weight, self_checking=True)
