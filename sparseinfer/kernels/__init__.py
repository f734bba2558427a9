"""Triton GPU kernels, ``sparseinfer.kernels``. Importing this package never requires Triton; the
launchers raise a clear ImportError when it is missing.

Their source is the checkout's top-level ``kernels/`` folder, which a wheel installs here
(setuptools ``package-dir``). That folder has no ``__init__.py`` on purpose: a namespace portion
never shadows the PyPI package ``kernels`` (which transformers imports) when the checkout root is
on ``sys.path``. This file exists for source checkouts and editable installs only, where it points
the package at that folder; a wheel does not contain it.

One module per format family, each with its ``@triton.jit`` kernels (a batch-1..8 ``gemv`` with
split-K and a tiled ``tl.dot`` variant), its candidate configs as data, and a launcher that
checks operands, allocates the output and launches:

    int8_linear.int8_linear   W8A16, per-channel or group scales
    int4_linear.int4_linear   W4A16, group scales, optional zero points
    nm_linear.nm_linear       N:M sparse (float, int8 or int4 values), metadata decoded in registers
    csr_linear.csr_linear     unstructured sparse (Triton SpMM; ``CSRPlan`` picks it or torch.sparse by
                              measurement)

``_common`` holds the jit wrapper (interpreter or compiler, as Triton was imported), checks, the
tuner and the split-K reduction. ``sparseinfer.backends.triton`` prepacks weights and dispatches.
"""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))  # noqa: F821 - the package's own __path__
