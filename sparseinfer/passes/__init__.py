"""Compression passes. A pass edits ``Target``s -- the dense GEMM-form weight of each layer to
be compressed and the keyword arguments its ``pack`` call will get -- and never calls a kernel.

Methods register under a name used in recipes ("magnitude", "rtn", ...; see ``passes.base``).
``passes.pipeline`` runs a recipe's methods over a model and packs the result (``compress``).
"""

from . import gptq, prune, quantize, sparsegpt, wanda  # noqa: F401  (register the built-in methods)
from .base import METHODS, Method, Target, register_method

__all__ = ["Target", "Method", "METHODS", "register_method"]
