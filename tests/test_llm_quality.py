"""LLM-scale compression: text calibration, padding, true-sequential order, the joint SparseGPT+GPTQ
sweep, and recovery by distillation (resume, DDP) -- on tiny random Llamas."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparseinfer as si
from sparseinfer.formats import pack
from sparseinfer.passes.calibration import calibrate, collect_stats, text_batches
from sparseinfer.passes.gptq import gptq_quantize
from sparseinfer.passes.pipeline import targets as _targets
from sparseinfer.passes.sparsegpt import sparsegpt_prune
from sparseinfer.recipe import Recipe

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """The part of a Hugging Face tokenizer calibration uses: __call__(text, return_tensors="pt")."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}


def batches(count=4, rows=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (rows, length), generator=g),
             "attention_mask": torch.ones(rows, length, dtype=torch.long)} for _ in range(count)]


TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "Sparse weights, quantized values; " * 4]


def _packed(model):
    return {n: m.packed for n, m in model.named_modules() if isinstance(m, si.CompressedLinear)}


# -- calibration ------------------------------------------------------------------------------

def test_text_calibration_windows_and_compress_with_tokenizer(tmp_path):
    tok = CharTokenizer()
    wins = text_batches(TEXT, tok, seq_len=32)
    total = len("\n\n".join(TEXT))
    assert [w["input_ids"].shape[1] for w in wins] == [32] * (total // 32) + ([total % 32] if total % 32 else [])
    assert all(w["attention_mask"].all() for w in wins)
    model = tiny_llama()
    by_text = si.compress(model, "gptq:int4-g32", calib=TEXT, tokenizer=tok, progress=False)
    by_batches = si.compress(model, "gptq:int4-g32", calib=text_batches(TEXT, tok, seq_len=512), progress=False)
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(TEXT))
    by_file = si.compress(model, "gptq:int4-g32", calib=str(path), tokenizer=tok, progress=False)
    for name, w in _packed(by_text).items():
        assert w.equal(_packed(by_batches)[name]) and w.equal(_packed(by_file)[name])
    with pytest.raises(ValueError, match="tokenizer"):
        si.compress(model, "gptq:int4", calib=TEXT, progress=False)
    with pytest.raises(ValueError, match="not a file"):
        si.compress(model, "gptq:int4", calib="no/such/file.txt", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="tokenizer= is for calibration text"):
        si.compress(model, "gptq:int4", calib=batches(1), tokenizer=tok, progress=False)


def test_padding_is_never_counted():
    """A right-padded batch gives the statistics of its sequences run unpadded, whole-model and
    block by block (the padded rows are dropped)."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 20), generator=g), torch.randint(0, VOCAB, (1, 12), generator=g)
    padded = {"input_ids": torch.cat([a, torch.cat([b, torch.zeros(1, 8, dtype=torch.long)], 1)]),
              "attention_mask": torch.tensor([[1] * 20, [1] * 12 + [0] * 8])}
    separate = [{"input_ids": a}, {"input_ids": b}]
    targets = _targets(model, Recipe.from_any("2:4"))
    s_pad = collect_stats(model, targets, [padded], gram=True)
    s_sep = collect_stats(model, targets, separate, gram=True)
    for name in s_pad:
        assert s_pad[name].rows == 32
        torch.testing.assert_close(s_pad[name].gram, s_sep[name].gram, rtol=1e-4, atol=1e-4)

    def recorder(seen):
        def process(group, stats):
            seen.update({n: (s.rows, s.gram.clone()) for n, s in stats.items()})
        return process

    blockwise_pad, blockwise_sep = {}, {}
    calibrate(model, targets, [padded], recorder(blockwise_pad), gram=True)
    calibrate(model, targets, separate, recorder(blockwise_sep), gram=True)
    assert blockwise_pad.keys() == blockwise_sep.keys() and len(blockwise_pad) == len(targets)
    for name, (rows, gram) in blockwise_pad.items():
        assert rows == 32
        torch.testing.assert_close(gram, blockwise_sep[name][1], rtol=1e-4, atol=1e-4)


def test_true_sequential_groups_and_order():
    """q/k/v, then o, then gate/up, then down; o_proj is calibrated on the output of the compressed
    q/k/v (here: weights halved by the 'method')."""
    model = tiny_llama(layers=2)
    targets = _targets(model, Recipe.from_any("2:4"))
    calib = batches(2)
    order = []

    def halve(group, stats):
        order.append(sorted(t.name.rsplit(".", 1)[1] for t in group if ".layers.0." in t.name))
        for t in group:
            t.weight = t.weight * 0.5
            if t.name == "model.layers.0.self_attn.o_proj":
                got.append(stats[t.name].hessian())

    got = []
    calibrate(model, copy.copy(targets), calib, halve, gram=True, sequential=True)
    assert order[:4] == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    reference = tiny_llama(layers=2)
    attn = reference.model.layers[0].self_attn
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight.mul_(0.5)
    ref_targets = [t for t in _targets(reference, Recipe.from_any("2:4")) if t.name.endswith("layers.0.self_attn.o_proj")]
    expected = collect_stats(reference, ref_targets, calib, gram=True)[ref_targets[0].name].hessian()
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5)


# -- the joint sweep -------------------------------------------------------------------------

def test_joint_nm_int4_sweep_is_nm_packs_exactly_and_matches_two_passes():
    torch.manual_seed(0)
    k, rows = 96, 24
    mix = torch.randn(k, k) / k ** 0.5 + torch.eye(k)
    x = torch.randn(512, k) @ mix  # correlated inputs, as real activations are
    h = 2 / x.shape[0] * (x.T @ x).double()
    w = torch.randn(rows, k)
    q, scale, zero = gptq_quantize(w, h, bits=4, group_size=32, prune_nm=(2, 4))  # 16 kept values per group
    assert zero is None and scale.shape == (rows, k // 32)
    assert ((q.reshape(rows, -1, 4) != 0).sum(-1) <= 2).all()
    packed = pack(q, "2:4+int4", group_size=16, scale=scale)
    assert torch.equal(packed.to_dense(), q)
    pruned = sparsegpt_prune(w, h, n=2, m=4)
    two, _, _ = gptq_quantize(pruned, h, bits=4, group_size=32, keep=pruned != 0)
    err = lambda v: ((x @ (w - v).T) ** 2).sum().item()  # noqa: E731
    rtn = pack(w, "2:4+int4", group_size=16).to_dense()
    assert err(q) < 0.8 * err(rtn)
    assert err(q) < 1.1 * err(two)
    # act-order over whole groups of M: static value groups, still packs exactly, N:M holds
    qa, scale_a, _ = gptq_quantize(w, h, bits=4, group_size=32, prune_nm=(2, 4), act_order=True)
    assert ((qa.reshape(rows, -1, 4) != 0).sum(-1) <= 2).all()
    assert torch.equal(pack(qa, "2:4+int4", group_size=16, scale=scale_a).to_dense(), qa)
    assert err(qa) < 0.8 * err(rtn)
    with pytest.raises(ValueError, match="excludes keep"):
        gptq_quantize(w, h, bits=4, prune_nm=(2, 4), keep=w != 0)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        gptq_quantize(w[:, :94], h[:94, :94], bits=4, prune_nm=(2, 4), act_order=True)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_scale_search_weighs_columns_by_their_input_energy(monkeypatch, act_order):
    # an outlier input channel whose weights are the largest of their group: a plain weight-space
    # range search clips them (cheap in |w - q|, costly in the output); weighted by diag(H) it does not
    import sparseinfer.passes.gptq as gptq_mod

    torch.manual_seed(0)
    k, rows = 128, 32

    def inputs():
        x = torch.randn(1024, k) @ (torch.randn(k, k) / k ** 0.5 + torch.eye(k))
        x[:, 7] *= 30
        return x

    x, held = inputs(), inputs()
    w = torch.randn(rows, k) * 0.02
    w[:, 7] *= 4
    w[::3, 40] = 0.15
    h = 2 / x.shape[0] * (x.T @ x).double()
    err = lambda q: ((held @ (w - q).T) ** 2).sum().item()
    q, scale, _ = gptq_quantize(w, h, bits=4, group_size=64, act_order=act_order)
    assert torch.equal(pack(q, "int4", group_size=64, scale=scale).to_dense(), q)
    unclipped, _, _ = gptq_quantize(w, h, bits=4, group_size=64, act_order=act_order, clip=False)
    real = gptq_mod._group_params
    monkeypatch.setattr(gptq_mod, "_group_params", lambda v, b, s, c=True, cw=None: real(v, b, s, c, None))
    unweighted, _, _ = gptq_quantize(w, h, bits=4, group_size=64, act_order=act_order)
    assert err(q) < 0.5 * err(unweighted), (err(q), err(unweighted))
    assert err(q) < err(unclipped), (err(q), err(unclipped))


def test_inverse_hessian_diag_only_is_the_factors_diagonal():
    # the joint act-order sweep scores the original weights with diag(U) only: it must be the
    # diagonal of the full factor, with the same dead columns, also for an ill-conditioned H
    from sparseinfer.passes.obs import inverse_hessian_cholesky

    torch.manual_seed(0)
    x = torch.randn(40, 48) @ (torch.randn(48, 48) / 7 + torch.eye(48))
    x[:, 5] = 0  # a dead column
    for h, damp in ((x.T @ x).double(), 0.01), ((x[:8].T @ x[:8]).double(), 1e-9):  # the second of rank 8
        upper, dead = inverse_hessian_cholesky(h, damp)
        d, dead_d = inverse_hessian_cholesky(h, damp, diag_only=True)
        assert d.shape == (48,) and torch.equal(dead, dead_d) and bool(dead[5])
        assert torch.allclose(d, torch.diagonal(upper), rtol=1e-6, atol=0), (d - torch.diagonal(upper)).abs().max()


@pytest.mark.parametrize("method", ["gptq", "gptq-act", "gptq-cols"])
def test_joint_recipe_runs_one_sweep(monkeypatch, method):
    import sparseinfer.passes.gptq as gptq_mod

    calls = []
    real = gptq_mod.gptq_quantize
    monkeypatch.setattr(gptq_mod, "gptq_quantize",
                        lambda *a, **kw: calls.append((kw.get("prune_nm"), kw.get("act_order"))) or real(*a, **kw))
    model = tiny_llama()
    recipe = {"default": "2:4+int4-g16", "methods": {"prune": "sparsegpt", "quantize": method}}
    out = si.compress(model, recipe, calib=batches(2), progress=False)
    # 7 linears x 2 layers, each once, jointly (act-order unless gptq-cols)
    assert len(calls) == 14 and set(calls) == {((2, 4), method != "gptq-cols")}
    for w in _packed(out).values():
        assert w.fmt == "2:4+int4"


# -- recovery ---------------------------------------------------------------------------------

def _kl(student, teacher, data):
    from sparseinfer.training.recover import kl_loss

    with torch.no_grad():
        return sum(kl_loss(student(**b).logits, teacher(**b).logits, b["attention_mask"], 1.0).item() for b in data)


def test_recover_keeps_masks_and_grids_and_lowers_kl():
    teacher = tiny_llama()
    data = batches(4)
    packed = si.compress(teacher, "2:4+int4-g16", progress=False)
    before = _kl(packed, teacher, data)
    res = si.recover(packed, teacher, data, steps=12, lr=1e-3, hidden_weight=0.5, log_every=4, progress=False)
    assert [r["step"] for r in res.history] == [4, 8, 12] and {"loss", "kl", "hidden"} <= set(res.history[0])
    assert _kl(res.model, teacher, data) < 0.5 * before
    old, new = _packed(packed), _packed(res.model)
    assert old.keys() == new.keys()
    changed = 0
    for name, w in old.items():
        a, b = w.tensors(), new[name].tensors()
        assert new[name].fmt == w.fmt and new[name].params() == w.params()
        for key in a:
            if key.endswith(("scale", "zero")):
                assert torch.equal(a[key], b[key]), (name, key)
        da, db = w.to_dense(), new[name].to_dense()
        assert not ((db != 0) & (da == 0)).any()  # the mask holds
        changed += int(not torch.equal(da, db))
    assert changed == len(old)
    # the input model is untouched (recover copies unless inplace)
    assert all(w.equal(_packed(packed)[n]) for n, w in old.items())


def test_recover_pruned_float_model_and_as_a_stage():
    teacher = tiny_llama()
    data = batches(4)
    pruned = si.prune(teacher, "2:4")
    zeros = {n: m.weight == 0 for n, m in pruned.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    res = si.recover(pruned, teacher, data, steps=3, lr=1e-3, progress=False)
    for n, m in res.model.named_modules():
        if n in zeros:
            assert (m.weight[zeros[n]] == 0).all() and not torch.nn.utils.parametrize.is_parametrized(m)
    out = si.run_stages(teacher, [{"prune": "2:4"}, {"compress": "2:4"}, {"recover": {"steps": 2, "lr": 1e-3}}],
                        loader=data)
    assert out.metrics[-1]["action"] == "recover" and len(_packed(out.model)) == 14
    with pytest.raises(ValueError, match="no compressed"):
        si.recover(teacher, teacher, data, steps=1)


def test_recover_resumes_from_checkpoint_exactly(tmp_path):
    teacher = tiny_llama()
    data = batches(4)
    packed = si.compress(teacher, "2:4", progress=False)
    kw = {"lr": 2e-3, "hidden_weight": 1.0, "progress": False}
    straight = si.recover(packed, teacher, data, steps=4, **kw)
    ckpt = tmp_path / "recover.safetensors"
    si.recover(packed, teacher, data, steps=2, checkpoint=ckpt, checkpoint_every=1, **kw)
    with open(ckpt, "rb") as f:
        assert b"pickle" not in f.read(64) and ckpt.stat().st_size > 0
    resumed = si.recover(packed, teacher, data, steps=4, checkpoint=ckpt, **kw)
    assert resumed.resumed_from == 2
    for name, w in _packed(straight.model).items():
        assert torch.equal(w.to_dense(), _packed(resumed.model)[name].to_dense()), name
    with pytest.raises(ValueError, match="other settings"):
        si.recover(packed, teacher, data, steps=4, checkpoint=ckpt, lr=1e-3, progress=False)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_llm_quality import tiny_llama, batches, _packed
    import sparseinfer as si
    from safetensors.torch import save_file
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    teacher = tiny_llama()
    packed = si.compress(teacher, "2:4", progress=False)
    res = si.recover(packed, teacher, batches(4), steps=3, accumulate=2, lr=2e-3, hidden_weight=1.0, progress=False)
    if dist.get_rank() == 0:
        save_file({{n: w.to_dense() for n, w in _packed(res.model).items()}}, {out!r})
    dist.destroy_process_group()
""")


def test_recover_under_ddp_matches_one_process(tmp_path):
    """2 processes on gloo (torchrun) compute the steps of one process with the same accumulate."""
    from safetensors.torch import load_file

    out = tmp_path / "ddp.safetensors"
    script = tmp_path / "ddp_recover.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = tiny_llama()
    packed = si.compress(teacher, "2:4", progress=False)
    single = si.recover(packed, teacher, batches(4), steps=3, accumulate=2, lr=2e-3, hidden_weight=1.0,
                        progress=False)
    ddp = load_file(str(out))
    start = _packed(packed)
    for name, w in _packed(single.model).items():
        assert not torch.equal(w.to_dense(), start[name].to_dense())  # it trained
        torch.testing.assert_close(ddp[name], w.to_dense(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt, params", [("int8", {}), ("int4", {"group_size": 16}), ("int4", {"group_size": None}),
                                         ("int4", {"group_size": 16, "symmetric": False}),
                                         ("2:4+int4", {"group_size": 16}), ("2:4+int8", {}),
                                         ("1:3+int4", {"group_size": 8, "symmetric": False})])
def test_recover_value_grid_is_pack_exactly(fmt, params):
    """The fast projection recover trains through equals pack(w, fmt, scale=...).to_dense() of the
    masked weight, on odd shapes (K not a multiple of the group or of M) and on moved weights."""
    from sparseinfer.training.recover import FixedGrid, _fixed_tensors, _ValueGrid

    g = torch.Generator().manual_seed(3)
    for rows, k in [(1, 45), (3, 33), (17, 64)]:
        packed = pack(torch.randn(rows, k, generator=g), fmt, **params)
        dense = packed.to_dense()
        keep = dense != 0 if packed.kind == "nm" else None
        fixed = _fixed_tensors(packed)
        fast = FixedGrid(fmt, packed.params(), fixed, keep, _ValueGrid(packed, dense != 0))
        assert _ValueGrid.handles(packed)
        for step in (0.0, 0.05, 0.3):
            w = dense + step * torch.randn(dense.shape, generator=g)
            want = pack(w * keep if keep is not None else w, fmt, **packed.params(), **fixed).to_dense()
            assert torch.equal(fast.project(w), want), (fmt, rows, k, step)
