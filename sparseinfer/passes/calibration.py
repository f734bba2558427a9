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
activations or Hessians at once. (The weights themselves stay where the model keeps them: a model
that does not fit in memory at all needs its blocks loaded lazily, which this module does not do.)
Targets outside the block stack (a classifier head, a pooler) and models without one are
calibrated with one more pass through the whole model.

``calib`` is an iterable of model inputs: a tensor (``model(x)``), a tuple or list (``model(*x)``) or
a mapping of keyword arguments (``model(**x)``, e.g. tokenizer output). It is read once per
calibrated method, so pass a list (or a DataLoader), not a one-shot generator, when a recipe runs
two of them (``wanda`` then ``gptq``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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

    def add(self, x: torch.Tensor) -> None:
        """x [rows, K]: one call's input rows."""
        if x.shape[-1] != self.k:
            raise ValueError(f"calibration: layer {self.name!r} expects K={self.k} input features, got input rows "
                             f"of shape {tuple(x.shape)}")
        x = x.detach().float().cpu()
        self.rows += x.shape[0]
        self.sqsum += (x * x).sum(0, dtype=torch.float64)
        if self.gram is not None:
            self.gram += (x.T @ x).double()  # float32 GEMM per batch, float64 running sum

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


class _Collect:
    """Context manager: forward-pre-hooks that feed each target's input into its LayerStats."""

    def __init__(self, targets: list[Target], gram: bool):
        self.stats = {t.name: LayerStats(t.name, t.weight.shape[1], gram) for t in targets}
        self.targets = targets

    def __enter__(self) -> dict[str, LayerStats]:
        def hook_for(stats: LayerStats):
            def hook(module, args):
                stats.add(gemm_input(module, args[0]))
            return hook

        self.handles = [t.module.register_forward_pre_hook(hook_for(self.stats[t.name])) for t in self.targets]
        return self.stats

    def __exit__(self, *exc) -> None:
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
              desc: str = "calibrating") -> None:
    """Collect input statistics for ``targets`` block by block and call ``process(group, stats)``
    for each group of targets (one block, then those outside the block stack); ``process`` edits
    ``t.weight``, which is written back into the model before the next block is calibrated.

    gram: collect X^T X (SparseGPT, GPTQ) besides the per-column sums of squares (Wanda).
    """
    if not targets:
        return
    device = model_device(model)
    batches = [_to_device(b, device) for b in batches_of(calib)]
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
                        with _Collect(group, gram) as stats:
                            for args, kwargs in inputs:
                                block(*args, **kwargs)
                        process(group, stats)
                        sync_weights(group)
                        done.update(id(t.module) for t in group)
                    inputs = [_with_hidden(a, kw, _block_output(block(*a, **kw))) for a, kw in inputs]
                del inputs
            rest = [t for t in targets if id(t.module) not in done]
            if rest:
                with _Collect(rest, gram) as stats:
                    for i, batch in enumerate(batches):
                        _run_batch(model, batch, i)
                process(rest, stats)
                sync_weights(rest)
    finally:
        model.train(was_training)


def collect_stats(model: nn.Module, targets: list[Target], calib, *, gram: bool = False) -> dict[str, LayerStats]:
    """Input statistics of every target from one pass of the unmodified model (no block-wise
    processing; holds every target's statistics at once -- for small models and tests)."""
    device = model_device(model)
    batches = [_to_device(b, device) for b in batches_of(calib)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _Collect(targets, gram) as stats:
            for i, batch in enumerate(batches):
                _run_batch(model, batch, i)
    finally:
        model.train(was_training)
    return stats
