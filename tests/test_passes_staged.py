"""prune() into the dense model, and staged recipes (prune -> distill -> compress) as data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseinfer as si


def _data(n=256, seed=0):
    centers = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 32, generator=g), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _acc(model):
    x, y = _data(seed=5)
    return {"acc": (model(x).argmax(-1) == y).float().mean().item()}


def _loader():
    x, y = _data(seed=1)
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]


@pytest.mark.parametrize("recipe", ["2:4", "wanda:2:4", "sparsegpt:4:8", "sparse60", "sparsegpt:sparse60"])
def test_prune_zeroes_the_dense_model(trained, recipe):
    x, _ = _data()
    p = si.prune(trained, recipe, calib=[x[:64]])
    assert all(isinstance(m, nn.Linear) for m in (p[0], p[2], p[4]))
    w = p[2].weight.detach()
    if "sparse60" not in recipe:
        n, m = (int(v) for v in recipe.split(":")[-2:])
        assert ((w != 0).reshape(64, -1, m).sum(-1) <= n).all()
    else:
        assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    assert (trained[2].weight != 0).all()  # copied


def test_prune_bad_input(trained):
    with pytest.raises(ValueError, match="needs calibration data"):
        si.prune(trained, "wanda:2:4")
    with pytest.raises(ValueError, match="selects no"):
        si.prune(trained, "int8")
    with pytest.raises(ValueError, match="selects no"):
        si.prune(trained, {"default": "2:4", "ignore": ["*"]})


def test_prune_distill_compress(trained):
    x, _ = _data()
    res = si.run_stages(trained, [{"name": "prune", "prune": "sparsegpt:2:4"},
                                  {"name": "recover", "distill": {"epochs": 3, "lr": 1e-3, "temperature": 4.0}},
                                  {"name": "int8", "compress": "2:4+int8"}],
                        calib=[x[:128]], loader=_loader(), evaluate=_acc, progress=False)
    assert [r["stage"] for r in res.metrics] == ["input", "prune", "recover", "int8"]
    assert res.metrics[1]["zeros"] == pytest.approx(0.5, abs=0.01)
    assert res.metrics[3]["MB"] < res.metrics[0]["MB"] / 2.5
    assert res.metrics[3]["acc"] >= res.metrics[0]["acc"] - 0.05
    assert isinstance(res.model[2], si.CompressedLinear) and res.model[2].packed.fmt == "2:4+int8"
    assert "recover" in str(res) and "acc" in str(res)
    assert isinstance(trained[0], nn.Linear)  # copied


def test_structured_and_gradual_stages_from_a_file(trained, tmp_path):
    path = tmp_path / "stages.json"
    path.write_text(json.dumps({"stages": [
        {"structured": {"amount": 0.25, "criterion": "taylor"}},
        {"gradual": {"recipe": "sparse50", "epochs": 2, "lr": 1e-3}},
        {"compress": "sparse50+int8"}]}))
    res = si.run_stages(trained, str(path), loader=_loader(), evaluate=_acc, progress=False)
    assert res.metrics[1]["groups_cut"] == 2 and res.model[0].out_features == 48
    assert res.metrics[2]["zeros"] == pytest.approx(0.5, abs=0.02)
    assert res.model[2].packed.fmt == "csr+int8"


@pytest.mark.parametrize("stages,match", [
    ([], "non-empty list"),
    ([{"prune": "2:4", "distill": {}}], "exactly one of"),
    ([{"squash": 1}], "exactly one of"),
    ([{"compress": "int8"}, {"prune": "2:4"}], "only .recover. stages may follow"),
    ([{"prune": "2:5:7"}], "recipe"),
    ([{"distill": 3}], "mapping of arguments"),
    ({"steps": []}, "only 'stages'"),
    ("nosuch.yaml", "does not exist"),
])
def test_bad_stages(trained, stages, match):
    with pytest.raises(ValueError, match=match):
        si.run_stages(trained, stages, progress=False)


def test_stage_errors_name_the_stage(trained):
    with pytest.raises(ValueError, match="train the model: pass loader"):
        si.run_stages(trained, [{"distill": {"epochs": 1}}], progress=False)
    with pytest.raises(ValueError, match=r"stage 0 \(distill\).*epoch"):
        si.run_stages(trained, [{"distill": {"epoch": 1}}], loader=_loader(), progress=False)
