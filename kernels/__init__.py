"""Triton GPU kernels, installed as ``sparseinfer.kernels``. Importing this package never
requires Triton; the launchers raise a clear ImportError when it is missing."""
