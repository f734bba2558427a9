"""Kernel benchmarks: every format x available backend, and the torch baselines and peers, on
real-model shapes x batch sizes, with hot and cold (rotated past the L3) weights. Each case is
checked against the exact product before it is timed (see sibench.build_kernel)."""

from sibench import run_kernel_case


def test_kernel(benchmark, kernel_case, smoke):
    run_kernel_case(benchmark, kernel_case, smoke)
