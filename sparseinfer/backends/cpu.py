"""The C++ CPU backend (sparseinfer._C). Placeholder until the extension lands: reports itself
unavailable so that dispatch falls back to the reference backend."""

from __future__ import annotations

from .base import Backend


class CpuBackend(Backend):
    name = "cpu"
    priority = 10

    def availability(self):
        return False, "the C++ CPU kernels are not built in this version"

    def supports(self, w, x):
        return False
