"""Distillation (soft targets with T^2, hard labels, feature and relation losses) and QAT with a
straight-through estimator that ends exactly on the packed formats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseinfer as si
from sparseinfer.training.distill import FakePack, soft_target_loss


def _data(n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 32, generator=g) * 1.5
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 32, generator=g), y


def _batches(x, y, size=64):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_soft_target_loss_is_t2_scaled_kl():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    p = F.softmax(t / T, -1)
    manual = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(soft_target_loss(s, t, T), manual)
    assert soft_target_loss(t, t, T).abs() < 1e-6


def _agreement(a, b, x):
    with torch.no_grad():
        return (a(x).argmax(-1) == b(x).argmax(-1)).float().mean().item()


def test_distill_recovers_a_pruned_student_and_keeps_its_mask(teacher):
    x, y = _data(seed=1)
    student = si.prune(teacher, "1:4")  # harsh: keep one weight in four
    before = F.kl_div(F.log_softmax(student(x), -1), F.softmax(teacher(x), -1), reduction="batchmean").item()
    res = si.distill(student, teacher, _batches(*_data(seed=2)), epochs=10, lr=1e-2, temperature=2.0, alpha=0.9,
                     eval_fn=lambda m: {"agree": _agreement(m, teacher, x)}, progress=False)
    after = F.kl_div(F.log_softmax(student(x), -1), F.softmax(teacher(x), -1), reduction="batchmean").item()
    assert after < 0.5 * before
    assert len(res.history) == 10 and {"loss", "soft", "hard", "agree"} <= set(res.history[-1])
    for layer in (student[0], student[2]):
        groups = (layer.weight != 0).reshape(layer.out_features, -1, 4).sum(-1)
        assert (groups <= 1).all()  # still 1:4
    assert not student.training


def test_feature_and_relation_losses_with_projection(teacher):
    student = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))  # narrower hidden layer
    res = si.distill(student, teacher, _batches(*_data()), epochs=2, lr=1e-3, features={"1": "1"},
                     relation_weight=1.0, progress=False)
    assert {"feature", "relation"} <= set(res.history[-1])
    assert res.history[-1]["loss"] < res.history[0]["loss"] * 1.5


def test_inputs_only_and_dict_batches(teacher):
    x, y = _data()
    student = si.prune(teacher, "2:4")
    res = si.distill(student, teacher, [x[:64], x[64:128]], epochs=1, progress=False)
    assert "hard" not in res.history[-1]

    class Kw(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features):
            return self.inner(features)

    res = si.distill(Kw(student), Kw(teacher), [{"features": x[:64], "labels": y[:64]}], progress=False)
    assert "hard" in res.history[-1]


@pytest.mark.parametrize("recipe", ["int8", "int4-g16", "2:4+int8", "2:4+int4-g8-asym"])
def test_qat_ends_on_the_packed_grid(teacher, recipe):
    x, y = _data(seed=3)
    student = si.prune(teacher, "2:4") if recipe.startswith("2:4") else __import__("copy").deepcopy(teacher)
    si.distill(student, teacher, _batches(x, y), epochs=2, lr=1e-3, qat=recipe, progress=False)
    assert not any(hasattr(m, "parametrizations") for m in student.modules())
    for layer in (student[0], student[2]):  # re-packing changes nothing: the weights are on the grid
        w = layer.weight.detach()
        fp = FakePack(si.parse_layer_recipe(recipe).fmt, si.parse_layer_recipe(recipe).params)
        assert torch.equal(fp.project(w), w)
    packed = si.set_act(si.compress(student, recipe, progress=False), "fp32")  # exact: the same numbers
    with torch.no_grad():
        torch.testing.assert_close(packed(x), student(x), rtol=1e-5, atol=1e-5)


def test_fake_pack_is_straight_through():
    w = torch.randn(4, 16, requires_grad=True)
    fp = FakePack("int4", {"group_size": 8, "symmetric": True})
    out = fp(w)
    assert torch.equal(out.detach(), si.pack(w.detach(), "int4", group_size=8).to_dense())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_prepare_qat_twice_and_finish(teacher):
    import copy

    m = copy.deepcopy(teacher)
    assert si.prepare_qat(m, "int8") == ["0", "2"]
    with pytest.raises(ValueError, match="already parametrized"):
        si.prepare_qat(m, "int8")
    si.finish_qat(m)
    assert isinstance(m[0].weight, nn.Parameter)


def test_bad_input(teacher):
    x, y = _data()
    s = si.prune(teacher, "2:4")
    with pytest.raises(ValueError, match="no batches"):
        si.distill(s, teacher, [], progress=False)
    with pytest.raises(ValueError, match="iterable of batches"):
        si.distill(s, teacher, x, progress=False)
    with pytest.raises(ValueError, match="differ"):
        si.distill(nn.Linear(32, 5), teacher, _batches(x, y), progress=False)
    with pytest.raises(ValueError, match="relation_weight"):
        si.distill(s, teacher, _batches(x, y), relation_weight=1.0, progress=False)
    with pytest.raises(ValueError, match="has no module"):
        si.distill(s, teacher, _batches(x, y), features={"nosuch": "1"}, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        si.distill(s, teacher, _batches(x, y), alpha=2.0, progress=False)
    with pytest.raises(ValueError, match="matches no"):
        si.distill(s, teacher, _batches(x, y), qat={"default": "int8", "ignore": ["*"]}, progress=False)
