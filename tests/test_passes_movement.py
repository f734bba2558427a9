"""Gradual magnitude pruning, movement pruning and iterative pruning with rewinding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseinfer as si
from sparseinfer.training.movement import cubic_schedule, snapshot


def _task(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def _train(model, steps, pruner=None, lr=1e-2):
    x, y = _task()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()
    return loss.item()


def test_cubic_schedule():
    assert cubic_schedule(0, 0.9, 10, 110) == 0.0
    assert cubic_schedule(110, 0.9, 10, 110) == 0.9
    assert cubic_schedule(60, 0.8, 10, 110) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    values = [cubic_schedule(s, 0.9, 0, 50) for s in range(60)]
    assert values == sorted(values)


@pytest.mark.parametrize("criterion", ["magnitude", "movement"])
def test_gradual_unstructured(criterion):
    model = _model()
    pruner = si.GradualPruner(model, "sparse75", begin=5, end=45, every=5, criterion=criterion)
    masks = []
    start = _train(model, 1)
    for _ in range(10):
        _train(model, 5, pruner)
        masks.append(torch.cat([layer.masker.mask.flatten() for layer in pruner.layers]).clone())
    sparsities = [s for _, s in pruner.history]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.75, abs=0.01)
    if criterion == "magnitude":  # pruned weights never come back
        assert all((~a & b).sum() == 0 for a, b in zip(masks, masks[1:]))
    end = _train(model, 20, pruner)
    assert end < start
    pruner.finish()
    for layer in (model[0], model[2]):
        assert isinstance(layer.weight, nn.Parameter)
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    c = si.compress(model, "sparse75", progress=False)  # packs the same zeros, prunes nothing more
    assert torch.equal(c[0].packed.to_dense(), model[0].weight.detach())


def test_gradual_nm_steps_through_3_of_4():
    model = _model()
    pruner = si.GradualPruner(model, "2:4", end=10, every=1)
    seen = set()
    for _ in range(10):
        _train(model, 1, pruner)
        per_group = (pruner.layers[0].masker.mask.reshape(64, -1, 4).sum(-1))
        seen.add(int(per_group.max()))
    pruner.finish()
    assert {3, 2} <= seen
    w = model[0].weight.detach()
    assert ((w != 0).reshape(64, -1, 4).sum(-1) <= 2).all()


def test_gradual_global_scope():
    model = _model()
    with torch.no_grad():
        model[2].weight.mul_(100)
    pruner = si.GradualPruner(model, "sparse50-global", end=1)
    pruner.finish()
    z0 = (model[0].weight == 0).float().mean().item()
    z2 = (model[2].weight == 0).float().mean().item()
    assert z0 > 0.5 and z2 < 0.01


def test_gradual_inside_distillation():
    teacher = _model()
    _train(teacher, 50)
    student = copy.deepcopy(teacher)
    x, y = _task()
    pruner = si.GradualPruner(student, "2:4", end=8)
    si.distill(student, teacher, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)], epochs=3, lr=1e-3,
               callbacks=[pruner.step], keep_sparsity=False, progress=False)
    pruner.finish()
    assert ((student[0].weight != 0).reshape(64, -1, 4).sum(-1) <= 2).all()


def test_iterative_prune_with_weight_rewinding():
    model = _model()
    init = snapshot(model)
    calls = []
    _, hist = si.iterative_prune(model, "sparse87.5", lambda m, r: calls.append(r) or {"r": r}, rounds=3,
                                 rewind="weights", rewind_state=init)
    assert calls == [0, 1, 2, 3]
    sp = [h["sparsity"] for h in hist]
    assert sp[1:] == pytest.approx([0.5, 0.75, 0.875], abs=0.01)  # geometric: 1 - (1/8)^(r/3)
    w, w0 = model[0].weight.detach(), init["0.weight"]
    alive = w != 0
    assert torch.equal(w[alive], w0[alive])  # survivors rewound (train_fn changed nothing)


def test_iterative_prune_learning_rate_rewinding_trains():
    model = _model()
    _, hist = si.iterative_prune(model, "sparse80", lambda m, r: {"loss": _train(m, 30)}, rounds=2, rewind="lr")
    assert hist[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert hist[-1]["loss"] < 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="criterion"):
        si.GradualPruner(_model(), "sparse50", end=5, criterion="random")
    with pytest.raises(ValueError, match="begin < end"):
        si.GradualPruner(_model(), "sparse50", begin=5, end=5)
    with pytest.raises(ValueError, match="asks for no sparsity"):
        si.GradualPruner(_model(), "int8", end=5)
    with pytest.raises(ValueError, match="matches no"):
        si.GradualPruner(_model(), {"default": "sparse50", "ignore": ["*"]}, end=5)
    with pytest.raises(ValueError, match="rewind"):
        si.iterative_prune(_model(), "sparse50", lambda m, r: None, rewind="epoch")
    m = _model()
    si.GradualPruner(m, "sparse50", end=5)
    with pytest.raises(ValueError, match="already parametrized"):
        si.GradualPruner(m, "sparse50", end=5)
