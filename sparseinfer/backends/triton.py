"""The Triton GPU backend. Placeholder until the kernels land: reports itself unavailable."""

from __future__ import annotations

from .base import Backend


class TritonBackend(Backend):
    name = "triton"
    priority = 20

    def availability(self):
        return False, "the Triton kernels are not part of this version"

    def supports(self, w, x):
        return False
