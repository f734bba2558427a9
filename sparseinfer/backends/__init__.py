"""Execution backends: registry, availability report and the one place that resolves AUTO."""

from __future__ import annotations

import torch

from ..formats import PackedWeight
from .base import Backend, BackendUnavailable
from .reference import ReferenceBackend, reference_linear

BACKENDS: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []  # BACKENDS sorted for automatic choice, kept by register()


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    _BY_PRIORITY[:] = sorted(BACKENDS.values(), key=lambda b: -b.priority)
    return backend


register(ReferenceBackend())
# Optional backends register themselves here; importing them never fails (their availability()
# reports what is missing).
from . import cpu as _cpu  # noqa: E402
from . import triton as _triton  # noqa: E402

register(_cpu.CpuBackend())
register(_triton.TritonBackend())


def backends() -> dict[str, dict]:
    """What can run here: {name: {"available": bool, "detail": str}}."""
    report = {}
    for name, b in BACKENDS.items():
        ok, detail = b.availability()
        report[name] = {"available": ok, "detail": detail}
    return report


def resolve(w: PackedWeight, x: torch.Tensor, backend: str | None = None) -> Backend:
    """The backend that runs ``x @ w.T``: the named one (error if it cannot), else the available
    backend of highest priority that supports this format, device and dtype."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKENDS)}")
        b = BACKENDS[backend]
        ok, detail = b.availability()
        if not ok:
            raise BackendUnavailable(f"backend {backend!r} is not available: {detail}")
        if not b.supports(w, x):
            raise BackendUnavailable(
                f"backend {backend!r} has no kernel for format {w.fmt!r} with {x.dtype} activations on {x.device}"
            )
        return b
    for b in _BY_PRIORITY:
        if b.auto_devices is not None and x.device.type not in b.auto_devices:
            continue
        if b.availability()[0] and b.supports(w, x) and b.preferred(w, x):
            return b
    return BACKENDS["reference"]


__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "backends", "register", "resolve", "reference_linear"]
