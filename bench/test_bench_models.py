"""Model benchmarks: all-MiniLM-L6-v2 (seq 128), a small CNN and an MLP end to end at batch 1
and 32, each compressed format x backend against fp32 / bf16 and the peers, with the weights'
bytes, the peak RSS of a fresh process and the SQNR against the fp32 model."""

from sibench import run_model_case


def test_model(benchmark, model_case, smoke):
    run_model_case(benchmark, model_case, smoke)
