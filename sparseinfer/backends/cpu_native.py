"""The CPU backend's handles on ``sparseinfer._C``: thread count and ``_C.Weight`` views of packed
weights, built by one implementation per format (``FORMATS``, at the end). The backend (cpu.py), its
routes (cpu_routes.py) and its tuning (cpu_tuning.py) all use them."""

from __future__ import annotations

import os

import torch

from .. import _native
from ..formats import CSRWeight, Int4Weight, Int8Weight, NMWeight, PackedWeight
from ..formats.base import FLOAT_DTYPES
from . import cpu_heap, epoch
from .base import FormatImpl, FormatTable

_PREPACK_KEY = "cpu"
_UNSET = object()
_threads = _UNSET  # set_threads(); None: follow torch.get_num_threads(); _UNSET: SPARSEINFER_NUM_THREADS not read yet


def set_threads(n: int | None) -> None:
    """Threads the CPU kernels split output rows over; None follows torch.get_num_threads()."""
    global _threads
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"set_threads: n must be a positive int or None, got {n!r}")
    if n != _threads:
        _threads = n
        epoch.bump()  # the layers' last plans were made for the old count


def configured_threads() -> int | None:
    """set_threads()'s count, else SPARSEINFER_NUM_THREADS (read on first use, so that a bad value
    fails the call that needs it, not ``import sparseinfer``); None: follow torch.get_num_threads()."""
    if _threads is _UNSET:
        value = os.environ.get("SPARSEINFER_NUM_THREADS")
        try:
            set_threads(int(value) if value else None)
        except ValueError:
            raise ValueError(f"SPARSEINFER_NUM_THREADS must be a positive integer, got {value!r}") from None
    return _threads


def threads() -> int:
    """The CPU kernels' thread count: configured_threads(), else torch.get_num_threads()."""
    n = _threads  # set: no call (every layer's per-call plan key asks)
    return (configured_threads() if n is _UNSET else n) or torch.get_num_threads()


def contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def build_native_weight(w: PackedWeight):
    """The ``_C.Weight`` for a canonical packed weight (validated by the extension)."""
    impl = FORMATS.get(w)
    if impl is None:
        raise TypeError(f"cpu backend: no kernels for {type(w).__name__} (format {getattr(w, 'fmt', '?')!r})")
    handle = impl.build(_native.require_native(), w)
    cpu_heap.keep_freed_memory()  # once per process: the model's forward passes reuse freed memory
    return handle


def native_weight(w: PackedWeight):
    """``build_native_weight(w)``, memoised on ``w`` (what the backend's calls use); the ``_C.Weight``
    checks its own sources on every call, so the memo needs no stamp."""
    return w.prepacked(_PREPACK_KEY, build_native_weight, self_checking=True)


# -- per-format implementations ----------------------------------------------------------------
# Each: supports(w) -- whether the kernels take this weight -- and build(C, w) -> its _C.Weight.
# The kernels themselves are chosen inside the extension (csrc/dispatch.cpp) per format and batch.

FORMATS = FormatTable()


@FORMATS.register(Int8Weight)
class _Int8(FormatImpl):
    def build(self, C, w):
        return C.pack_int8(contig(w.qweight), contig(w.scale), w.shape[1])


@FORMATS.register(Int4Weight)
class _Int4(FormatImpl):
    def build(self, C, w):
        zero = None if w.zero is None else contig(w.zero)
        return C.pack_int4(contig(w.qweight), contig(w.scale), zero, w.shape[1])


@FORMATS.register(NMWeight)
class _NM(FormatImpl):
    def supports(self, w):
        return w.value_format is not None or w.values.dtype in FLOAT_DTYPES

    def build(self, C, w):
        values = FORMATS.get(w.values).build(C, w.values) if w.value_format else contig(w.values)
        return C.pack_nm(contig(w.meta), w.n, w.m, w.shape[1], values)


@FORMATS.register(CSRWeight)
class _CSR(FormatImpl):
    def supports(self, w):
        return w.quantized or w.values.dtype in FLOAT_DTYPES

    def build(self, C, w):
        scale = contig(w.scale) if w.quantized else None
        return C.pack_csr(contig(w.crow), contig(w.col), contig(w.values), scale, w.shape[1])
