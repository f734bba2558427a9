"""Attention over whole sequences (encoders, prompts) on sparseinfer's CPU kernel, ``_C.attention``.

On a CPU, torch's fused attention costs far more than its arithmetic at an encoder's sizes: MiniLM at
the demo's batch of 16 (16 x 12 heads x 46 x 46, a padding mask) spent 1.3-2.0 ms a layer in it, about
10 % of the dense forward, against 0.4-0.7 ms here (bench/README.md). The kernel takes q / k / v
as the strided views a model hands over (one joint q / k / v output needs no copy), gathers the keys
a padding mask leaves visible (padded keys cost nothing), and writes the [batch, rows, heads, head
size] layout the output projection reads.

Two ways in, one contract (``sdpa``: torch's ``scaled_dot_product_attention``):
- transformers models: ``install(model)`` registers ``attention`` with transformers' attention
  interface as "sparseinfer" and points a model that runs transformers' default ("sdpa") at it.
  ``si.compress`` and ``si.load`` call it; ``model.set_attn_implementation("sdpa")`` gives a model
  torch's attention back.
- loaded programs: ``use_in_program(gm)`` points the program's attention calls at ``sdpa``
  (``si.load`` does), so a model and its saved-and-loaded program compute the same bits.

What runs here: fp32 CPU tensors, no gradient, no dropout, no mask or a mask that hides the same keys
from every query row (padding), causal attention (top-left, as torch's is_causal), grouped-query
heads; under torch.compile too (one opaque op). Anything else (masks of other shapes, attention
weights asked for, soft-capping, sinks, position biases, torch.export) goes to torch / transformers
unchanged. The arithmetic is the decode step's (decode.h: its exp; float sums in another order than
ATen's): within ~1e-6 of torch's (tests/test_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _native
from ..backends.cpu_native import threads

NAME = "sparseinfer"

# kwargs transformers may pass that change the arithmetic: any of them set sends the call to its SDPA
# function. (Not sliding_window: SDPA takes a sliding window from the mask, as the kernel does: a window
# shorter than the sequence makes a mask that is not padding, which the kernel hands back.)
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def visible(mask: torch.Tensor) -> torch.Tensor | None:
    """The mask as uint8 for the kernel (nonzero: the key may be seen): a bool mask as it is, a float one
    (0 sees, a very negative value hides) when it holds nothing else; None for any other mask."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype.is_floating_point:
        hidden = mask <= torch.finfo(mask.dtype).min / 2
        if bool(((mask == 0) | hidden).all()):
            return (~hidden).view(torch.uint8)
    return None


def kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None, causal: bool, gqa: bool) -> torch.Tensor | None:
    """Attention [B, Lq, H, D] of query [B, H, Lq, D] over key / value [B or 1, Hkv, Lk, D] on the
    kernel, or None where it does not apply (the caller then runs torch's). Under torch.compile, one
    opaque ``sparseinfer::attention`` call (a compiled model computes eager's bits); under torch.export,
    None: the program records torch's op, which ``use_in_program`` points back here at load."""
    if (_native._C is None or not (query.dtype == key.dtype == value.dtype == torch.float32)
            or not (query.is_cpu and key.is_cpu and value.is_cpu)
            or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))):
        return None
    if torch.compiler.is_compiling():
        if torch.compiler.is_exporting():
            return None
        return torch.ops.sparseinfer.attention(query, key, value, mask, scale, causal, gqa)
    return _run(query, key, value, mask, scale, causal, gqa)


def _run(query, key, value, mask, scale, causal, gqa):
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        return None
    batch, heads, rows, dim = query.shape
    kv_batch, kv_heads, keys, kv_dim = key.shape
    if (kv_dim != dim or kv_batch not in (1, batch) or kv_heads < 1 or keys == 0
            or (heads != kv_heads and not (gqa and heads % kv_heads == 0))):
        return None
    if mask is not None:
        if causal:
            return None  # torch refuses both: let it say so
        mask = visible(mask)
        if mask is None or mask.dim() > 4:
            return None
        mask = mask[(None,) * (4 - mask.dim())]  # broadcast as torch does
        if (mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2] not in (1, rows)
                or mask.shape[3] != keys):
            return None
    if kv_batch != batch:
        key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(batch, rows, heads, dim)
    if not _native._C.attention(q, k, v, out, mask, dim ** -0.5 if scale is None else float(scale), causal, threads()):
        return None  # a mask that shows different keys to different rows
    return out


@torch.library.custom_op("sparseinfer::attention", mutates_args=())
def attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scale: float | None, causal: bool, gqa: bool) -> torch.Tensor:
    """``kernel`` for compiled graphs: [B, Lq, H, D], on torch's attention where the kernel does not apply."""
    out = _run(query, key, value, mask, scale, causal, gqa)
    if out is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=gqa).transpose(1, 2).contiguous()
    return out


@attention_op.register_fake
def _(query, key, value, mask, scale, causal, gqa):
    batch, heads, rows, dim = query.shape
    return query.new_empty(batch, rows, heads, dim)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention``, on the kernel where it applies."""
    out = None if dropout_p else kernel(query, key, value, attn_mask, scale, bool(is_causal), bool(enable_gqa))
    if out is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


def _transformers_sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs):
    """transformers' attention interface, as its SDPA function: query [B, H, Lq, D], key / value
    [B, Hkv, Lk, D] -> ([B, Lq, H, D], None)."""
    out = None
    if not ((dropout and module.training) or kwargs.get("output_attentions")
            or any(kwargs.get(k) is not None for k in _UNSUPPORTED)):
        rows = query.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(rows > 1 and attention_mask is None and causal)  # as transformers' SDPA function decides
        k, v = key, value
        if causal and k.shape[2] > rows:  # an empty static cache's prefill: its causal mask is top-left
            k, v = k[:, :, :rows], v[:, :, :rows]
        out = kernel(query, k, v, attention_mask, scaling, causal, gqa=True)
    if out is None:
        return _transformers_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)
    return out, None


def register() -> bool:
    """Registers ``attention`` with transformers as "sparseinfer" (with SDPA's masks); False where the
    installed transformers has no attention interface (before 4.48: its models call torch directly)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def install(model: nn.Module) -> bool:
    """Points a transformers model that runs "sdpa" attention (transformers' default) at the kernel;
    True if it did. Other models, and models that chose another attention, stay as they are."""
    config = getattr(model, "config", None)
    if (_native._C is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or not hasattr(model, "set_attn_implementation") or not register()):
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):  # a model class that takes no registered attention
        return False
    return config._attn_implementation == NAME


def describe(implementation: str) -> str:
    """What a transformers model whose config names ``implementation`` runs for attention (si.explain)."""
    if implementation == NAME:
        return ("sparseinfer's CPU kernel (fp32 CPU calls with no mask or a padding mask, causal or not; "
                "torch's SDPA for the rest); model.set_attn_implementation('sdpa') for torch's")
    return f"transformers' {implementation!r}"


def use_in_program(gm: torch.fx.GraphModule) -> int:
    """Points a loaded program's ``aten.scaled_dot_product_attention`` calls at ``sdpa``; returns how many."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.target = sdpa
            n += 1
    if n:
        gm.recompile()
    return n
