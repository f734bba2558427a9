"""Dispatch sweep: every format x act mode x batch (1 ... 2048) on the MiniLM / BERT shapes and
4096 x 4096, through a CompressedLinear layer as a model calls it, against nn.Linear (dense fp32);
every point slower than dense is flagged in the JSON (extra_info below_dense) and listed at the end
of the run (see sibench.run_sweep_case). The active ISA is swept; SPARSEINFER_ISA=avx2 sweeps AVX2.
Outside the smoke scope the routes of every point are measured first (no per-process budget): the
state a machine's cache reaches once it has met each shape."""

from sibench import run_sweep_case


def test_sweep(benchmark, sweep_case, smoke):
    run_sweep_case(benchmark, sweep_case, smoke)
