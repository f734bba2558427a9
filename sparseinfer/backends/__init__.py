"""Execution backends: registry, availability report and the one place that resolves AUTO."""

from __future__ import annotations

import torch

from ..formats import PackedWeight
from . import epoch
from .base import Backend, BackendUnavailable
from .reference import ReferenceBackend, reference_linear

BACKENDS: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []  # BACKENDS sorted for automatic choice, kept by register()


_generation = 0  # bumped by register() / unregister(): backend choices memoised before are stale


def register(backend: Backend) -> Backend:
    global _generation
    BACKENDS[backend.name] = backend
    _BY_PRIORITY[:] = sorted(BACKENDS.values(), key=lambda b: -b.priority)
    _generation += 1
    epoch.bump()
    return backend


def unregister(name: str) -> None:
    """Forget a backend added with ``register`` (a plugin's or a test's)."""
    global _generation
    del BACKENDS[name]
    _BY_PRIORITY[:] = sorted(BACKENDS.values(), key=lambda b: -b.priority)
    _generation += 1
    epoch.bump()


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
    backend of highest priority that supports this format, device and dtype and prefers this many
    rows. The answer depends only on what the key below holds, so it is memoised on the weight:
    a model's layers pay the search once per kind of call, not on every call."""
    k = w.shape[1]
    rows = x.numel() // k if k else 0
    key = (_generation, backend, x.dtype, x.device, x.requires_grad and torch.is_grad_enabled(), rows)
    routes = w._routes
    found = routes.get(key)
    if found is None:
        found = _search(w, x, backend)
        if len(routes) >= 256:  # many distinct batch sizes (e.g. sequence lengths): keep it bounded
            routes.clear()
        routes[key] = found
    return found


def generation() -> tuple[int, int]:
    """Changes whenever a memoised decision is stale: a backend registered or removed, the CPU routes
    reset (calibration). Keys the layers' plan memos (runtime/modules.py), which a mere change of
    ``epoch`` (a thread count set back and forth) then finds again."""
    return _generation, _cpu.cpu_routes._generation


def _search(w: PackedWeight, x: torch.Tensor, backend: str | None) -> Backend:
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


__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "backends", "generation", "register", "unregister",
           "resolve", "reference_linear"]
