"""Recipes, compress() and explain() on small models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseinfer as si
from sparseinfer.recipe import Recipe, parse_layer_recipe


class TinyLM(nn.Module):
    """Embedding -> MLP -> LM head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.lm_head = nn.Linear(32, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.fc2(torch.relu(self.fc1(self.embed(ids)))))


def _sqnr_db(ref, out):
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


@pytest.mark.parametrize(
    "text,fmt,params,sparsity",
    [
        ("int8", "int8", {"group_size": None}, None),
        ("int8-g64", "int8", {"group_size": 64}, None),
        ("int4", "int4", {"group_size": 128, "symmetric": True}, None),
        ("int4-g32-asym", "int4", {"group_size": 32, "symmetric": False}, None),
        ("int4-pc", "int4", {"group_size": None, "symmetric": True}, None),
        ("2:4", "2:4", {}, None),
        ("4:8", "4:8", {}, None),
        ("2:4+int8", "2:4+int8", {"group_size": None}, None),
        ("2:4+int4-g64", "2:4+int4", {"group_size": 64, "symmetric": True}, None),
        ("sparse90", "csr", {}, 0.9),
        ("sparse75+int8", "csr+int8", {}, 0.75),
    ],
)
def test_parse_layer_recipe(text, fmt, params, sparsity):
    r = parse_layer_recipe(text)
    assert (r.fmt, r.params, r.sparsity) == (fmt, params, sparsity)


@pytest.mark.parametrize("bad", ["int3", "4:4", "2:4+int2", "sparse0", "sparse100", "", "int8-asym", "sparse90+int4",
                                 "nosuch:int4"])
def test_bad_recipes(bad):
    with pytest.raises(ValueError, match="recipe"):
        parse_layer_recipe(bad)


@pytest.mark.parametrize("bad", ["sparse100", "sparse0", "sparse250-global", "sparse100+int8"])
def test_sparsity_out_of_range_says_so(bad):
    """Not the int8 / int4 message the quantization parser would give (issue 15)."""
    with pytest.raises(ValueError, match=r"strictly between 0 and 100 percent") as err:
        parse_layer_recipe(bad)
    assert "int8 / int4" not in str(err.value)


def test_global_sparsity_thresholds_all_layers_together():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.mul_(10)  # larger weights: global pruning spares this layer
    c = si.compress(model, "sparse50-global", progress=False)
    d0, d1 = c[0].packed.density, c[1].packed.density
    assert d1 > 0.9 and d0 < 0.1
    assert abs((d0 * 64 * 64 + d1 * 64 * 64) / (2 * 64 * 64) - 0.5) < 0.01
    per_layer = si.compress(model, "sparse50", progress=False)
    assert abs(per_layer[0].packed.density - 0.5) < 0.01 and abs(per_layer[1].packed.density - 0.5) < 0.01


@pytest.mark.parametrize("recipe,min_db", [("int8", 35), ("int4-g32", 15), ("2:4+int8", 0), ("sparse50", 2)])
def test_compressed_mlp_tracks_dense(recipe, min_db):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 10))
    x = torch.randn(17, 48)
    c = si.compress(model, recipe, progress=False)
    assert isinstance(c[0], si.CompressedLinear) and isinstance(model[0], nn.Linear)  # copied by default
    with torch.no_grad():
        assert _sqnr_db(model(x), c(x)) > min_db


def test_conv2d_runs_as_gemm():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 4, (3, 2), dilation=2),
                        nn.Conv2d(4, 4, 3, groups=2))
    x = torch.randn(2, 3, 17, 13)
    c = si.compress(cnn, "int8", progress=False)
    assert isinstance(c[0], si.CompressedConv2d) and isinstance(c[2], si.CompressedConv2d)
    assert isinstance(c[3], nn.Conv2d)  # grouped conv is not one GEMM: left dense
    with torch.no_grad():
        assert _sqnr_db(cnn(x), c(x)) > 35


def test_tied_lm_head_stays_dense_unless_named():
    model = TinyLM()
    c = si.compress(model, "int8", progress=False)
    assert isinstance(c.fc1, si.CompressedLinear) and isinstance(c.lm_head, nn.Linear)
    named = si.compress(model, {"default": "int8", "layers": {"lm_head": "int4-g32"}}, progress=False)
    assert named.lm_head.packed.fmt == "int4"


def test_dict_recipe_overrides_and_ignore(tmp_path):
    model = TinyLM()
    recipe = {"default": "int4-g32", "layers": {"fc2": "2:4+int8"}, "ignore": ["fc1"]}
    c = si.compress(model, recipe, progress=False)
    assert isinstance(c.fc1, nn.Linear) and c.fc2.packed.fmt == "2:4+int8"
    path = tmp_path / "recipe.yaml"
    path.write_text("default: int8\nlayers:\n  fc1: dense\n")
    c = si.compress(model, str(path), progress=False)
    assert isinstance(c.fc1, nn.Linear) and c.fc2.packed.fmt == "int8"


def test_group_larger_than_layer_falls_back_to_per_channel():
    c = si.compress(nn.Sequential(nn.Linear(48, 8)), "int4", progress=False)  # g128 > K=48
    assert c[0].packed.params()["group_size"] is None


def test_recipe_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        si.compress(nn.Sequential(nn.ReLU()), "int8")
    with pytest.raises(ValueError, match="unknown keys"):
        Recipe.from_any({"defualt": "int8"})
    with pytest.raises(ValueError, match="does not exist"):
        Recipe.from_any("missing.yaml")


def test_inplace_and_device_move():
    model = nn.Sequential(nn.Linear(32, 16))
    c = si.compress(model, "int4-g32", inplace=True, progress=False)
    assert c is model and isinstance(model[0], si.CompressedLinear)
    state = c.state_dict()
    assert "0.packed_qweight" in state and "0.packed_scale" in state
    c.to(torch.device("cpu"))
    assert c[0].packed.qweight is c[0].packed_qweight


def test_explain_reports_layers():
    c = si.compress(TinyLM(), "2:4+int4-g16", progress=False)
    rows = si.explain(c)
    assert [r["layer"] for r in rows] == ["fc1", "fc2"]
    assert all(r["packed_bytes"] < r["dense_bytes"] for r in rows)
    assert rows[0]["backend"] in si.backends()
    text = str(rows)
    assert "fc1" in text and "2:4+int4" in text and "total: 2 compressed layers" in text


def test_compress_to_a_target_searches_per_layer_recipes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(64, 32)
    labels = model(x).argmax(-1).detach()
    c = si.compress(model, target={"max_drop": 0.05, "minimize": "size"}, data=(x, labels), progress=False)
    assert any(isinstance(m, si.CompressedLinear) for m in c.modules())
    with pytest.raises(ValueError, match="not both"):
        si.compress(model, "int8", target=0.01, data=(x, labels))
    with pytest.raises(ValueError, match="needs data="):
        si.compress(model, target=0.01)
