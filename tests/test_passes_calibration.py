"""Calibration: input statistics via hooks, block-by-block processing, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseinfer as si
from sparseinfer.passes.pipeline import targets as _targets
from sparseinfer.passes.calibration import calibrate, collect_stats, find_blocks
from sparseinfer.recipe import Recipe


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + self.fc2(torch.relu(self.fc1(x))) * scale


class Stack(nn.Module):
    """Embedding-free stand-in for a transformer: blocks in a ModuleList and a head outside it."""

    def __init__(self, d=16, depth=3):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 4)

    def forward(self, x, scale=1.0):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=scale)
        return self.head(h)


def _targets_for(model, recipe="2:4"):
    return _targets(model, Recipe.from_any(recipe))


def test_stats_match_direct_computation_linear_and_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    x = [torch.randn(2, 3, 5, 5), torch.randn(3, 3, 5, 5)]
    stats = collect_stats(model, _targets_for(model, "int8"), x, gram=True)
    patches = torch.cat([F.unfold(b, 3, padding=1).transpose(1, 2).reshape(-1, 27) for b in x])
    assert stats["0"].rows == patches.shape[0]
    torch.testing.assert_close(stats["0"].gram, (patches.T @ patches).double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats["0"].col_norms, patches.norm(dim=0), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        feats = torch.cat([model[:3](b) for b in x])
    torch.testing.assert_close(stats["3"].hessian(), (2 / feats.shape[0]) * (feats.T @ feats).double(),
                               rtol=1e-5, atol=1e-4)


def test_batches_may_be_tuples_or_dicts():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(5, 8)
    as_tensor = collect_stats(model, _targets_for(model), [x])
    as_tuple = collect_stats(model, _targets_for(model), [(x, 1.0)])
    as_dict = collect_stats(model, _targets_for(model), [{"x": x, "scale": 1.0}])
    for name in as_tensor:
        torch.testing.assert_close(as_tensor[name].sqsum, as_tuple[name].sqsum)
        torch.testing.assert_close(as_tensor[name].sqsum, as_dict[name].sqsum)


def test_blockwise_sees_outputs_of_compressed_blocks():
    """Block i is calibrated on what blocks < i produce *after* their compression, one block's
    statistics at a time, and the head (outside the stack) last."""
    torch.manual_seed(0)
    model = Stack()
    targets = _targets_for(model)
    assert [type(b) for b in find_blocks(model, targets)] == [Block] * 3
    calib = [torch.randn(6, 8), torch.randn(4, 8)]
    seen = []

    def process(group, stats):
        seen.append(sorted(stats))
        if group[0].name == "blocks.0.fc1":  # "compress" block 0: zero its MLP
            for t in group:
                t.weight = torch.zeros_like(t.weight)

    calibrate(model, targets, calib, process, gram=False)
    assert seen == [["blocks.0.fc1", "blocks.0.fc2"], ["blocks.1.fc1", "blocks.1.fc2"],
                    ["blocks.2.fc1", "blocks.2.fc2"], ["head", "inp"]]
    # block 1 got inp(x) unchanged (block 0 became identity + bias of fc2 = 0 * ... + b)
    assert torch.equal(model.blocks[0].fc1.weight, torch.zeros(32, 16))  # written back into the model


def test_block_stats_equal_a_direct_replay():
    torch.manual_seed(0)
    model = Stack()
    targets = _targets_for(model)
    calib = [torch.randn(6, 8)]
    got = {}
    calibrate(model, targets, calib, lambda g, s: got.update({k: v.sqsum.clone() for k, v in s.items()}), gram=False)
    with torch.no_grad():
        h = model.blocks[0](model.inp(calib[0]))
        h1 = model.blocks[1].fc1(h)
    torch.testing.assert_close(got["blocks.1.fc1"], (h * h).sum(0).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["blocks.1.fc2"], (torch.relu(h1) ** 2).sum(0).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["wanda:2:4", "sparsegpt:2:4", "gptq:int8"])
def test_bad_calibration_data_is_refused_clearly(recipe):
    model = Stack()
    with pytest.raises(ValueError, match="needs calibration data"):
        si.compress(model, recipe, progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        si.compress(model, recipe, calib=[], progress=False)
    with pytest.raises(ValueError, match=r"calibration batch 1 \(tensor \(4, 7\) float32\) does not fit Stack"):
        si.compress(model, recipe, calib=[torch.randn(4, 8), torch.randn(4, 7)], progress=False)
    with pytest.raises(ValueError, match="single Tensor"):
        si.compress(model, recipe, calib=torch.randn(4, 8), progress=False)
    with pytest.raises(ValueError, match="must be a tensor, a tuple"):
        si.compress(model, recipe, calib=[3], progress=False)


def test_consumed_generator_gets_a_hint():
    model = Stack()
    gen = (torch.randn(4, 8) for _ in range(2))
    recipe = {"default": "2:4+int8", "methods": {"prune": "wanda", "quantize": "gptq"}}
    with pytest.raises(ValueError, match="already consumed"):
        si.compress(model, recipe, calib=gen, progress=False)


def test_layer_off_the_forward_path_is_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['unused'\] received no input"):
        si.compress(Unused(), "wanda:2:4", calib=[torch.randn(2, 8)], progress=False)


def test_recipe_naming_no_layer_is_refused():
    with pytest.raises(ValueError, match="matches no"):
        si.compress(Stack(), {"default": "wanda:2:4", "ignore": ["*"]}, calib=[torch.randn(2, 8)], progress=False)


def test_training_mode_and_unrelated_weights_are_restored():
    model = Stack().train()
    before = model.blocks[0].fc1.weight.clone()
    c = si.compress(model, "gptq:int8", calib=[torch.randn(4, 8)], progress=False)
    assert model.training and torch.equal(model.blocks[0].fc1.weight, before)  # the input model is untouched
    assert isinstance(c.blocks[0].fc1, si.CompressedLinear)


@pytest.mark.slow  # importing transformers
def test_tiny_bert_block_by_block_with_dict_batches():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32)
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    targets = _targets_for(model)
    assert len(find_blocks(model, targets)) == 3
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[2:, 9:] = 0
    calib = [{"input_ids": torch.randint(0, 60, (4, 12)), "attention_mask": mask} for _ in range(3)]
    test = {"input_ids": torch.randint(0, 60, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    with torch.no_grad():
        ref = model(**test).last_hidden_state
        err = lambda c: ((c(**test).last_hidden_state - ref).norm() / ref.norm()).item()  # noqa: E731
        errs = {r: err(si.compress(model, r, calib=calib, progress=False))
                for r in ("2:4", "wanda:2:4", "sparsegpt:2:4", "int4-g16", "gptq:int4-g16")}
    assert errs["sparsegpt:2:4"] < errs["2:4"] and errs["wanda:2:4"] < errs["2:4"], errs
    assert errs["gptq:int4-g16"] < errs["int4-g16"], errs
    with pytest.raises(ValueError, match="calibration batch 0"):
        si.compress(model, "wanda:2:4", calib=[{"input_ids": torch.randint(0, 60, (2, 40))}], progress=False)
