"""The C++ CPU backend: kernels in ``csrc/`` compiled into ``sparseinfer._C``.

Dispatch inside the extension picks the instruction set once (AVX-512 / AVX2 / NEON / scalar,
``SPARSEINFER_ISA`` forces one) and a kernel per format and batch size; this module only prepacks
weights and shapes the call:

* ``prepack(w)`` validates the canonical tensors once and returns an ``_C.Weight`` view of them,
  memoised on the weight (``w.prepacked("cpu", ...)``); the artifact stays canonical.
* ``linear(x, w, bias, act)`` allocates ``out`` and calls ``_C.linear`` with ``threads()`` threads:
  torch.get_num_threads(), unless ``set_threads(n)`` / ``SPARSEINFER_NUM_THREADS`` set sparseinfer's
  own count (the GIL is released while the kernel runs).
* int8 / int4 / N:M+int8 / N:M+int4 weights run in the activation mode the call allows
  (``sparseinfer.act``: ``auto`` by default, ``fp32`` exact, ``int8``); csrc/README.md gives the
  int8 error bound. The layouts int8 activations need are built by the first call that runs such a
  kernel, or by ``prepack(w, act)`` (which ``sparseinfer.load`` calls).
* Each call takes a route (cpu_routes.py): the packed kernel the table picks, another kernel
  measured faster on this layer shape (named in the call), or, where those were measured slower,
  the dense fallback (an fp32 copy or tile-dequantize + torch's GEMM) or, for csr+int8, the dense
  int8 kernels.

The kernels are inference-only: a call that needs gradients for ``x`` is left to the reference
backend (``supports`` says no), and a bias that needs gradients is added outside the kernel.
"""

from __future__ import annotations

import torch

from .. import _native
from ..act import default_act, resolve_act
from ..formats import PackedWeight
from ..formats.base import FLOAT_DTYPES
from . import cpu_routes, cpu_tuning
from .base import Backend
from .cpu_native import FORMATS, build_native_weight, contig, native_weight, set_threads, threads

__all__ = ["CpuBackend", "build_native_weight", "native_weight", "set_threads", "threads"]

_INT32_MAX = 2**31 - 1


class CpuBackend(Backend):
    name = "cpu"
    priority = 10
    takes_leading_dims = True  # the binding views x [..., K] as rows itself (no reshapes per call)

    def __init__(self) -> None:
        self._availability: tuple[bool, str] | None = None

    def availability(self) -> tuple[bool, str]:
        if self._availability is None:
            C = _native._C
            if C is None:
                self._availability = (False, f"sparseinfer._C is not built ({_native._C_ERROR}); {_native.BUILD_HINT}")
            else:
                try:
                    isa = C.active_isa()
                    act = default_act()
                except ValueError as err:  # SPARSEINFER_ISA / SPARSEINFER_ACT name an unknown or unsupported value
                    self._availability = (False, str(err))
                else:
                    cpu_tuning.apply()  # this machine's measured batch limits, if `sparseinfer calibrate` stored them
                    routes = ("measured on this machine" if cpu_routes.known_machine() else
                              "built-in, measured per layer shape on first use")
                    self._availability = (True, f"C++ kernels, ISA {isa} (available: {', '.join(C.available_isas())}), "
                                                f"activations act={act} (SPARSEINFER_ACT), {cpu_tuning.describe()}, "
                                                f"kernel vs dense routes {routes}, threads: {C.threading()}")
        return self._availability

    def supports(self, w: PackedWeight, x: torch.Tensor) -> bool:
        impl = FORMATS.get(w)
        if impl is None or not impl.supports(w):
            return False
        if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype not in FLOAT_DTYPES:
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False  # the kernels do not record autograd history
        n, k = w.shape
        rows = x.numel() // k if k else 0
        return max(n, k, rows) <= _INT32_MAX

    def prepack(self, w: PackedWeight, act: str | None = None):
        """Validate and view ``w`` for the kernels now (load time); memoised on ``w``. The ``_C.Weight``
        rebuilds itself when w's tensors move or are written in place (csrc/README.md, weight lifetime).
        With ``act`` allowing int8 activations ("auto" / "int8"), also build what those kernels need:
        the extension makes their row tiles on the first call that runs one and has no other entry
        for it, so a one-row call is made here."""
        handle = native_weight(w)
        if act is not None and resolve_act(act) != "fp32" and self.availability()[0]:
            with torch.no_grad():
                self.linear(torch.zeros(1, w.shape[1]), w, None, act)
        return handle

    def route(self, w: PackedWeight, rows: int, act: str | None = None) -> cpu_routes.Route:
        """The path a call with ``rows`` rows takes (kernel or dense fallback), its kernel and why."""
        return cpu_routes.route(w, native_weight(w), rows, resolve_act(act), threads())

    def direct_call(self, w: PackedWeight, x: torch.Tensor, act: str | None = None):
        """``call(x, bias) -> y`` that runs ``_C.linear`` straight, for calls like ``x`` (same shape, dtype,
        activation mode and thread count) whose route is the packed kernel, or torch's GEMM on the
        kept fp32 copy where the route is dense (cpu_routes.dense_call), or the int8 kernels on the
        dense int8 form of a csr+int8 weight (its dense_int8 route); None when another path takes them.
        A layer memoises it per kind of call (CompressedLinear), so a decode step's ~200 calls skip the
        route and prepack lookups; ``bias`` must be None or float, contiguous, with no
        gradient (the caller checks)."""
        act = resolve_act(act)
        n_threads = threads()
        handle = native_weight(w)
        r = cpu_routes.route(w, handle, x.numel() // w.shape[1], act, n_threads)
        if r.path == "dense":
            call = cpu_routes.dense_call(w, x, n_threads)
            if call is not None:
                call.dense_source = handle  # the packed weight its fp32 copy was made from
            return call
        if r.path not in ("kernel", "dense_int8"):
            return None
        # dense_int8: csr+int8 on the int8 kernels, that weight made again if the CSR's tensors were written
        current = cpu_routes.dense_int8_handle if r.path == "dense_int8" else None
        run, named, empty = _native._C.linear, r.named, torch.empty
        # the output's shape, dtype and device, made once: new_empty(x.shape[:-1] + (n,)) costs 2.5 us a
        # call, torch.empty with dtype and device keywords ~0.9 us more than with the defaults, checked
        shape, dtype, device = (*x.shape[:-1], w.shape[0]), x.dtype, x.device

        def call(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if not x.is_contiguous():
                x = x.contiguous()
            out = empty(*shape)
            if out.dtype is not dtype or not out.is_cpu:  # torch's default dtype or device is another
                out = empty(shape, dtype=dtype, device=device)
            run(x, handle if current is None else current(w), out, bias, n_threads, None, act, named)
            return out

        if current is None:
            call.kernel_args = (handle, act, named)  # what the native decode step (lean_llama.py) runs instead
        return call

    def linear(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None,
               act: str | None = None) -> torch.Tensor:
        """y [..., N] = x [..., K] @ W.T + bias in x.dtype (x float32 / bfloat16 / float16, on the CPU)."""
        handle = native_weight(w)
        act = resolve_act(act)
        n_threads = threads()
        r = cpu_routes.route(w, handle, x.numel() // w.shape[1], act, n_threads)
        path = r.path
        if not x.is_contiguous() and not (x.dim() == 2 and (x.shape[1] == 1 or x.stride(1) == 1)):
            x = x.contiguous()  # 2-D rows may be strided, elements within a row may not
        late_bias = None
        if bias is not None:
            if bias.requires_grad and torch.is_grad_enabled():
                late_bias, bias = bias, None  # keep the bias's gradient: add it in autograd
            elif bias.dtype not in FLOAT_DTYPES:
                bias = bias.to(torch.float32)
            if bias is not None:
                bias = contig(bias)
        if path == "dense":
            out = cpu_routes.dense_linear(x, w, bias)
        else:
            if path == "dense_int8":
                handle = cpu_routes.dense_int8_handle(w)
            out = x.new_empty(x.shape[:-1] + (w.shape[0],))
            _native._C.linear(x, handle, out, bias, n_threads, None, act, r.named)
        if late_bias is not None:
            out = (out.float() + late_bias.float()).to(x.dtype)
        return out

    def kernel_name(self, w: PackedWeight, batch: int, act: str | None = None) -> str:
        C = _native._C
        if C is None or not self.availability()[0]:
            return f"cpu:{w.fmt} (unavailable)"
        return f"cpu:{self.route(w, batch, act).kernel}"

    def describe(self, w: PackedWeight, batch: int, act: str | None = None) -> dict:
        if not self.availability()[0]:
            return super().describe(w, batch, act)
        r = self.route(w, batch, act)
        requested = resolve_act(act)
        if requested == "fp32":
            act_why = "fp32 requested"
        elif r.act == "int8":
            act_why = f"{requested}: {r.kernel} takes int8 activations at this batch"
        elif r.path == "dense":
            act_why = f"{requested}: the dense fallback is exact"
        else:
            act_why = f"{requested}: no int8-activation kernel is listed for {w.fmt} at this batch"
        return {"kernel": f"cpu:{r.kernel}", "path": r.path, "act": r.act, "why": f"{r.why}; act {act_why}"}
