"""Calibration: run a few batches through the model and collect, for every target layer, statistics
of its input in GEMM form X [rows, K] (a Linear's input rows; a Conv2d's unfolded patches):

* ``sqsum[K]``   -- sum over rows of x_j^2, so ``col_norms = sqrt(sqsum)`` is Wanda's ||X_j||_2;
* ``gram[K, K]`` -- X^T X, from which ``hessian() = 2/rows * X^T X`` is the Hessian of the layer-wise
                    reconstruction loss ||XW^T - XW'^T||^2 that SparseGPT and GPTQ minimise.

Block by block (SparseGPT / GPTQ "sequential" calibration). When the targets live in a stack of
repeated blocks (the largest ``nn.ModuleList`` holding targets: ``encoder.layer``, ``model.layers``)
the model runs once, up to the first block, to capture that block's inputs; then each block in turn

    1. runs on the captured inputs with hooks on its targets (statistics for this block only),
    2. has its targets edited by the method (``process``), the result written into the block,
    3. runs again, so the next block is calibrated on the outputs of the *compressed* blocks before it.

Memory therefore holds one set of block inputs and one block's statistics, never every layer's
activations or Hessians at once: for a decoder of hidden size d, calibration on S tokens holds
S * d floats of activations (128 x 2048 tokens of a d=576 model: 0.6 GB) plus one layer's K x K Gram
matrices, whatever the depth. (The weights themselves stay where the model keeps them: a model
that does not fit in memory at all needs its blocks loaded lazily, which this module does not do.)
Targets outside the block stack (a classifier head, a pooler) and models without one are
calibrated with one more pass through the whole model.

True-sequential order (GPTQ's ``true-sequential``, on for the second-order methods): inside a block
the targets are processed in the order the forward reaches them, in groups of targets that share
one input tensor (q/k/v, then o, then gate/up, then down in a Llama layer); each group is
calibrated on the block's output of the groups already compressed, at one more (partial) run of
the block per group: a re-run stops once the group has its inputs.

Padding is never counted: when a batch is a mapping with an ``attention_mask`` [B, T], the rows of
padded tokens are dropped from every layer's statistics. ``text_batches`` turns raw text (a list of
strings or a file) into token windows with a tokenizer, as ``compress(..., calib=texts,
tokenizer=tok)`` does.

``calib`` is an iterable of model inputs: a tensor (``model(x)``), a tuple or list (``model(*x)``) or
a mapping of keyword arguments (``model(**x)``, e.g. tokenizer output). It is read once per
calibrated method, so pass a list (or a DataLoader), not a one-shot generator, when a recipe runs
two of them (``wanda`` then ``gptq``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .base import Target


class LayerStats:
    """Running input statistics of one layer (GEMM form, K input columns)."""

    def __init__(self, name: str, k: int, gram: bool):
        self.name, self.k, self.rows = name, k, 0
        self.sqsum = torch.zeros(k, dtype=torch.float64)
        self.gram = torch.zeros(k, k, dtype=torch.float64) if gram else None

    def add(self, x: torch.Tensor) -> tuple:
        """x [rows, K]: one call's input rows. Returns the increment (for ``add_increment``)."""
        if x.shape[-1] != self.k:
            raise ValueError(f"calibration: layer {self.name!r} expects K={self.k} input features, got input rows "
                             f"of shape {tuple(x.shape)}")
        x = x.detach().float().cpu()
        inc = (x.shape[0], (x * x).sum(0, dtype=torch.float64),
               None if self.gram is None else (x.T @ x).double())  # float32 GEMM per batch, float64 running sum
        self.add_increment(inc)
        return inc

    def add_increment(self, inc: tuple) -> None:
        rows, sqsum, gram = inc
        self.rows += rows
        self.sqsum += sqsum
        if self.gram is not None:
            self.gram += gram

    @property
    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 per input column, float32 [K]."""
        return self.sqsum.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """2/rows * X^T X, float64 [K, K]."""
        if self.gram is None:
            raise RuntimeError("LayerStats was collected without the Gram matrix")
        return self.gram * (2.0 / max(self.rows, 1))


# -- model inputs ----------------------------------------------------------------------------

def describe(batch: Any) -> str:
    """A short description of a calibration batch for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {str(batch.dtype).replace('torch.', '')}"
    if isinstance(batch, Mapping):
        return "dict(" + ", ".join(f"{k}={describe(v)}" for k, v in batch.items()) + ")"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__}(" + ", ".join(describe(v) for v in batch) + ")"
    return type(batch).__name__


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(v, device) for v in batch]
        return tuple(moved) if isinstance(batch, tuple) else moved
    return batch


def call_model(model: nn.Module, batch: Any):
    """model(x), model(*x) or model(**x) according to the batch's type."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise ValueError(f"calibration batch must be a tensor, a tuple/list of positional inputs or a dict of keyword "
                     f"inputs, got {type(batch).__name__}")


def batches_of(calib, what: str = "calibration data") -> list:
    """Materialise ``calib`` into a list of batches; clear errors for None / empty / not iterable."""
    if calib is None:
        raise ValueError(f"{what} is required: pass calib=[batch, ...] (model inputs)")
    if isinstance(calib, (torch.Tensor, Mapping)):
        raise ValueError(f"{what} must be an iterable of batches (e.g. a list of tensors), got a single "
                         f"{type(calib).__name__}; wrap it in a list: calib=[x]")
    try:
        one_shot = isinstance(calib, Iterator)
        batches = list(calib)
    except TypeError:
        raise ValueError(f"{what} must be an iterable of model inputs, got {type(calib).__name__}") from None
    if not batches:
        hint = " (a generator already consumed by an earlier pass? pass a list)" if one_shot else ""
        raise ValueError(f"{what} is empty{hint}: at least one batch is needed")
    return batches


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _run_batch(model: nn.Module, batch: Any, index: int) -> Any:
    try:
        return call_model(model, batch)
    except _StopForward:
        raise
    except Exception as err:  # wrong shape / dtype / keyword: say which batch and what it held
        raise ValueError(f"calibration batch {index} ({describe(batch)}) does not fit {type(model).__name__}: "
                         f"{type(err).__name__}: {err}") from err


# -- hooks -----------------------------------------------------------------------------------

def gemm_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as GEMM rows [rows, K] (Conv2d: unfolded patches, as CompressedConv2d runs it)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def token_mask(batch: Any) -> torch.Tensor | None:
    """bool [B * T]: the real (unpadded) tokens of a batch that carries an ``attention_mask`` [B, T]."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.reshape(-1).bool()
    return None


class _Collect:
    """Context manager: forward-pre-hooks that feed each target's input into its LayerStats.

    ``row_mask`` (set by the caller before each batch): the rows to count, when a layer's input has
    one row per token of the batch (padding is dropped). ``stage[name]``: the number of the first
    distinct input tensor the target saw, in forward order (targets sharing an input share it).
    Linear targets fed the same tensor (q/k/v) share one computed Gram increment. ``stop``: raise
    _StopForward once every target has seen the current batch (``seen`` is reset per batch by
    the caller), so a re-run skips the rest of the block."""

    def __init__(self, targets: list[Target], gram: bool, stop: bool = False):
        self.stats = {t.name: LayerStats(t.name, t.weight.shape[1], gram) for t in targets}
        self.targets, self.stop = targets, stop
        self.row_mask: torch.Tensor | None = None
        self.stage: dict[str, int] = {}
        self.seen: set[str] = set()
        self._last_input: torch.Tensor | None = None
        self._last_increment: tuple | None = None
        self._tick = 0

    def __enter__(self) -> dict[str, LayerStats]:
        def hook_for(name: str, stats: LayerStats):
            def hook(module, args):
                x = args[0]
                if x is not self._last_input:
                    self._last_input, self._last_increment = x, None
                    self._tick += 1
                self.stage.setdefault(name, self._tick)
                inc = self._last_increment
                if isinstance(module, nn.Linear) and inc is not None and inc[1].shape[0] == stats.k:
                    stats.add_increment(inc)
                else:
                    rows = gemm_input(module, x)
                    if self.row_mask is not None and rows.shape[0] == self.row_mask.numel():
                        rows = rows[self.row_mask.to(rows.device)]
                    inc = stats.add(rows)
                    if isinstance(module, nn.Linear):
                        self._last_increment = inc
                self.seen.add(name)
                if self.stop and len(self.seen) == len(self.stats):
                    raise _StopForward
            return hook

        self.handles = [t.module.register_forward_pre_hook(hook_for(t.name, self.stats[t.name]))
                        for t in self.targets]
        return self.stats

    def __exit__(self, *exc) -> None:
        self._last_input = self._last_increment = None
        for h in self.handles:
            h.remove()
        if exc[0] is None:
            idle = [name for name, s in self.stats.items() if s.rows == 0]
            if idle:
                raise ValueError(f"calibration: layers {idle} received no input (not on the forward path of the "
                                 f"calibration batches?)")


def sync_weights(targets: list[Target]) -> None:
    """Write each target's current (edited) weight into its module, so that later layers are
    calibrated on what the compressed earlier layers produce."""
    with torch.no_grad():
        for t in targets:
            w = t.module.weight
            w.copy_(t.weight.reshape(w.shape).to(w.dtype))


# -- text -------------------------------------------------------------------------------------

def text_batches(texts, tokenizer, *, seq_len: int = 512, max_windows: int | None = None) -> list[dict]:
    """Calibration batches from raw text: ``texts`` (a list of strings, or the path of a text file)
    is joined, tokenized once with ``tokenizer`` (a Hugging Face tokenizer) and cut into windows of
    ``seq_len`` tokens (the last one shorter), one window per batch: {"input_ids", "attention_mask"}
    [1, T]. No padding is made, so every token counts. ``max_windows`` keeps the first ones."""
    if isinstance(texts, (str, Path)):
        path = Path(texts)
        if not path.is_file():
            raise ValueError(f"calibration text: {str(texts)[:80]!r} is not a file; pass a list of strings for "
                             f"text itself, or the path of a text file")
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("calibration text: expected a non-empty list of strings (or a file path)")
    if tokenizer is None or not callable(tokenizer):
        raise ValueError("calibration text needs the model's tokenizer: pass tokenizer=...")
    if seq_len < 2:
        raise ValueError(f"calibration text: seq_len must be >= 2, got {seq_len}")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"].reshape(-1)
    if ids.numel() == 0:
        raise ValueError("calibration text: the tokenizer produced no tokens")
    windows = [ids[i:i + seq_len] for i in range(0, ids.numel(), seq_len)]
    if max_windows is not None:
        windows = windows[:max_windows]
    return [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)}
            for w in windows]


def as_calibration(calib, tokenizer=None, **kwargs):
    """``calib`` as model inputs: text (a list of strings or a file path) goes through
    ``text_batches`` with ``tokenizer``; anything else is returned as it is."""
    is_text = isinstance(calib, (str, Path)) or (
        isinstance(calib, (list, tuple)) and calib and all(isinstance(c, str) for c in calib))
    if not is_text:
        if tokenizer is not None and calib is not None:
            raise ValueError("tokenizer= is for calibration text (a list of strings or a file path); calib holds "
                             f"{type(calib).__name__} of model inputs already")
        return calib
    return text_batches(calib, tokenizer, **kwargs)


# -- the block stack ------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def find_blocks(model: nn.Module, targets: list[Target]) -> list[nn.Module]:
    """The blocks of the largest nn.ModuleList of repeated modules that holds targets ([] if none)."""
    ids = {id(t.module) for t in targets}
    best: tuple[int, list[nn.Module]] = (0, [])
    for mod in model.modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len({type(b) for b in mod}) != 1:
            continue
        held = sum(id(m) in ids for b in mod for m in b.modules())
        if held > best[0]:
            best = (held, list(mod))
    return best[1]


def _block_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"calibration: a block returned {type(out).__name__}; expected a tensor or a tuple whose first "
                     f"item is the hidden state")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first block's call for every batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        if not args and "hidden_states" not in kwargs:
            raise ValueError(f"calibration: the first block ({type(block).__name__}) got no positional input and no "
                             f"hidden_states keyword")
        # a KV cache would grow with every replay: blocks are replayed without one
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_value", "past_key_values")}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((tuple(args), kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                _run_batch(model, batch, i)
            except _StopForward:
                continue
            raise ValueError(f"calibration: batch {i} ran through {type(model).__name__} without reaching its block "
                             f"stack ({type(block).__name__})")
    finally:
        handle.remove()
    return captured


# -- the driver ------------------------------------------------------------------------------

Process = Callable[[list[Target], dict[str, LayerStats]], None]


def calibrate(model: nn.Module, targets: list[Target], calib, process: Process, *, gram: bool,
              desc: str = "calibrating", sequential: bool = False) -> None:
    """Collect input statistics for ``targets`` block by block and call ``process(group, stats)``
    for each group of targets (one block, then those outside the block stack); ``process`` edits
    ``t.weight``, which is written back into the model before the next block is calibrated.

    gram: collect X^T X (SparseGPT, GPTQ) besides the per-column sums of squares (Wanda).
    sequential: true-sequential order inside each block (see the module docstring).
    """
    if not targets:
        return
    device = model_device(model)
    batches = [_to_device(b, device) for b in batches_of(calib)]
    masks = [token_mask(b) for b in batches]
    sync_weights(targets)  # earlier passes (a magnitude prune before GPTQ) are part of the model now
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            blocks = find_blocks(model, targets)
            done: set[int] = set()
            if blocks:
                inputs = _capture_block_inputs(model, blocks[0], batches)
                for block in tqdm(blocks, desc=desc, unit="block", disable=None):
                    inside = {id(m) for m in block.modules()}
                    group = [t for t in targets if id(t.module) in inside]
                    if group:
                        _calibrate_block(block, group, inputs, masks, process, gram, sequential)
                        done.update(id(t.module) for t in group)
                    for j, (a, kw) in enumerate(inputs):  # in place: one set of activations at a time
                        inputs[j] = _with_hidden(a, kw, _block_output(block(*a, **kw)))
                del inputs
            rest = [t for t in targets if id(t.module) not in done]
            if rest:
                collect = _Collect(rest, gram)
                with collect as stats:
                    for i, batch in enumerate(batches):
                        collect.row_mask = masks[i]
                        _run_batch(model, batch, i)
                process(rest, stats)
                sync_weights(rest)
    finally:
        model.train(was_training)


def _run_block(block: nn.Module, collect: "_Collect", inputs: list, masks: list) -> None:
    for (a, kw), mask in zip(inputs, masks):
        collect.row_mask, collect.seen = mask, set()
        try:
            block(*a, **kw)
        except _StopForward:  # every target of the group has its input: the rest of the block is not needed
            pass


def _calibrate_block(block, group, inputs, masks, process, gram: bool, sequential: bool) -> None:
    """Statistics for the targets of one block, then ``process``; in true-sequential order, one
    group of targets sharing an input at a time, each calibrated after the ones before it."""
    collect = _Collect(group, gram, stop=True)
    with collect as stats:
        _run_block(block, collect, inputs, masks)
    if not sequential:
        process(group, stats)
        sync_weights(group)
        return
    stages = sorted(set(collect.stage.values()))
    for n, stage in enumerate(stages):
        part = [t for t in group if collect.stage[t.name] == stage]
        if n:  # re-collect: the groups before this one are compressed now
            again = _Collect(part, gram, stop=True)
            with again as stats:
                _run_block(block, again, inputs, masks)
        process(part, {t.name: stats[t.name] for t in part})
        sync_weights(part)


def collect_stats(model: nn.Module, targets: list[Target], calib, *, gram: bool = False) -> dict[str, LayerStats]:
    """Input statistics of every target from one pass of the unmodified model (no block-wise
    processing; holds every target's statistics at once -- for small models and tests)."""
    device = model_device(model)
    batches = [_to_device(b, device) for b in batches_of(calib)]
    was_training = model.training
    model.eval()
    try:
        collect = _Collect(targets, gram)
        with torch.no_grad(), collect as stats:
            for i, batch in enumerate(batches):
                collect.row_mask = token_mask(batch)
                _run_batch(model, batch, i)
    finally:
        model.train(was_training)
    return stats
