"""Wanda, SparseGPT and GPTQ: masks, exact agreement with ``pack``, and better reconstruction than
magnitude / round-to-nearest on data with correlated, outlier-heavy inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparseinfer as si
from sparseinfer.passes.pipeline import targets as _targets
from sparseinfer.passes import METHODS
from sparseinfer.passes.gptq import gptq_quantize
from sparseinfer.passes.sparsegpt import sparsegpt_prune
from sparseinfer.passes.wanda import wanda_mask
from sparseinfer.recipe import Recipe


def _inputs(rows, k, seed=0):
    """Correlated features with a few large-magnitude columns (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    scale = torch.ones(k)
    scale[: max(1, k // 16)] = 8.0
    return ((torch.randn(rows, k, generator=g) @ mix) + 0.3 * torch.randn(rows, k, generator=g)) * scale


def _hessian(x):
    return (2 / x.shape[0]) * (x.T @ x).double()


def _nm_ok(w, n, m):
    k = w.shape[1]
    pad = torch.nn.functional.pad(w, (0, -k % m))
    return bool(((pad.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def _err(x, w, w2):
    return ((x @ w.T - x @ w2.T).norm() / (x @ w.T).norm()).item()


def test_wanda_mask_nm_and_rows():
    torch.manual_seed(0)
    w = torch.randn(8, 12)
    norms = torch.rand(12) + 0.1
    keep = wanda_mask(w, norms, n=2, m=4)
    score = (w.abs() * norms).reshape(8, 3, 4)
    expect = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(2, dim=-1).indices, True)
    assert torch.equal(keep, expect.reshape(8, 12))
    keep = wanda_mask(w, norms, sparsity=0.25)
    assert (keep.sum(1) == 9).all()
    assert torch.equal(wanda_mask(w, torch.ones(12), n=2, m=4), si.passes.prune.nm_magnitude_mask(w, 2, 4))
    with pytest.raises(ValueError, match="norms of shape"):
        wanda_mask(w, torch.ones(5), n=2, m=4)


@pytest.mark.parametrize("k", [64, 30])  # 30: the last group of 4 is cut short
def test_sparsegpt_nm_beats_magnitude_and_wanda(k):
    x = _inputs(512, k)
    w = torch.randn(24, k)
    out = sparsegpt_prune(w, _hessian(x), n=2, m=4)
    assert _nm_ok(out, 2, 4)
    keep_mag = si.passes.prune.nm_magnitude_mask(w, 2, 4)
    keep_wanda = wanda_mask(w, x.norm(dim=0), n=2, m=4)
    e_sgpt, e_mag, e_wanda = _err(x, w, out), _err(x, w, w * keep_mag), _err(x, w, w * keep_wanda)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)
    # what pack keeps is exactly the SparseGPT result
    assert torch.equal(si.pack(out, "2:4").to_dense(), out)


def test_sparsegpt_unstructured_hits_the_sparsity():
    x = _inputs(256, 64)
    w = torch.randn(16, 64)
    out = sparsegpt_prune(w, _hessian(x), sparsity=0.6)
    assert abs((out == 0).float().mean().item() - 0.6) < 0.01
    assert _err(x, w, out) < _err(x, w, w * si.passes.prune.magnitude_mask(w, 0.6))


@pytest.mark.parametrize("bits,group,symmetric,k", [(8, None, True, 64), (8, 16, True, 64), (4, 16, True, 64),
                                                    (4, 32, False, 64), (4, None, True, 37), (4, 16, True, 40)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_is_reproduced_by_pack_and_beats_rtn(bits, group, symmetric, k, act_order):
    x = _inputs(512, k)
    w = torch.randn(20, k)
    q, scale, zero = gptq_quantize(w, _hessian(x), bits=bits, group_size=group, symmetric=symmetric,
                                   act_order=act_order)
    fmt = f"int{bits}"
    params = {"group_size": group} | ({} if bits == 8 else {"symmetric": symmetric})
    packed = si.pack(q, fmt, **params, scale=scale, **({} if zero is None else {"zero": zero.to(torch.uint8)}))
    assert torch.equal(packed.to_dense(), q)  # bit for bit
    rtn = si.pack(w, fmt, **params).to_dense()
    assert _err(x, w, q) < 0.9 * _err(x, w, rtn)


@pytest.mark.parametrize("fmt,group", [("2:4+int4", 16), ("2:4+int4", None), ("2:4+int8", None), ("1:4+int4", 8)])
def test_gptq_on_nm_survivors_keeps_the_mask_and_packs_exactly(fmt, group):
    torch.manual_seed(0)
    k = 64
    x = _inputs(512, k, seed=1)
    model = nn.Sequential(nn.Linear(k, 24))
    nm, _, vals = fmt.partition("+")
    recipe = {"default": f"{fmt}{'' if group is None else f'-g{group}'}",
              "methods": {"prune": "sparsegpt", "quantize": "gptq"}}
    # the contract with compress(): pack(t.weight, fmt, **params, **t.pack_kwargs) reproduces t.weight
    work = copy.deepcopy(model)  # the methods write their results into the model they calibrate
    targets = _targets(work, Recipe.from_any(recipe))
    for stage in ("sparsegpt", "gptq"):
        METHODS[stage].run(targets, [x], work)
    t = targets[0]
    assert set(t.pack_kwargs) == {"scale"}
    assert torch.equal(si.pack(t.weight, t.recipe.fmt, **t.recipe.params, **t.pack_kwargs).to_dense(), t.weight)
    c = si.compress(model, recipe, calib=[x], progress=False)
    dense = c[0].packed.to_dense()
    n, m = (int(v) for v in nm.split(":"))
    assert _nm_ok(dense, n, m)
    w = model[0].weight.detach()
    rtn = si.compress(model, fmt if group is None else f"{fmt}-g{group}", progress=False)[0].packed.to_dense()
    assert _err(x, w, dense) < _err(x, w, rtn)


def test_gptq_group_not_multiple_of_n_is_refused():
    with pytest.raises(ValueError, match="not a multiple of N=3"):
        si.compress(nn.Sequential(nn.Linear(64, 8)), {"default": "3:4+int4-g16", "methods": {"quantize": "gptq"}},
                    calib=[torch.randn(4, 64)], progress=False)


def test_gptq_refuses_csr_and_global_scope_is_refused_by_wanda():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="csr"):
        si.compress(model, {"default": "sparse50+int8", "methods": {"quantize": "gptq"}},
                    calib=[torch.randn(4, 64)], progress=False)
    with pytest.raises(ValueError, match="global"):
        si.compress(model, "wanda:sparse50-global", calib=[torch.randn(4, 64)], progress=False)


@pytest.mark.parametrize("recipe,baseline", [("wanda:2:4", "2:4"), ("sparsegpt:2:4", "2:4"),
                                             ("sparsegpt:sparse50", "sparse50"), ("gptq:int4-g16", "int4-g16"),
                                             ("gptq-act:int4-g16-asym", "int4-g16-asym"),
                                             ("sparsegpt:2:4+int8", "2:4+int8")])
def test_calibrated_recipes_beat_their_baselines_end_to_end(recipe, baseline):
    torch.manual_seed(0)
    k = 64
    model = nn.Sequential(nn.Linear(k, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():  # make the first layer's input outliers matter as they do in real models
        model[0].weight.mul_(torch.linspace(0.2, 1.0, k))
    calib = [_inputs(128, k, seed=s) for s in range(4)]
    x = _inputs(512, k, seed=9)
    with torch.no_grad():
        ref = model(x)
        err = lambda c: ((c(x) - ref).norm() / ref.norm()).item()  # noqa: E731
        good = si.compress(model, recipe, calib=calib, progress=False)
        base = si.compress(model, baseline, progress=False)
        assert err(good) < err(base), (err(good), err(base))
    if "2:4" in recipe:
        assert all(_nm_ok(layer.packed.to_dense(), 2, 4) for layer in (good[0], good[2]))
