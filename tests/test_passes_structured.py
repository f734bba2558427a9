"""Structured pruning: layers really shrink, coupled tensors stay consistent, and the smaller
model computes exactly what the original computes with the removed units switched off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseinfer as si
from sparseinfer.training.structured import structured_groups


def _switch_off(model, report):
    """The original model with every removed unit's consumer columns zeroed: removing the unit
    must give the same function."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for r in report:
            drop = sorted(set(range(r["before"])) - set(r["kept"]))
            for name in r["consumers"]:
                w = mods[name].weight
                for u in drop:
                    w[:, u * r["unit"]:(u + 1) * r["unit"]] = 0
    return model


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 24),
                         nn.GELU(), nn.Linear(24, 4)).eval()


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor"])
def test_mlp_neurons(criterion):
    model = _mlp()
    with torch.no_grad():  # BN statistics that are not the identity
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(40, 16), torch.randint(0, 4, (40,))
    report = []
    small = si.prune_structured(model, 0.5, criterion=criterion, loader=[(x[:20], y[:20]), (x[20:], y[20:])],
                                report=report)
    assert (small[0].out_features, small[1].num_features, small[4].in_features) == (16, 16, 16)
    assert (small[4].out_features, small[6].in_features, small[6].out_features) == (12, 12, 4)
    assert model[0].out_features == 32  # copied by default
    with torch.no_grad():
        torch.testing.assert_close(small(x), _switch_off(model, report)(x), rtol=1e-5, atol=1e-5)


def test_l2_keeps_the_largest_neurons():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        for i in range(6):
            model[0].weight[i].fill_(float(i))
            model[0].bias[i] = 0
            model[2].weight[:, i] = 0.0
    report = []
    si.prune_structured(model, 0.5, report=report)
    assert report[0]["kept"] == [3, 4, 5]


def test_conv_channels_with_norm_next_conv_and_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    report = []
    small = si.prune_structured(model, 0.5, criterion="l1", report=report)
    assert [g.kind for g in structured_groups(model)] == ["channels", "channels"]
    assert (small[0].out_channels, small[1].num_features, small[3].in_channels) == (4, 4, 4)
    assert (small[3].out_channels, small[7].in_features) == (3, 3 * 16)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), _switch_off(model, report)(x), rtol=1e-5, atol=1e-5)
    # the shrunken layers compress like any others
    c = si.compress(small, "int8", progress=False)
    with torch.no_grad():
        assert (c(x) - small(x)).abs().max() < 0.05


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.mark.slow  # importing transformers
def test_bert_heads_and_mlp_neurons():
    model = _tiny_bert()
    kinds = sorted(g.kind for g in structured_groups(model))
    assert kinds == ["heads", "heads", "neurons", "neurons"]
    report = []
    small = si.prune_structured(model, 0.25, head_amount=0.5, report=report)
    layer = small.encoder.layer[0]
    assert layer.attention.self.query.out_features == 16 and layer.attention.output.dense.in_features == 16
    assert layer.intermediate.dense.out_features == 48 and layer.output.dense.in_features == 48
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        got = small(input_ids=ids, attention_mask=mask).last_hidden_state
        want = _switch_off(model, report)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="amount"):
        si.prune_structured(_mlp(), 1.0)
    with pytest.raises(ValueError, match="criterion"):
        si.prune_structured(_mlp(), 0.5, criterion="l3")
    with pytest.raises(ValueError, match="taylor.*loader"):
        si.prune_structured(_mlp(), 0.5, criterion="taylor")
    with pytest.raises(ValueError, match="no prunable"):
        si.prune_structured(nn.Sequential(nn.Linear(4, 4)), 0.5)
    with pytest.raises(ValueError, match="no batches"):
        si.prune_structured(_mlp(), 0.5, criterion="taylor", loader=[])
