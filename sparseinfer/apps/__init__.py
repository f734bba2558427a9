"""Applications built on the public API: the demo (``sparseinfer demo``), the model zoo the CLI
compresses and the benchmarking helpers of ``sparseinfer bench`` and bench/."""
