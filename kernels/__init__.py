"""Triton GPU kernels, installed as ``sparseinfer.kernels``. Importing this package never
requires Triton; the launchers raise a clear ImportError when it is missing.

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
