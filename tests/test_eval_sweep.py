"""Pareto frontier and knee on hand-made points; size, latency, and a sweep of a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparseinfer as si
from sparseinfer.eval import layer_sensitivity, measure_latency, model_size, plot_sensitivity, write_report
from sparseinfer.eval.sweeps import normalise


def test_pareto_front_two_and_three_objectives():
    # (size min, quality max)
    pts = [(10, 0.99), (5, 0.98), (5, 0.97), (2, 0.90), (3, 0.80), (2, 0.90)]
    assert si.pareto_front(pts, ("min", "max")) == [0, 1, 3, 5]  # equal points both stay
    pts3 = [(4, 1.0, 10), (2, 0.9, 10), (2, 0.9, 12), (1, 0.5, 20), (1, 0.4, 5)]
    assert si.pareto_front(pts3) == [0, 1, 3, 4]  # (2, .9, 12) is beaten by (2, .9, 10) on latency
    assert si.pareto_front([(1, 1, 1)]) == [0]


def test_pareto_front_refuses_bad_input():
    with pytest.raises(ValueError, match="senses"):
        si.pareto_front([(1, 2)], ("min", "up"))
    with pytest.raises(ValueError, match="2 values for 3 objectives"):
        si.pareto_front([(1, 2)])
    with pytest.raises(ValueError, match="not finite"):
        si.pareto_front([(1, math.nan, 2)])


def test_normalise_orients_and_scales():
    x = normalise([(10, 0.5), (0, 1.0), (5, 1.0)], ("min", "max"))
    assert x.tolist() == [[0.0, 0.0], [1.0, 1.0], [0.5, 1.0]]
    assert normalise([(3, 1), (3, 2)], ("min", "max"))[:, 0].tolist() == [1.0, 1.0]  # constant axis


def test_knee_two_objectives_is_farthest_from_the_chord():
    # normalised: (0, 1), (.556, .95), (.889, .875), (1, 0); chord x + y = 1
    pts = [(1.0, 1.0), (0.5, 0.98), (0.2, 0.95), (0.1, 0.6)]
    assert si.knee_point(pts, ("min", "max")) == 2


def test_knee_three_objectives_and_fallbacks():
    pts = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.6, 0.6, 0.6), (0.7, 0.5, 0.1)]
    assert si.knee_point(pts, ("max", "max", "max")) == 3  # farthest above the plane x + y + z = 1
    # every point is an extreme (or below the chord): the largest normalised sum wins
    assert si.knee_point([(1, 0, 0), (0, 1, 0), (0, 0, 1)], ("max", "max", "max")) == 0
    assert si.knee_point([(0, 1), (1, 0.2)], ("max", "max")) == 0  # sums 1 vs 1: first
    assert si.knee_point([(5, 5, 5)]) == 0
    # a point under the chord never beats one above it
    assert si.knee_point([(0, 1), (0.2, 0.3), (0.5, 0.6), (1, 0)], ("max", "max")) == 2
    with pytest.raises(ValueError, match="no points"):
        si.knee_point([])


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _data(seed=1, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = _mlp()(x).argmax(1).detach()  # labels the dense model gets right: accuracy 1.0
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def test_model_size_counts_packed_and_dense_once():
    model = _mlp()
    dense = sum(p.numel() for p in model.parameters()) * 4
    assert model_size(model) == {"packed_bytes": 0, "dense_bytes": dense, "total_bytes": dense}
    c = si.compress(model, "int8", progress=False)
    packed = sum(r["packed_bytes"] for r in si.explain(c))
    biases = (64 + 64 + 5) * 4
    assert model_size(c) == {"packed_bytes": packed, "dense_bytes": biases, "total_bytes": packed + biases}
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert model_size(tied)["total_bytes"] == 10 * 8 * 4


def test_measure_latency():
    t = measure_latency(_mlp(), torch.randn(4, 32), warmup=1, repeat=3)
    assert 0 < t < 5
    with pytest.raises(ValueError, match="repeat >= 1"):
        measure_latency(_mlp(), torch.randn(4, 32), repeat=0)


def test_sweep_plot_and_report(tmp_path):
    model, data = _mlp(), _data()
    result = si.sweep(model, data, ["int8", "int4-g32", {"default": "int8", "layers": {"4": "dense"}}],
                      warmup=1, repeat=2, name="tiny MLP", progress=False)
    labels = [r["label"] for r in result.rows]
    assert labels[0] == "dense" and labels[1:3] == ["int8", "int4-g32"] and labels[3].startswith("{")
    dense, int8 = result.rows[0], result.rows[1]
    assert dense["quality"] == 1.0 and dense["drop"] == 0.0 and dense["compression"] == 1.0
    assert int8["size_bytes"] < dense["size_bytes"] and int8["compression"] > 3
    assert result.rows[2]["size_bytes"] < int8["size_bytes"]
    assert all(r["latency_ms"] > 0 for r in result.rows) and result.info["quality_name"] == "accuracy"
    assert result.front == si.pareto_front([[r["size_bytes"], r["quality"], r["latency_ms"]] for r in result.rows])
    assert result.knee in result.front and result.rows[result.knee]["knee"]
    paths = write_report(result, tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "| `int8` |" in md and "Knee:" in md and "sweep.png" in md
    assert "<table>" in paths["html"].read_text() and '"knee"' in paths["json"].read_text()
    with pytest.raises(ValueError, match="no recipes"):
        si.sweep(model, data, [])


def test_layer_sensitivity_swaps_back(tmp_path):
    model, data = _mlp(), _data()
    rows = layer_sensitivity(model, data, "2:4", progress=False)
    assert [r["layer"] for r in rows] == ["0", "2", "4"]
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))  # the model is untouched
    assert all(r["packed_bytes"] < r["dense_bytes"] and 0 <= r["quality"] <= 1 for r in rows)
    assert any(r["drop"] > 0 for r in rows)  # 2:4 without retraining costs something somewhere
    assert plot_sensitivity(rows, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no layer"):
        layer_sensitivity(nn.Sequential(nn.ReLU()), data)
