"""A lean batch-1 forward for Llama-family causal LMs (transformers' Llama and Mistral), on the model's
own modules.

transformers' forward spends more on each decode step than the compressed layers do: on SmolLM2-135M
(30 layers) ~7 ms of Python and small ATen ops per token (cache objects, mask construction, rotary
per step, output dataclasses, kwargs plumbing) beside the kernels. ``LeanLlama`` runs the same
computation with only the math left:

- RMSNorm as transformers writes it (the same ops, so the same numbers);
- rotary cos / sin computed once for every position of the generation by the model's own rotary
  module (so every rope type it implements without per-call state -- default, linear, llama3 --
  gives transformers' values), and ``rotate_half(x) * sin`` as ``swap_halves(x) * sin_signed``
  (the sign moved into the table: the same products);
- a static KV cache [layers, kv_heads, prompt + max_new_tokens, head_dim] written in place;
- attention through ``scaled_dot_product_attention`` (or, where the model runs it, sparseinfer's
  kernel: runtime/attention.py) called as transformers' attention calls it (``enable_gqa``, causal
  for the prompt, no mask), over views of the cache: no repeat of K / V;
- the q / k / v and gate / up projections as one call where runtime/fused.py joined them, every
  compressed layer through its memoised direct kernel call (``CompressedLinear.run``), dense layers
  through ``F.linear``; for decode steps those calls are bound once (``_bind``: the memo lookups cost
  ~3-8 us a call, ~0.8 ms of a SmolLM2 step) and bound again when the thread count, the activation
  mode or the routes change;
- the LM head on the last position only.

It reads the weights in place (nothing copied), so a compressed model decodes through the same
kernels as under transformers' forward, and every op it runs is an op transformers runs on the same
values: the logits are transformers' bit for bit (also with int8 activations, where one differing
bit can become another token a few steps later). ``unsupported(model)`` says why a model cannot run
here (``sparseinfer.llm.greedy`` then uses transformers' forward). tests/test_llm.py checks the
logits of every step and the greedy tokens against transformers' forward (default and llama3 rope,
GQA and MHA, tied and untied heads, attention bias, dense and compressed layers, exact and int8
activations; Mistral inside and past its sliding window). Qwen2 and other relatives are not run here
(not tested: Qwen2's per-layer sliding-window types, Gemma's norms and scaled embeddings differ).
Per-token time saved on SmolLM2: bench/README.md, "Causal LMs".

Native steps (``steps="native"`` or ``"auto"``; ``sparseinfer.llm.greedy``'s default). Even so, the
Python steps spend more than their kernels: a SmolLM2 int4 step took 6.5 ms, 2.9 ms of it in kernel
calls, the rest ~25 small ATen ops and their Python per layer. For a float32 model whose every
projection is a packed kernel call at one row or an fp32 matrix (a dense layer, or the fp32 copy a
dense-routed packed layer keeps), a decode step is one call of ``_C.Decoder``: the same kernels with
the same activation modes through the C++ driver, the fp32 matrices through a vectorized GEMV, and
the glue between them (RMSNorm, rotary, the cache write, attention over the cache, SiLU gate,
residuals) in a few vectorized loops (csrc/include/sparseinfer/decode.h). That glue rounds in its
own order, so the logits are the Python steps' within float rounding, not bit for bit
(tests/test_llm.py bounds the difference); with int8
activations a last-bit change can become another quantization code and, rarely, another greedy token
later on. The prompt always runs the Python path. ``steps="python"`` (``greedy(decoder="lean")``)
keeps transformers' numbers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import _native
from .act import default_act
from .backends import generation
from .backends.cpu_native import threads
from .runtime import attention
from .runtime.modules import CompressedLinear

# rope types whose inv_freq the rotary module fixes at construction (no per-sequence-length update)
ROPE_TYPES = ("default", "linear", "llama3")
# how decode steps run: "python" (transformers' ops, its logits bit for bit), "native" (one C++ call per
# step, _C.Decoder; ValueError where it cannot run), "auto" (native where it can run, else python)
STEP_MODES = ("auto", "native", "python")
# The KV cache's precision: "model" (the model's dtype) or "fp16" (IEEE half: half the bytes a step reads
# from a long context's cache, each key / value rounded to 11 significant bits once, as llama.cpp's
# default cache does; a key or value beyond fp16's +-65504 would become inf; attention itself runs in
# the model's dtype).
KV_CACHES = ("model", "fp16")


def _classes() -> tuple:
    """transformers' causal LM classes whose forward is the one LeanLlama computes: Llama, and Mistral
    (Llama's layers plus a sliding window, which changes nothing while the sequence fits in it)."""
    from transformers import LlamaForCausalLM, MistralForCausalLM

    return LlamaForCausalLM, MistralForCausalLM


def unsupported(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why ``LeanLlama`` cannot run ``model`` for sequences of up to ``max_len`` positions (None:
    unknown, any length), or None when it can."""
    try:
        classes = _classes()
    except ImportError:
        return "transformers is not installed"
    if type(model) not in classes:
        return f"{type(model).__name__} is not one of transformers' {', '.join(c.__name__ for c in classes)}"
    if "forward" in vars(model):
        return "the model's forward was replaced on the instance (e.g. torch.compile)"
    cfg, base = model.config, model.model
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (max_len is None or max_len > window):
        return f"sliding window {window} is shorter than the sequence ({max_len or 'any length'})"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not 'silu'"
    rope = getattr(base.rotary_emb, "rope_type", None)
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r} is not one of {ROPE_TYPES}"
    if len(base.layers) < cfg.num_hidden_layers:
        return "fewer layers than config.num_hidden_layers"
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"module {name or 'model'} has forward hooks (e.g. accelerate's device map)"
    for layer in base.layers[:cfg.num_hidden_layers]:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not isinstance(m, (nn.Linear, CompressedLinear)):
                return f"a projection is a {type(m).__name__}, not nn.Linear / CompressedLinear"
    if not isinstance(model.lm_head, (nn.Linear, CompressedLinear)):
        return f"the LM head is a {type(model.lm_head).__name__}"
    return None


def _linear(m: nn.Module):
    """The call that computes ``m(x)`` with the least on the way: a compressed layer's memoised
    direct kernel call (``run``, which skips a shared-input group's bookkeeping), ``F.linear`` on a
    dense one."""
    if isinstance(m, CompressedLinear):
        return m.run
    weight, bias = m.weight, m.bias
    return lambda x: F.linear(x, weight, bias)


def _own_group(members: list[nn.Module]):
    """The shared-input group (runtime/fused.py) that ``members`` form, in this order, or None."""
    group = getattr(members[0], "_group", None)
    if group is not None and len(group.members) == len(members) and all(a is b for a, b in zip(group.members, members)):
        return group
    return None


def _side_by_side(calls):
    return lambda x: torch.cat([c(x) for c in calls], dim=-1)


def _joint(members: list[nn.Module]):
    """One call giving the outputs of ``members`` (layers reading one input) side by side: their
    shared-input group's (runtime/fused.py: one packed call where it runs jointly) when they form
    one in this order, else each layer's call and a concatenation."""
    group = _own_group(members)
    if group is not None:
        return group.run
    return _side_by_side([_linear(m) for m in members])


def _bind(m: nn.Module, x: torch.Tensor):
    """``m``'s call for inputs like ``x`` with the lookups done now: a compressed layer's direct
    kernel call (its ``plan``), else ``_linear(m)``."""
    if isinstance(m, CompressedLinear):
        call = m.plan(x)
        if call is not None:
            bias = m.bias
            return lambda x: call(x, bias)
    return _linear(m)


def _bind_joint(members: list[nn.Module], x: torch.Tensor):
    """``_joint(members)`` for inputs like ``x`` with the lookups done now."""
    group = _own_group(members)
    if group is not None and group.runs_jointly(x):
        return _bind(group.joint, x)
    return _side_by_side([_bind(m, x) for m in members])


class _Layer:
    """One decoder layer's weights and calls, looked up once."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.modules = ([attn.q_proj, attn.k_proj, attn.v_proj], attn.o_proj, [mlp.gate_proj, mlp.up_proj], mlp.down_proj)
        self.qkv = _joint(self.modules[0])
        self.o = _linear(attn.o_proj)
        self.gate_up = _joint(self.modules[2])
        self.down = _linear(mlp.down_proj)
        self.intermediate = mlp.gate_proj.out_features

    def bound(self, x: torch.Tensor, attn_out: torch.Tensor, act: torch.Tensor) -> _Layer:
        """A copy whose calls are bound for inputs like ``x`` (qkv, gate_up), ``attn_out`` (o), ``act`` (down)."""
        b = copy.copy(self)
        qkv, o, gate_up, down = self.modules
        b.qkv, b.o, b.gate_up, b.down = _bind_joint(qkv, x), _bind(o, attn_out), _bind_joint(gate_up, x), _bind(down, act)
        return b


def _kernel_args(m: nn.Module, x: torch.Tensor) -> tuple | None:
    """The projection ``_C.Decoder`` runs for ``m`` on inputs like ``x``: (Weight, bias, act, kernel)
    with which its direct call runs ``_C.linear`` (backends/cpu.py, ``kernel_args``), (fp32 matrix,
    bias, None, None) for a dense layer, or (fp32 copy, bias, None, None, Weight) for a dense-routed
    one that keeps an fp32 copy of its packed Weight (cpu_routes.dense_call); None where neither
    holds (another backend, a dense route that dequantizes tiles per call, a weight of another
    dtype)."""
    bias = None if m.bias is None else m.bias.detach().to(torch.float32).contiguous()
    if isinstance(m, nn.Linear):  # the parameter itself: the decoder sees a `.data =` move and refuses
        weight = m.weight
        ok = weight.dtype == torch.float32 and weight.is_cpu and weight.is_contiguous()
        return (weight, bias, None, None) if ok else None
    if not isinstance(m, CompressedLinear):
        return None
    call = m.plan(x)
    args = getattr(call, "kernel_args", None)
    if args is not None:
        handle, act, kernel = args
        return handle, bias, act, kernel
    copy = getattr(call, "dense_copy", None)
    if copy is None:
        return None
    # the copy as the packed tensors are now; the decoder checks on every step that they stay so
    return copy(), bias, None, None, getattr(call, "dense_source", None)


def _kernel_args_joint(members: list[nn.Module], x: torch.Tensor) -> list[tuple] | None:
    """``_kernel_args`` of the calls ``_bind_joint(members, x)`` makes, side by side, or None."""
    group = _own_group(members)
    calls = [group.joint] if group is not None and group.runs_jointly(x) else members
    args = [_kernel_args(m, x) for m in calls]
    return None if any(a is None for a in args) else args


def _table_pick(calls: list[tuple]) -> list[tuple]:
    """``_kernel_args`` tuples without their kernel names: the ISA's table picks the kernels."""
    return [(*c[:3], None, *c[4:]) for c in calls]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm with the same numbers: ``pow(2)`` is ``x * x`` in ATen and ``mean``
    is ``sum`` then a division, written out here because ``mean``'s wrapper costs more than the
    math on a row of a few hundred values (and ``F.rms_norm``, one op, is slower still on CPU in
    torch 2.13 and rounds differently)."""
    if x.dtype != torch.float32:
        h = x.to(torch.float32)
        var = (h * h).sum(-1, keepdim=True).div_(h.shape[-1]).add_(eps).rsqrt_()
        return weight * (h * var).to(x.dtype)
    var = (x * x).sum(-1, keepdim=True).div_(x.shape[-1]).add_(eps).rsqrt_()
    return weight * (x * var)


class LeanLlama:
    """Batch-1 greedy forward of a transformers ``LlamaForCausalLM`` (or ``MistralForCausalLM`` whose
    sliding window, if any, holds ``max_len``) over a static KV cache of
    ``max_len`` positions: ``prefill(ids)`` once with the prompt [1, S], then ``step(token)`` per new
    token; each returns the last position's logits [vocab]. Runs the model's own modules (see the
    module docstring); call under ``torch.inference_mode()``."""

    def __init__(self, model: nn.Module, max_len: int, steps: str = "python", kv_cache: str = "model"):
        why = unsupported(model, max_len)
        if why is not None:
            raise ValueError(f"LeanLlama: {why}")
        if steps not in STEP_MODES:
            raise ValueError(f"LeanLlama: steps must be one of {STEP_MODES}, got {steps!r}")
        if kv_cache not in KV_CACHES:
            raise ValueError(f"LeanLlama: kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        self.steps = steps
        self.step_path = None  # "native" or "python" once a decode step has run
        # the ISA of native steps: None, the active one with the kernels the routes picked; another
        # (tests/test_llm.py runs each) with that ISA's table picks
        self.native_isa = None
        cfg, base = model.config, model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = base.layers[0].self_attn.scaling
        # the attention the model's own forward runs: torch's, or sparseinfer's kernel where si.compress /
        # si.load installed it (the same function on the same values: the same numbers)
        uses_kernel = getattr(cfg, "_attn_implementation", None) == attention.NAME
        self.attend = attention.sdpa if uses_kernel else F.scaled_dot_product_attention
        self.embed = base.embed_tokens
        self.layers = [_Layer(layer) for layer in base.layers[:cfg.num_hidden_layers]]
        self.norm, self.eps = base.norm.weight, base.norm.variance_epsilon
        self.head, self.lm_head = _linear(model.lm_head), model.lm_head
        self.intermediate = self.layers[0].intermediate
        self.max_len, self.pos = max_len, 0
        ref = self.norm
        dtype, device = self.embed(torch.zeros(1, 1, dtype=torch.long, device=ref.device)).dtype, ref.device
        self.dtype = dtype
        # the rotary module's own cos / sin (attention scaling included) for positions 0 .. max_len-1
        positions = torch.arange(max_len, device=device)[None]
        cos, sin = base.rotary_emb(torch.empty(0, dtype=dtype, device=device), position_ids=positions)
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()
        self.sin = sin[0].clone()
        self.sin[:, :half].neg_()  # rotate_half(x) * sin == swap_halves(x) * [-sin1, sin2]
        shape = (len(self.layers), self.kv_heads, max_len, self.head_dim)
        kv_dtype = torch.float16 if kv_cache == "fp16" else dtype
        self.k = torch.zeros(shape, dtype=kv_dtype, device=device)
        self.v = torch.zeros(shape, dtype=kv_dtype, device=device)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # a decode step's input, reused
        self._step_layers, self._step_key = None, None  # self.layers with calls bound for decode steps
        self._native, self._native_head = None, None  # the native step (_C.Decoder) and whether it runs the head

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``input_ids`` [1, S] from position 0 (the cache is reset)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"LeanLlama.prefill: input_ids of shape [1, S], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_len:
            raise ValueError(f"LeanLlama.prefill: {input_ids.shape[1]} tokens exceed max_len {self.max_len}")
        self.pos = 0
        return self._forward(self.embed(input_ids)[0])

    def step(self, token: int) -> torch.Tensor:
        """One new token at the next position."""
        if self.pos >= self.max_len:
            raise ValueError(f"LeanLlama.step: the cache holds {self.max_len} positions, all used")
        self.ids[0, 0] = token
        x = self.embed(self.ids)[0]
        key = (x.dtype, x.requires_grad and torch.is_grad_enabled(), threads(), generation(), default_act())
        if key != self._step_key:
            self._native, why = self._native_decoder(x) if self.steps != "python" else (None, None)
            if self._native is None and self.steps == "native":
                raise ValueError(f"LeanLlama: the native decode step cannot run this model: {why}")
            if self._native is None:
                like = x.new_empty
                self._step_layers = [layer.bound(like(1, x.shape[1]), like(1, self.heads * self.head_dim),
                                                 like(1, layer.intermediate)) for layer in self.layers]
            self.step_path = "python" if self._native is None else "native"
            self._step_key = key
        if self._native is None:
            return self._forward(x, self._step_layers)
        # the logits, or the final norm's output for a head the decoder does not run
        out = x.new_empty(self.lm_head.out_features) if self._native_head else x.new_empty(1, x.shape[1])
        self._native.step(x, self.pos, out)
        self.pos += 1
        return out if self._native_head else self.head(out)[0]

    def _native_decoder(self, x: torch.Tensor):
        """(a ``_C.Decoder`` running decode steps like ``x`` in one call, None) where every projection
        has a native form (``_kernel_args``), else (None, why not)."""
        C = _native._C
        if C is None or not hasattr(C, "Decoder"):
            return None, "the C++ extension is not built"
        if x.dtype != torch.float32 or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            return None, f"it runs float32 on the CPU without gradients, not {x.dtype} on {x.device}"
        like = x.new_empty
        h, att, act = like(1, x.shape[1]), like(1, self.heads * self.head_dim), like(1, self.intermediate)
        layers = []
        for i, layer in enumerate(self.layers):
            qkv, o, gate_up, down = layer.modules
            calls = (_kernel_args_joint(qkv, h), _kernel_args(o, att), _kernel_args_joint(gate_up, h),
                     _kernel_args(down, act))
            if any(c is None for c in calls):
                return None, f"layer {i} has a projection that is neither a packed kernel call nor an fp32 matrix"
            layers.append((layer.norm1.float(), layer.eps1, calls[0], calls[1], layer.norm2.float(), layer.eps2,
                           calls[2], calls[3]))
        head = _kernel_args(self.lm_head, h)
        self._native_head = head is not None
        dims = (x.shape[1], self.heads, self.kv_heads, self.head_dim, self.intermediate, float(self.scale))
        if self.native_isa is not None:  # that ISA's own kernels
            layers = [(*L[:2], _table_pick(L[2]), *_table_pick([L[3]]), *L[4:6], _table_pick(L[6]),
                       *_table_pick([L[7]])) for L in layers]
            head = head and _table_pick([head])[0]
        decoder = C.Decoder(dims, self.cos, self.sin, self.k, self.v, layers, self.norm.float(), self.eps, head,
                            threads(), self.native_isa)
        return decoder, None

    def _forward(self, x: torch.Tensor, layers: list[_Layer] | None = None) -> torch.Tensor:
        """``x`` [S, hidden] at positions pos .. pos+S-1 -> the last position's logits."""
        s, pos = x.shape[0], self.pos
        end = pos + s
        heads, kv, d = self.heads, self.kv_heads, self.head_dim
        half, nq, nqk = d // 2, heads * d, (heads + kv) * d
        cos, sin = self.cos[pos:end, None], self.sin[pos:end, None]  # [S, 1, D]
        for layer, k_cache, v_cache in zip(layers or self.layers, self.k_layers, self.v_layers):  # caches: [KV, max_len, D]
            qkv = layer.qkv(rms_norm(x, layer.norm1, layer.eps1))  # [S, (H + 2 KV) D]
            qk = qkv[:, :nqk].view(s, heads + kv, d)
            rotated = qk * cos  # transformers: q * cos + rotate_half(q) * sin
            rotated += torch.cat((qk[..., half:], qk[..., :half]), dim=-1).mul_(sin)
            k_cache[:, pos:end] = rotated[:, heads:].transpose(0, 1)
            v_cache[:, pos:end] = qkv[:, nqk:].view(s, kv, d).transpose(0, 1)
            keys, values = k_cache[None, :, :end], v_cache[None, :, :end]
            if keys.dtype != x.dtype:  # a half-precision cache: its rounded values, widened
                keys, values = keys.to(x.dtype), values.to(x.dtype)
            # as transformers' SDPA attention calls it (GQA in the kernel, causal for the prompt from
            # position 0, no mask): the same numbers. Packing each KV head's query heads into one
            # query block would halve this call's time but rounds differently, and int8 activations
            # turn such last bits into other tokens after a few steps.
            att = self.attend(rotated[:, :heads].transpose(0, 1)[None], keys, values, is_causal=s > 1,
                              scale=self.scale, enable_gqa=kv != heads)
            att = att[0].transpose(0, 1).reshape(s, nq)
            x = x + layer.o(att)
            gate_up = layer.gate_up(rms_norm(x, layer.norm2, layer.eps2))  # [S, 2 I], ours to overwrite
            n = layer.intermediate
            x = x + layer.down(F.silu(gate_up[:, :n], inplace=True).mul_(gate_up[:, n:]))
        self.pos = end
        return self.head(rms_norm(x[-1:], self.norm, self.eps))[0]
