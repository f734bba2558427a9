"""Choosing a per-layer recipe for a quality budget: the greedy choice on hand-made tables, and
the whole search on a small synthetic classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseinfer as si
from sparseinfer.eval import compress_to_target, tune
from sparseinfer.eval.autotune import _path, _recipe_at


def test_path_from_dense_to_cheapest_by_hand():
    options = {"a": {"dense": (10, 0.0), "int8": (5, 0.001), "int4": (3, 0.02)},
               "b": {"dense": (10, 0.0), "int8": (5, -0.002), "int4": (2, 0.004)}}
    # b:int8 adds no damage; then a:int8 (5 saved / 0.001), b:int4 (3 / 0.006), a:int4 (2 / 0.019)
    moves = _path(options)
    assert moves == [("b", "int8"), ("a", "int8"), ("b", "int4"), ("a", "int4")]
    assert _recipe_at(moves, 0) == {"default": "dense", "layers": {}}
    assert _recipe_at(moves, 3) == {"default": "dense", "layers": {"b": "int4", "a": "int8"}}
    assert _path({"a": {"dense": (1, 0.0), "int8": (2, 0.0)}}) == []  # never pay more


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _data(seed=1, n=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = _mlp()(x).argmax(1).detach()
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


@pytest.mark.parametrize("budget", [0.0, 0.05])
def test_tune_for_size_meets_the_budget(budget):
    model, data = _mlp(), _data()
    result = tune(model, data, budget, ["int8", "int4-g32", "2:4"], minimize="size", progress=False)
    assert set(result.recipe) == {"default", "layers"} and result.recipe["default"] == "dense"
    assert result.recipe["layers"], "int8 costs no accuracy here: something is always compressed"
    assert result.evaluation.drop <= budget and result.size_bytes < result.dense_size_bytes
    again = si.evaluate(model, si.compress(model, result.recipe, progress=False), data)
    assert again.drop == pytest.approx(result.evaluation.drop)  # the recipe reproduces the verified model
    assert {r["layer"] for r in result.table} == {"0", "2", "4"} and "steps" in " ".join(result.log)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    assert "layers compressed" in str(result)


def test_tune_with_a_custom_cost_sees_layer_inputs():
    model, data = _mlp(), _data()
    seen = []

    def cost(name, module, x):
        seen.append((name, tuple(x.shape)))
        return 1.0 if isinstance(module, nn.Linear) else 0.5

    recipe = si.choose_recipe(model, data, 1.0, ["int8"], minimize=cost, progress=False)
    assert recipe == {"default": "dense", "layers": {"0": "int8", "2": "int8", "4": "int8"}}
    assert ("0", (64, 32)) in seen and ("4", (64, 64)) in seen


def test_tune_for_latency_keeps_the_faster_model():
    model, data = _mlp(), _data()
    result = tune(model, data, 0.05, ["int8"], minimize="latency", warmup=1, repeat=3, progress=False)
    assert result.latency_ms <= result.dense_latency_ms
    if not result.recipe["layers"]:  # nothing beat dense on this machine: a copy of the dense model
        assert result.model is not model and result.evaluation is None
    else:
        assert result.evaluation.drop <= 0.05


def test_compress_to_target():
    model, data = _mlp(), _data()
    c = compress_to_target(model, {"max_drop": 0.02, "minimize": "size", "candidates": ["int8", "int4-g32"]}, data,
                           progress=False)
    assert c.sparseinfer_tune["drop"] <= 0.02 and c.sparseinfer_tune["minimize"] == "size"
    assert any(isinstance(m, si.CompressedLinear) for m in c.modules())
    with pytest.raises(ValueError, match="needs data="):
        compress_to_target(model, 0.01, None)
    with pytest.raises(ValueError, match="unknown keys"):
        compress_to_target(model, {"max_loss": 0.01}, data)
    with pytest.raises(ValueError, match="'latency' or 'size'"):
        compress_to_target(model, "fast", data)
    with pytest.raises(ValueError, match="minimize must be"):
        tune(model, data, 0.01, minimize="energy")
    with pytest.raises(ValueError, match="budget must be"):
        tune(model, data, -1)
