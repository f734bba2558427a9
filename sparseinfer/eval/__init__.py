"""Evaluation: compare a compressed model with its original, per-layer sensitivity, recipe
sweeps (size, quality, latency; Pareto frontier and knee) and choosing a per-layer recipe for a
quality budget. See docs/evaluation.md."""

from .autotune import DEFAULT_CANDIDATES, TuneResult, choose_recipe, compress_to_target, tune
from .data import as_batches
from .metrics import Evaluation, Outputs, collect, compare, evaluate, expected_calibration_error, wilson_interval
from .sensitivity import compressible_layers, layer_sensitivity, plot_sensitivity
from .sweeps import (SweepResult, knee_point, measure_latencies, measure_latency, model_size, pareto_front,
                     plot_sweep, sweep, write_report)

__all__ = ["evaluate", "collect", "compare", "Evaluation", "Outputs", "as_batches", "wilson_interval",
           "expected_calibration_error", "layer_sensitivity", "compressible_layers", "plot_sensitivity",
           "sweep", "SweepResult", "pareto_front", "knee_point", "measure_latency", "measure_latencies",
           "model_size", "plot_sweep", "write_report", "tune", "TuneResult", "choose_recipe", "compress_to_target",
           "DEFAULT_CANDIDATES"]
