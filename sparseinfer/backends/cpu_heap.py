"""Freed memory kept for the next forward pass: the CPU runtime's setting of the C library's allocator.

PyTorch's CPU tensors come straight from malloc. glibc maps a block above its mmap threshold afresh and
gives the top of its heap back to the system once more than its trim threshold lies free there; it
raises both only as far as the largest block freed so far (twice that for the trim). A forward pass
whose activations together exceed that -- MiniLM at a batch of 16 allocates and frees ~31 MB of 4.5 MB
blocks -- gets its memory from the system again on every pass, one page fault per 4 KiB page: 7,400-8,700
faults a forward on the 2-core VM, 5-12 % of its time (bench/README.md). A causal LM's decode step
allocates little and faulted none either way.

So the first compressed layer built for the CPU kernels sets, once for the process, glibc's mmap
threshold to MMAP_THRESHOLD (blocks up to it come from the heap) and its trim threshold to
``SPARSEINFER_HEAP_KEEP_MB`` (default KEEP_MB): up to that much freed memory stays with the process
for the next pass, as ONNX Runtime's arena or a caching allocator keeps it. ``0`` leaves the C
library's defaults, and so does any setting of its own (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``), an
allocator in ``LD_PRELOAD``, or a C library other than glibc. ``setting()`` says which happened
(``si.explain`` prints it).
"""

from __future__ import annotations

import ctypes
import os
import platform

KEEP_MB = 256
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (64-bit); larger blocks are mapped whatever is set
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_OWN_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_state: str | None = None  # what keep_freed_memory() did; None until it ran


def keep_freed_memory() -> str:
    """Applies the setting above once per process; returns ``setting()``."""
    global _state
    if _state is None:
        _state = _apply(_keep_mb())
    return _state


def setting() -> str:
    """What this process's allocator does with freed memory, in words (before the first compressed
    layer is built for the CPU: what it will do)."""
    return _state if _state is not None else f"not set yet ({_describe(_keep_mb())} once a CPU layer is built)"


def _keep_mb() -> int:
    raw = os.environ.get("SPARSEINFER_HEAP_KEEP_MB", str(KEEP_MB))
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if not 0 <= mb < 2048:  # mallopt takes a C int of bytes
        raise ValueError(f"SPARSEINFER_HEAP_KEEP_MB={raw!r}: expected a whole number of MiB from 0 to 2047 "
                         "(0: leave the C library's defaults)")
    return mb


def _skip_reason(mb: int) -> str | None:
    if mb == 0:
        return "SPARSEINFER_HEAP_KEEP_MB=0"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    own = [v for v in _OWN_SETTINGS if v in os.environ]
    if own or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return f"the environment sets them ({', '.join(own) or 'GLIBC_TUNABLES'})"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "LD_PRELOAD replaces malloc"
    return None


def _describe(mb: int) -> str:
    reason = _skip_reason(mb)
    if reason:
        return f"the C library's own thresholds ({reason})"
    return (f"glibc keeps up to {mb} MiB of freed memory for reuse, blocks up to {MMAP_THRESHOLD >> 20} MiB "
            "from its heap (SPARSEINFER_HEAP_KEEP_MB)")


def _apply(mb: int) -> str:
    if _skip_reason(mb):
        return _describe(mb)
    mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mmap threshold first: setting either turns off glibc's own raising of both
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, mb << 20)):
        return "the C library's own thresholds (mallopt refused the values)"
    return _describe(mb)
