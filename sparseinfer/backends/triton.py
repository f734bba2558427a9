"""The Triton GPU backend: the kernels in ``kernels/`` (installed as ``sparseinfer.kernels``).

It runs every format on CUDA tensors (the default there: priority 20) and, for testing, on CPU
tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was first
imported. Importing this module never imports triton: availability is read from the installed
package metadata, and the kernels are imported at the first call.

Prepack (once per weight, memoised with ``w.prepacked("triton", ...)``):

* int8 / int4: scales (and int4 zero points) transposed to [G, N], so that the scales of a tile
  of output rows are contiguous; the codes keep their canonical K-contiguous rows.
* N:M: the same for quantized values; metadata widened to power-of-two bit fields (4:8's 3-bit
  indices to 4 bits) so that no index straddles a byte; 2:4 metadata is used as is.
* CSR: a ``CSRPlan`` that builds the torch.sparse tensor lazily and remembers, per batch bucket,
  whether the Triton SpMM or torch.sparse.mm measured faster.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os

import torch

from ..formats import CSRWeight, Int4Weight, Int8Weight, NMWeight, PackedWeight
from .base import Backend, FormatImpl, FormatTable

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NM_GROUP = 32  # N:M kernels handle groups up to 32 wide (kernels.nm_linear.MAX_M)


GEMV_MAX_M = 8  # batch rows up to which the GEMV kernels run (the kernels' GEMV_MAX_M; a test checks)


@functools.cache
def _triton_version() -> str | None:
    """The installed Triton's version, or None; found without importing triton."""
    try:
        if importlib.util.find_spec("triton") is None:
            return None
    except (ValueError, ImportError):  # sys.modules["triton"] is None or broken
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def interpreter_requested() -> bool:
    """TRITON_INTERPRET as Triton reads it (it must be set before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


class TritonBackend(Backend):
    name = "triton"
    priority = 20
    auto_devices = frozenset({"cuda"})  # the CPU interpreter is for tests: only when named

    def availability(self):
        version = _triton_version()
        if version is None:
            return False, "Triton is not installed (pip install 'sparseinfer[triton]')"
        if _cuda_ok():
            return True, f"Triton {version} on {torch.cuda.device_count()} CUDA device(s)"
        if interpreter_requested():
            return True, f"Triton {version} interpreter (TRITON_INTERPRET=1): CPU tensors, slowly; for testing"
        return False, (f"Triton {version} is installed but there is no CUDA GPU; set TRITON_INTERPRET=1 before "
                       f"triton is imported to run its kernels on CPU tensors through the interpreter")

    def supports(self, w: PackedWeight, x: torch.Tensor) -> bool:
        if _triton_version() is None or x.dtype not in ACTIVATION_DTYPES:
            return False
        if x.device.type == "cuda":
            if not _cuda_ok():
                return False
        elif x.device.type != "cpu" or not interpreter_requested():
            return False
        impl = FORMATS.get(w)
        return impl is not None and impl.supports(w)

    # -- prepack -----------------------------------------------------------------------------

    def prepack(self, w: PackedWeight, act: str | None = None) -> dict:
        """The kernels' layout of ``w``, memoised on it (float activations whatever ``act`` allows)."""
        return w.prepacked("triton", _prepack)

    # -- run ---------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None,
               act: str | None = None) -> torch.Tensor:
        # float activations in every kernel (W8A16 / W4A16): ``act`` allows int8 but never requires it
        if x.device != w.device:
            raise ValueError(f"triton: x is on {x.device} but the packed weight is on {w.device}")
        if bias is not None and bias.device != x.device:
            raise ValueError(f"triton: bias is on {bias.device} but x is on {x.device}")
        if not self.supports(w, x):
            raise RuntimeError(f"triton: no kernel for format {w.fmt!r} with {x.dtype} activations on {x.device}"
                               + (" (CPU tensors need TRITON_INTERPRET=1)" if x.device.type == "cpu" else ""))
        return FORMATS.get(w).linear(x, self.prepack(w), bias)

    def kernel_name(self, w: PackedWeight, batch: int, act: str | None = None) -> str:
        impl = FORMATS.get(w)
        if impl is None:
            return f"triton:{w.fmt} (no kernel)"
        return "triton:" + impl.kernel_name(w, "gemv" if batch <= GEMV_MAX_M else "dot")


def _prepack(w: PackedWeight) -> dict:
    """The kernels' layout of a canonical weight (see the module docstring): {"kind": the format
    family, ...the operands its implementation's ``linear`` takes}."""
    impl = FORMATS.get(w)
    if impl is None:
        raise ValueError(f"triton: no kernels for format {w.fmt!r} ({type(w).__name__})")
    return {"kind": w.kind, **impl.prepack(w)}


# -- per-format implementations ----------------------------------------------------------------
# Each: supports(w), prepack(w) -> operands, linear(x, operands, bias), kernel_name(w, variant).
# The kernels (sparseinfer.kernels, which need Triton) are imported at the first call.

FORMATS = FormatTable()


@FORMATS.register(Int8Weight)
class _Int8(FormatImpl):
    def prepack(self, w):
        return {"qweight": w.qweight, "scale_t": w.scale.T.contiguous()}

    def linear(self, x, p, bias):
        from sparseinfer.kernels.int8_linear import int8_linear

        return int8_linear(x, p["qweight"], p["scale_t"], bias)

    def kernel_name(self, w, variant):
        return f"int8_w8a16_{variant}"


@FORMATS.register(Int4Weight)
class _Int4(FormatImpl):
    def prepack(self, w):
        return {"qweight": w.qweight, "scale_t": w.scale.T.contiguous(),
                "zero_t": None if w.zero is None else w.zero.T.contiguous()}

    def linear(self, x, p, bias):
        from sparseinfer.kernels.int4_linear import int4_linear

        return int4_linear(x, p["qweight"], p["scale_t"], p["zero_t"], bias)

    def kernel_name(self, w, variant):
        return f"int4_w4a16_{variant}"


@FORMATS.register(NMWeight)
class _NM(FormatImpl):
    def supports(self, w):
        return w.m <= MAX_NM_GROUP

    def prepack(self, w):
        from sparseinfer.kernels.nm_linear import repack_meta

        p = {"n": w.n, "m": w.m, "value_format": w.value_format, "meta": repack_meta(w.meta, w.m, w.kc),
             "scale_t": None, "zero_t": None}
        if w.value_format is None:
            p["values"] = w.values
        else:
            q = w.values
            p["values"] = q.qweight
            p["scale_t"] = q.scale.T.contiguous()
            if getattr(q, "zero", None) is not None:
                p["zero_t"] = q.zero.T.contiguous()
        return p

    def linear(self, x, p, bias):
        from sparseinfer.kernels.nm_linear import nm_linear

        return nm_linear(x, p["values"], p["meta"], p["n"], p["m"], bias, scale_t=p["scale_t"], zero_t=p["zero_t"],
                         value_format=p["value_format"])

    def kernel_name(self, w, variant):
        return f"nm_{variant}({w.fmt})"


@FORMATS.register(CSRWeight)
class _CSR(FormatImpl):
    def prepack(self, w):
        from sparseinfer.kernels.csr_linear import CSRPlan

        return {"plan": CSRPlan(w.crow, w.col, w.values, w.scale, w.shape)}

    def linear(self, x, p, bias):
        return p["plan"].linear(x, bias)

    def kernel_name(self, w, variant):
        return "csr_spmm|torch.sparse.mm (measured per batch)"
