"""Attention over whole sequences on the CPU kernel (runtime/attention.py, _C.attention): against a
float64 reference on odd shapes, masks and strides, on every ISA; the masks it hands back to torch;
bad arguments; and the models si.compress / si.load give (transformers' interface, loaded programs,
torch.compile)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.runtime import attention

C = _native._C
pytestmark = pytest.mark.skipif(C is None, reason="the native CPU extension is not built")
ISAS = C.available_isas() if C is not None else []
# |kernel - float64| <= TOL * (mean |v| under the softmax weights): float scores and the decode step's
# exp give ~1e-6 there; a dropped or extra key moves an output by ~1 / (keys) of it.
TOL = 1e-5


def _reference(q, k, v, visible=None, causal=False, scale=None):
    """float64 attention [B, Lq, H, D] and its magnitude sum_t p_t |v_t| (the error scale), keys of
    head h from KV head h // (H / Hkv); visible: bool [B, Lk]."""
    q, k, v = q.double(), k.double(), v.double()
    heads, rows, dim = q.shape[1], q.shape[2], q.shape[3]
    k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * (dim ** -0.5 if scale is None else scale)
    seen = torch.ones(q.shape[0], 1, rows, k.shape[2], dtype=torch.bool)
    if visible is not None:
        seen = seen & visible[:, None, None, :]
    if causal:
        seen = seen & torch.ones(rows, k.shape[2], dtype=torch.bool).tril()
    p = s.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2), (p @ v.abs()).transpose(1, 2)


def _joint_qkv(batch, heads, kv_heads, rows, dim, gen):
    """q [B, H, L, D], k / v [B, Hkv, L, D] as views of one [B, L, (H + 2 Hkv) D] tensor (a joint q / k / v
    output): every stride but the last is not the contiguous one."""
    qkv = torch.randn(batch, rows, (heads + 2 * kv_heads) * dim, generator=gen)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    return tuple(t.view(batch, rows, -1, dim).transpose(1, 2) for t in (q, k, v))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch,heads,kv_heads,rows,dim", [
    (1, 1, 1, 1, 1), (2, 3, 3, 17, 5), (3, 6, 2, 46, 32), (1, 12, 12, 33, 32), (2, 4, 1, 130, 64), (1, 2, 2, 9, 80)])
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
def test_kernel_matches_float64(isa, batch, heads, kv_heads, rows, dim, masking):
    gen = torch.Generator().manual_seed(rows * dim + heads)
    q, k, v = _joint_qkv(batch, heads, kv_heads, rows, dim, gen)
    visible = None
    if masking == "padding":  # batch row b sees its first rows - 3b keys (at least one), the last row every other
        lengths = torch.tensor([max(1, rows - 3 * b) for b in range(batch)])
        visible = torch.arange(rows)[None] < lengths[:, None]
        if batch > 1:
            visible[-1] = torch.arange(rows) % 2 == 1
    mask = None if visible is None else visible[:, None, None, :].expand(batch, 1, rows, rows)  # stride-0 rows
    out = torch.full((batch, rows, heads, dim), float("nan"))
    done = C.attention(q, k, v, out, None if mask is None else mask.view(torch.uint8), dim ** -0.5,
                       masking == "causal", 2, isa)
    want, magnitude = _reference(q, k, v, visible, masking == "causal")
    assert done and not out.isnan().any()
    err = ((out.double() - want).abs() / (magnitude + 1e-30)).max().item()
    assert err < TOL, f"{isa}: error {err:.2e} of the output's magnitude"


def test_every_isa_and_thread_count_gives_one_set_of_bits_per_isa():
    """Row blocks and their split over threads do not change a row's arithmetic; a row that sees no
    key (causal row 0 whose key 0 is padding) reads zeros."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = _joint_qkv(2, 4, 2, 70, 16, gen)
    visible = torch.ones(2, 70, dtype=torch.bool)
    visible[1, ::3] = False  # key 0 hidden from batch row 1
    mask = visible[:, None, None, :].view(torch.uint8)
    for isa in ISAS:
        runs = []
        for threads in (1, 2, 3):
            out = torch.full((2, 70, 4, 16), float("nan"))
            assert C.attention(q, k, v, out, mask, 0.25, True, threads, isa)
            runs.append(out)
        assert all(torch.equal(runs[0], r) for r in runs[1:]), isa
        assert torch.equal(runs[0][1, 0], torch.zeros(4, 16))
        want, magnitude = _reference(q, k, v, visible, causal=True, scale=0.25)
        assert (((runs[0].double() - want).abs() / (magnitude + 1e-30))[:, 1:].max() < TOL), isa


@pytest.mark.parametrize("isa", ISAS)
def test_large_logits_give_zero_weights_not_garbage(isa):
    """Scores spread over thousands (the exp's floor, e^-80, stands for 0): no NaN or inf, and the worst
    error within twice torch's own fp32 one (float scores of magnitude ~1000 carry ~1e-4) plus TOL."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = _joint_qkv(2, 3, 3, 40, 16, gen)
    q = q * 50
    out = torch.full((2, 40, 3, 16), float("nan"))
    assert C.attention(q, k, v, out, None, 0.25, False, 2, isa)
    want, magnitude = _reference(q, k, v, scale=0.25)
    torchs = F.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    torch_err = ((torchs.double() - want).abs() / (magnitude + 1e-30)).max()
    err = ((out.double() - want).abs() / (magnitude + 1e-30)).max()
    assert torch.isfinite(out).all() and err <= 2 * torch_err + TOL, (err, torch_err)


def test_a_mask_that_is_not_padding_goes_back_to_torch():
    """Rows that see different keys (a sliding window, a block mask): _C.attention leaves out alone and
    says so; sdpa() then gives torch's own result, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = _joint_qkv(2, 2, 2, 12, 8, gen)
    window = torch.ones(12, 12, dtype=torch.bool).tril().triu(-3)
    out = torch.full((2, 12, 2, 8), float("nan"))
    assert not C.attention(q, k, v, out, window[None, None].view(torch.uint8), 0.3, False, 1)
    assert out.isnan().all()
    assert torch.equal(attention.sdpa(q, k, v, attn_mask=window), F.scaled_dot_product_attention(q, k, v, attn_mask=window))
    additive = torch.zeros(2, 1, 12, 12).masked_fill(~window, -1e9)  # very negative, but neither 0 nor hidden
    additive[0, 0, 0, 0] = 0.5  # a bias: not a mask the kernel takes
    assert torch.equal(attention.sdpa(q, k, v, attn_mask=additive),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=additive))


@pytest.mark.parametrize("kind", ["bool", "float", "2-D bool"])
def test_sdpa_takes_torchs_masks_and_layouts(kind):
    """sdpa(): torch's contract ([B, H, Lq, D] out, masks broadcast, float masks of 0 / finfo.min)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = _joint_qkv(3, 4, 4, 20, 16, gen)
    visible = torch.arange(20)[None] < torch.tensor([20, 7, 1])[:, None]
    mask = visible[:, None, None, :]
    if kind == "float":
        mask = torch.zeros(3, 1, 1, 20).masked_fill(~mask, torch.finfo(torch.float32).min)
    elif kind == "2-D bool":
        visible = visible[:1].expand(3, 20)
        mask = visible[0][None].expand(20, 20)  # [Lq, Lk]
    got = attention.sdpa(q, k, v, attn_mask=mask)
    want, magnitude = _reference(q, k, v, visible)
    assert got.shape == (3, 4, 20, 16)
    assert ((got.transpose(1, 2).double() - want).abs() / (magnitude + 1e-30)).max() < TOL


def test_what_the_kernel_does_not_take_runs_on_torch():
    gen = torch.Generator().manual_seed(6)
    q, k, v = _joint_qkv(1, 2, 2, 6, 8, gen)
    assert attention.kernel(q.double(), k.double(), v.double(), None, None, False, False) is None
    assert attention.kernel(q, k[:, :1], v[:, :1], None, None, False, gqa=False) is None  # GQA not asked for
    leaf = q.detach().requires_grad_()
    y = attention.sdpa(leaf, k, v)
    y.sum().backward()  # torch's op, with its gradient
    assert leaf.grad is not None and torch.equal(y, F.scaled_dot_product_attention(leaf, k, v))
    torch.manual_seed(0)
    a = attention.sdpa(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(a, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))


def test_bad_arguments_are_refused_with_their_names():
    q = torch.randn(1, 2, 5, 8)
    out = torch.empty(1, 5, 2, 8)
    with pytest.raises(ValueError, match="q must have dtype float32"):
        C.attention(q.double(), q, q, out)
    with pytest.raises(ValueError, match="unit stride along its last dim"):
        C.attention(torch.randn(1, 2, 5, 16)[..., ::2], q, q, out)
    with pytest.raises(ValueError, match="multiple of k's 3"):
        C.attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), out)
    with pytest.raises(ValueError, match="at least one head"):
        C.attention(torch.randn(1, 0, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.empty(1, 5, 0, 8))
    with pytest.raises(ValueError, match="v must have shape"):
        C.attention(q, q, torch.randn(1, 2, 4, 8), out)
    with pytest.raises(ValueError, match="out must have shape"):
        C.attention(q, q, q, torch.empty(1, 2, 5, 8))
    with pytest.raises(ValueError, match="out must be contiguous"):
        C.attention(q, q, q, torch.empty(1, 2, 5, 8).transpose(1, 2))
    with pytest.raises(ValueError, match="out must not overlap q"):
        C.attention(q, q, q, q.view(1, 5, 2, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        C.attention(q, q, q, out, torch.ones(1, 1, 5, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mask must have dtype uint8"):
        C.attention(q, q, q, out, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale must be a finite float"):
        C.attention(q, q, q, out, None, float("nan"))
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        C.attention(q, q, q, out, None, 1.0, False, 0)
    with pytest.raises(ValueError, match="unknown isa"):
        C.attention(q, q, q, out, None, 1.0, False, 1, "sse9")


def _bert():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _batch():
    ids = torch.randint(5, 120, (3, 21), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_compress_runs_a_transformers_models_attention_on_the_kernel(monkeypatch):
    dense = _bert()
    assert dense.config._attn_implementation == "sdpa"
    model = si.compress(dense, "int8", progress=False)
    assert model.config._attn_implementation == attention.NAME and dense.config._attn_implementation == "sdpa"
    calls = []
    run = C.attention
    monkeypatch.setattr(C, "attention", lambda *a, **kw: calls.append(a[0].shape) or run(*a, **kw))
    x = _batch()
    with torch.inference_mode():
        ours = model(**x).last_hidden_state
        assert len(calls) == 2  # one per layer, padding mask and all
        model.set_attn_implementation("sdpa")  # torch's attention back
        torchs = model(**x).last_hidden_state
    assert len(calls) == 2
    real = x["attention_mask"].bool()
    assert (ours - torchs)[real].abs().max() < 1e-5 * torchs.abs().max()


def test_a_saved_model_loads_with_the_same_attention(tmp_path):
    """The exported program records torch's op; load points it at the kernel: the loaded program's
    outputs are the in-memory model's bit for bit."""
    model = si.compress(_bert(), "2:4", progress=False)
    x = _batch()
    si.save(model, tmp_path / "m.sinf", (x["input_ids"], x["attention_mask"]))
    loaded = si.load(tmp_path / "m.sinf")
    assert sum(node.target is attention.sdpa for node in loaded.graph.nodes) == 2
    with torch.inference_mode():
        a = model(**x).last_hidden_state
        b = loaded(x["input_ids"], x["attention_mask"])
    b = b["last_hidden_state"] if isinstance(b, dict) else b[0]
    assert torch.equal(a, b)


def test_a_compiled_model_computes_eagers_bits():
    """Under torch.compile the attention is one opaque sparseinfer::attention op on the kernel."""
    from sparseinfer.runtime.modules import prepare_compile

    model = si.compress(_bert(), "int8", progress=False)
    x = _batch()
    with torch.no_grad():
        eager = model(**x).last_hidden_state
        torch._dynamo.reset()
        try:
            compiled = torch.compile(prepare_compile(model), backend="aot_eager", dynamic=False)(**x).last_hidden_state
        finally:
            torch._dynamo.reset()
    assert torch.equal(eager, compiled)


def test_explain_says_which_attention_runs():
    model = si.compress(_bert(), "int8", progress=False)
    assert any(n.startswith("attention: sparseinfer's CPU kernel") for n in si.explain(model).notes)
    model.set_attn_implementation("sdpa")
    assert "attention: transformers' 'sdpa'" in si.explain(model).notes
