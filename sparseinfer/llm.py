"""Causal LMs: load a local Hugging Face folder or a GGUF file, and a lean greedy decode loop that
reports prefill and decode speed (used by ``sparseinfer compress`` / ``generate`` and bench/llm_decode.py).

The loop takes the argmax of each step's logits: the same tokens as ``model.generate(do_sample=False)``,
without generate's per-token Python (logits processors, stopping criteria), under
``torch.inference_mode``. Each step runs either ``LeanLlama`` (sparseinfer/lean_llama.py: a small
Llama forward on the model's own modules over a static KV cache, for transformers' LlamaForCausalLM)
or the model's own ``forward`` with a ``DynamicCache`` (every other model, or when asked). Mistral
(without a sliding window shorter than the sequence) runs ``LeanLlama`` too.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

from .backends import cpu_native
from .backends.cpu_routes import torch_threads
from .lean_llama import KV_CACHES, LeanLlama, unsupported
from .runtime.fused import fuse_shared_inputs
from .runtime.modules import prepare_compile


def _transformers():
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise ImportError("causal LMs need transformers (pip install 'sparseinfer[demo]')") from err
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return transformers


def load_causal_lm(source, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a local Hugging Face model folder (config.json + weights)
    or a GGUF file (dequantized to ``dtype`` by transformers; needs the ``gguf`` package). Offline."""
    transformers = _transformers()
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        folder = path.parent
    elif path.is_dir() and (path / "config.json").is_file():
        kw, folder = {}, path
    else:
        raise ValueError(f"{str(source)!r} is neither a .gguf file nor a Hugging Face model folder with config.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype, **kw)
    if "gguf_file" in kw:  # the weights are dequantized: nothing of the GGUF quantizer remains in use
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


@contextlib.contextmanager
def decode_threads(n: int | None = None):
    """Threads for batch-1 decoding: sparseinfer's kernels on ``n`` threads (default: torch's count on
    entry), torch's own ops on one. A decode step is ~200 kernel calls plus ~1,500 small torch ops
    (norms, rotary, attention over one query: microseconds each); with several torch threads each of
    those is a fork / join, and on a busy machine a join waits for a descheduled thread (measured in
    bench/README.md: SmolLM2 int8 decode ~6x faster on a loaded 2-core Zen 4). Dense layers left in
    the model run on torch's one thread too; compressed layers whose route is the dense fallback run
    it on sparseinfer's ``n`` (cpu_routes.torch_threads), and ``greedy`` runs the prompt's forward
    with torch's count on entry."""
    before_torch, before_si = torch.get_num_threads(), cpu_native.configured_threads()
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"decode_threads: n must be a positive int or None, got {n!r}")
    global _prefill_torch_threads
    cpu_native.set_threads(n or before_si or before_torch)
    torch.set_num_threads(1)
    outer, _prefill_torch_threads = _prefill_torch_threads, before_torch
    try:
        yield
    finally:
        _prefill_torch_threads = outer
        torch.set_num_threads(before_torch)
        cpu_native.set_threads(before_si)


# torch's thread count outside decode_threads: greedy runs the prompt's forward (hundreds of rows:
# attention and norms that pay for threads) with it, and only the one-token steps on one thread.
_prefill_torch_threads = 1


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` the model's forward (dynamic shapes: prompt and KV lengths vary; one graph,
    no break, for transformers' Llama with a DynamicCache) with each compressed layer -- or each group
    of q/k/v or gate/up projections (``fuse_shared_inputs``, applied here) -- called as one
    ``sparseinfer::layer_linear`` op on the live layer (``prepare_compile``); the norms, rotary
    embeddings and residual adds around them are fused by inductor. Compiling takes minutes on 2 cores
    (first prefill and first decode step); figures in bench/README.md. Returns ``model`` (compiled in
    place). ``greedy`` then runs the compiled forward, not ``LeanLlama`` (the forward is replaced on the
    instance, which ``lean_llama.unsupported`` reports).

    Tokens against eager: with exact activations (act="fp32") the same up to fp32 summation order.
    With int8 activations (act "auto" / "int8") they may part after some tokens: inductor's generated
    code for the RMSNorm (and silu, rotary) rounds some activations differently in the last bit from
    ATen's kernels (2.4e-7 on the first layer's input of a random Llama), int8 activation quantization
    is a step function that turns such a bit into a whole code where a value sits on a rounding
    boundary, and greedy decoding turns a near-tie into another token. The graph capture itself
    changes nothing: ``backend="aot_eager"`` (ATen's kernels, the graph run op by op) gives eager's
    numbers bit for bit (tests/test_llm.py), but it is slower than eager."""
    fuse_shared_inputs(model)
    prepare_compile(model)
    # every model of one class shares forward's code object, and dynamo's recompile limit (8) counts
    # per code object: prefill / decode / with and without a cache, per compiled model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.forward = torch.compile(model.forward, **{"dynamic": True, **compile_kwargs})
    return model


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    prompt_tokens: int
    prefill_s: float  # the prompt's forward, up to the first new token
    decode_s: float  # the other new tokens
    step_s: list[float] = field(default_factory=list)
    decoder: str = "transformers"  # which forward ran: "native" / "lean" (LeanLlama's steps) or "transformers"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s and len(self.tokens) > 1 else float("nan")


# "native": LeanLlama with its decode steps in one C++ call each (float32 models whose projections are
# packed kernels or fp32 matrices: lean_llama.py, steps="native"); "lean": LeanLlama's Python steps
# (transformers' logits bit for bit); "transformers": the model's forward; "auto": native, else lean,
# else transformers.
DECODERS = ("auto", "native", "lean", "transformers")
_LEAN_STEPS = {"auto": "auto", "native": "native", "lean": "python"}


def pick_decoder(model: nn.Module, decoder: str = "auto", max_len: int | None = None) -> str:
    """``"lean"`` or ``"transformers"``: which forward ``greedy`` runs for ``model`` on sequences of up
    to ``max_len`` positions. ``"auto"`` takes the lean one (``LeanLlama``, whose steps may be native)
    where the model supports it (``lean_llama.unsupported``); ``"lean"`` and ``"native"`` raise
    ValueError with the reason where it does not."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "transformers":
        return decoder
    why = unsupported(model, max_len)
    if why is None:
        return "lean"
    if decoder != "auto":
        raise ValueError(f"the {decoder} decoder cannot run this model: {why}")
    return "transformers"


@torch.inference_mode()
def greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None,
           on_token=None, decoder: str = "auto", kv_cache: str = "model") -> Generation:
    """Greedy decoding of one prompt (``input_ids`` [1, S]) with a KV cache; ``on_token(id)`` is
    called as each token is chosen (streaming). Stops at ``max_new_tokens`` or an EOS token.
    ``decoder`` (``DECODERS``): "auto" (default) runs ``LeanLlama`` where the model is a supported
    Llama / Mistral, with native steps where it can (float32, no other backend), and transformers'
    forward otherwise; "native", "lean" or "transformers" forces one. ``kv_cache``
    (``lean_llama.KV_CACHES``): "model" (default) keeps keys and values in the model's dtype, "fp16" in
    half precision (half the bytes a decode step reads from a long context's cache; the lean and native
    decoders only)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy: one prompt at a time, input_ids of shape [1, S]; got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"greedy: max_new_tokens must be >= 1, got {max_new_tokens}")
    steps = _LEAN_STEPS.get(decoder)
    if kv_cache not in KV_CACHES:
        raise ValueError(f"greedy: kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    decoder = pick_decoder(model, decoder, input_ids.shape[1] + max_new_tokens)
    if decoder == "transformers" and kv_cache != "model":
        raise ValueError(f"greedy: kv_cache={kv_cache!r} needs the lean or native decoder; transformers' forward "
                         "keeps its own cache")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    start = time.perf_counter()
    if decoder == "lean":
        lean = LeanLlama(model, input_ids.shape[1] + max_new_tokens, steps=steps, kv_cache=kv_cache)

        def forward(ids):
            return lean.prefill(ids) if ids is input_ids else lean.step(ids)
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        # transformers renamed the KV cache argument (past_key_values -> cache, 5.x)
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def forward(ids):
            if ids is not input_ids:
                ids = torch.tensor([[ids]], device=input_ids.device)
            return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits[0, -1]
    tokens, times = [], []
    ids = input_ids
    setup = time.perf_counter() - start  # building the cache: counted with the prefill
    for _ in range(max_new_tokens):
        t = time.perf_counter()
        with torch_threads(_prefill_torch_threads if ids is input_ids else 1):
            logits = forward(ids)
        token = int(logits.argmax())
        times.append(time.perf_counter() - t + (setup if not times else 0.0))
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            break
        ids = token
    total = time.perf_counter() - start
    if decoder == "lean" and lean.step_path == "native":
        decoder = "native"
    return Generation(tokens, input_ids.shape[1], times[0], total - times[0], times, decoder)
