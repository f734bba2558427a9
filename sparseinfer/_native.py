"""The optional C++ extension ``sparseinfer._C`` (CPU kernels), loaded if it was built.

Importing this module never fails: when the extension is missing, ``_C`` is None and
``_C_ERROR`` says why; ``require_native()`` raises an ImportError that names what is missing and
how to build it. Everything else degrades at use (the ``cpu`` backend reports itself unavailable).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

_C: ModuleType | None
try:
    # import_module, not `from sparseinfer import _C`: while the package is still initialising the
    # latter reports a missing extension as a "circular import".
    _C = import_module("sparseinfer._C")
except ImportError as err:  # not built (pure-Python install), or built for another Python / platform
    _C = None
    _C_ERROR = str(err)
else:
    _C_ERROR = ""

BUILD_HINT = (
    "build it with `pip install -e .` (or `python setup.py build_ext --inplace` in a checkout); it needs "
    "CMake >= 3.18, a C++17 compiler and pybind11, and is skipped when SPARSEINFER_BUILD_EXT=0"
)


def require_native() -> ModuleType:
    """The loaded extension, or ImportError naming what is missing and how to build it."""
    if _C is None:
        raise ImportError(f"the C++ extension sparseinfer._C is not available ({_C_ERROR}); {BUILD_HINT}")
    return _C
