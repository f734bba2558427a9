"""The interface every execution backend implements.

A backend turns ``y = x @ W.T + bias`` with a packed W into a kernel call. Backends are looked
up by name in ``sparseinfer.backends.BACKENDS``; ``resolve()`` picks the best one for a call.
What a backend does per format (its layout, its kernel call, its kernel's name) sits in its own
module as one implementation per format class, registered in the backend's ``FormatTable``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..formats import PackedWeight


class FormatTable:
    """A backend's per-format implementations, keyed by format class: ``@table.register(Int8Weight)``
    on a class registers an instance of it; ``table.get(w)`` finds the one for ``type(w)`` (or the
    nearest registered base class), None when the backend has none for that format."""

    def __init__(self) -> None:
        self._impls: dict[type, Any] = {}

    def register(self, format_cls: type[PackedWeight]) -> Callable[[type], type]:
        def wrap(impl_cls: type) -> type:
            self._impls[format_cls] = impl_cls()
            return impl_cls

        return wrap

    def get(self, w: PackedWeight) -> Any | None:
        for cls in type(w).__mro__:
            impl = self._impls.get(cls)
            if impl is not None:
                return impl
        return None

    def formats(self) -> list[type]:
        return list(self._impls)


class FormatImpl:
    """Base of a backend's per-format implementation: takes every weight of its format unless it
    says otherwise."""

    def supports(self, w: PackedWeight) -> bool:
        return True


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run here; the message says why."""


class Backend:
    name: str = ""
    priority: int = 0  # higher wins when several backends support a call
    # Device types this backend is chosen for automatically (backend=None); None = any. It can
    # still run elsewhere when named explicitly (e.g. Triton's CPU interpreter, for tests).
    auto_devices: frozenset[str] | None = None
    # Whether ``linear`` takes x with any number of leading dims itself (else it gets x as [M, K]).
    takes_leading_dims: bool = False

    def availability(self) -> tuple[bool, str]:
        """(available, a one-line reason or detail, e.g. the active ISA or what is missing)."""
        raise NotImplementedError

    def supports(self, w: PackedWeight, x: torch.Tensor) -> bool:
        """Whether this backend has a kernel for this format, device and activation dtype."""
        raise NotImplementedError

    def preferred(self, w: PackedWeight, x: torch.Tensor) -> bool:
        """Whether automatic dispatch should pick this backend for a supported call (e.g. False
        where a measured crossover says another backend is faster). Explicit requests ignore it."""
        return True

    def linear(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None,
               act: str | None = None) -> torch.Tensor:
        """y [..., N] = x [..., K] @ W.T + bias, in x.dtype. ``x`` already has a valid shape,
        dtype and device (checked by ``sparseinfer.linear``). ``act`` ("fp32" / "int8" / None,
        see ``sparseinfer.linear``) allows int8 activations; backends without such kernels run exact."""
        raise NotImplementedError

    def direct_call(self, w: PackedWeight, x: torch.Tensor, act: str | None = None) -> Callable | None:
        """Optional fast path: ``call(x, bias) -> y`` equal to ``linear(x, w, bias, act)`` for every call
        like ``x`` (same shape, dtype, device, activation mode), skipping per-call lookups; None when
        this backend has none (the default) or such calls take another path."""
        return None

    def prepack(self, w: PackedWeight, act: str | None = None) -> Any:
        """Repack ``w`` into this backend's preferred layout now (load time) instead of on the
        first call, including what calls in activation mode ``act`` (None: the process default)
        need. Default: nothing to do."""

    def kernel_name(self, w: PackedWeight, batch: int, act: str | None = None) -> str:
        """The kernel a call with ``batch`` rows (and activation mode ``act``) would run (for ``explain``)."""
        return f"{self.name}:{w.fmt}"

    def describe(self, w: PackedWeight, batch: int, act: str | None = None) -> dict:
        """For ``explain``: {"kernel", "path" (e.g. "kernel" / "dense"), "act" (the activation
        precision that runs), "why"}. Default: this backend's kernel, exact activations."""
        return {"kernel": self.kernel_name(w, batch, act), "path": "kernel", "act": "fp32",
                "why": f"{self.name} backend"}
