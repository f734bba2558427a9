"""Pruning during training: gradual magnitude pruning, movement pruning, and iterative
prune-retrain with rewinding. All three end with plain dense weights holding exact zeros, which
``si.compress`` then packs ("sparse90" -> CSR, "2:4" -> N:M) without pruning anything else.

The layers and the end point come from a recipe, as for ``compress``: "sparse90" (90% per layer),
"sparse90-global" (one threshold across layers), "2:4" / "2:4+int8" (N:M: groups go from M kept
to N kept along the schedule). While pruning, each selected layer's weight is parametrized as
W * mask (``torch.nn.utils.parametrize``): the optimizer keeps updating W, the forward only sees
the survivors.

* ``GradualPruner(model, "sparse90", end=1000)`` -- Zhu & Gupta (2017): sparsity follows the cubic
  schedule s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, re-pruned every ``every`` steps
  by magnitude of the surviving weights (pruned weights get no gradient and never come back).
* ``criterion="movement"`` -- Sanh et al. (2020): scores S accumulate -W * dL/dW' over steps (W' the
  masked weight, passed straight through to W), so weights moving towards zero are pruned even if
  large, and pruned ones may come back when their score recovers. Suits fine-tuning from a
  pretrained model.
* ``iterative_prune(model, "sparse90", train_fn, rounds=3, rewind="weights")`` -- train, prune a
  geometric fraction, rewind the survivors to an early state (Frankle et al. 2019; ``rewind="lr"``
  keeps the weights and leaves the schedule restart to ``train_fn``, Renda et al. 2020), retrain.

Call ``pruner.step()`` after every ``optimizer.step()`` (before ``zero_grad``: movement reads the
gradients), and ``pruner.finish()`` at the end. ``si.distill(..., callbacks=[pruner.step])`` runs
gradual pruning inside distillation.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..formats import format_of
from ..passes.pipeline import recipe_layers
from ..recipe import Recipe


class _Mask(nn.Module):
    """Weight parametrization W -> W * mask. ``ste``: gradients reach pruned weights too."""

    def __init__(self, shape, device, ste: bool):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))
        self.ste = ste

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        masked = w * self.mask
        return w + (masked - w).detach() if self.ste else masked


def cubic_schedule(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's sparsity at ``step``: ``initial`` before ``begin``, ``final`` from ``end``."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - begin) / (end - begin)) ** 3


class _Layer:
    def __init__(self, name: str, module: nn.Module, spec: dict, ste: bool):
        self.name, self.module, self.spec = name, module, spec
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"pruning: layer {name!r} is already parametrized (another pruner or QAT on it?)")
        w = module.weight
        parametrize.register_parametrization(module, "weight", _Mask(w.shape, w.device, ste))
        self.param = module.parametrizations["weight"].original
        self.masker: _Mask = module.parametrizations["weight"][0]
        self.score = torch.zeros_like(self.param, dtype=torch.float32)

    def effective(self) -> torch.Tensor:
        return (self.param * self.masker.mask).detach()


def _specs(model: nn.Module, recipe) -> list[tuple[str, nn.Module, dict]]:
    out = []
    for name, module, r in recipe_layers(model, recipe, require=True):
        if r.sparsity is not None:
            spec = {"sparsity": r.sparsity, "scope": r.scope}
        else:
            nm = format_of(r.fmt).nm
            if nm is None:
                continue
            spec = {"n": nm[0], "m": nm[1]}
        out.append((name, module, spec))
    if not out:
        raise ValueError(f"pruning: recipe {Recipe.from_any(recipe).to_json()!r} asks for no sparsity (use 'sparseXX' "
                         f"or 'N:M')")
    return out


def _keep_top(score: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if keep > 0:
        mask[torch.argsort(score.flatten(), descending=True, stable=True)[:keep]] = True
    return mask.reshape(score.shape)


def _keep_nm(score: torch.Tensor, keep: int, m: int) -> torch.Tensor:
    """Keep the ``keep`` best of every group of m along the GEMM K dimension."""
    rows = score.shape[0]
    s = score.reshape(rows, -1).float()
    k = s.shape[1]
    pad = torch.nn.functional.pad(s, (0, -k % m), value=float("-inf")).reshape(rows, -1, m)
    order = torch.sort(-pad, dim=-1, stable=True).indices[..., :keep]
    mask = torch.zeros_like(pad, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(rows, -1)[:, :k].reshape(score.shape)


class GradualPruner:
    """Raise the sparsity of a model's layers along a schedule while it trains (see module doc).

    recipe: which layers and how sparse at the end. begin, end: the steps (calls to ``step``) where
    the schedule starts and reaches the final sparsity; every: re-prune every that many steps.
    criterion: "magnitude" or "movement".
    """

    def __init__(self, model: nn.Module, recipe, *, end: int, begin: int = 0, every: int = 1,
                 criterion: str = "magnitude"):
        if criterion not in ("magnitude", "movement"):
            raise ValueError(f"GradualPruner: criterion must be 'magnitude' or 'movement', got {criterion!r}")
        if not 0 <= begin < end or every < 1:
            raise ValueError(f"GradualPruner: need 0 <= begin < end and every >= 1; got begin={begin}, end={end}, "
                             f"every={every}")
        self.model, self.criterion = model, criterion
        self.begin, self.end, self.every = begin, end, every
        self.layers = [_Layer(n, m, s, ste=criterion == "movement") for n, m, s in _specs(model, recipe)]
        self.steps = 0
        self.frac = 0.0  # fraction of the final sparsity applied so far
        self.history: list[tuple[int, float]] = []  # (step, sparsity) after every re-pruning

    def fraction(self, step: int) -> float:
        """How far along the schedule ``step`` is: sparsity / final sparsity, in [0, 1]."""
        return cubic_schedule(step, 1.0, self.begin, self.end)

    @staticmethod
    def _target(spec: dict, frac: float, geometric: bool) -> float:
        s = spec["sparsity"]
        return 1 - (1 - s) ** frac if geometric else s * frac

    def _apply(self, frac: float, geometric: bool = False) -> None:
        """Prune every layer to ``frac`` of its final sparsity (``geometric``: 1 - (1 - s)^frac)."""
        glob = [layer for layer in self.layers if layer.spec.get("scope") == "global"]
        with torch.no_grad():
            for layer in self.layers:
                score = self._score(layer)
                if "n" in layer.spec:
                    n, m = layer.spec["n"], layer.spec["m"]
                    layer.masker.mask.copy_(_keep_nm(score, m - int(round(frac * (m - n))), m))
                elif layer not in glob:
                    drop = int(round(self._target(layer.spec, frac, geometric) * layer.param.numel()))
                    layer.masker.mask.copy_(_keep_top(score, layer.param.numel() - drop))
            if glob:
                scores = torch.cat([self._score(layer).flatten() for layer in glob])
                drop = int(round(self._target(glob[0].spec, frac, geometric) * scores.numel()))
                mask = _keep_top(scores, scores.numel() - drop)
                start = 0
                for layer in glob:
                    count = layer.param.numel()
                    layer.masker.mask.copy_(mask[start:start + count].reshape(layer.param.shape))
                    start += count
        self.frac = frac
        self.history.append((self.steps, self.sparsity()))

    def _score(self, layer: _Layer) -> torch.Tensor:
        if self.criterion == "movement":
            return layer.score
        return layer.effective().abs().float()  # pruned weights score 0: they stay pruned

    def step(self) -> None:
        """Call after each optimizer step (gradients still present)."""
        self.steps += 1
        if self.criterion == "movement":
            with torch.no_grad():
                for layer in self.layers:
                    if layer.param.grad is not None:
                        layer.score -= (layer.param.detach() * layer.param.grad).float()
        due = self.steps >= self.end or (self.steps > self.begin and (self.steps - self.begin) % self.every == 0)
        if due and self.frac < 1.0:
            self._apply(self.fraction(self.steps))

    def sparsity(self) -> float:
        """Fraction of zeros in the pruned layers' masks now."""
        zeros = sum(int((~layer.masker.mask).sum()) for layer in self.layers)
        return zeros / sum(layer.param.numel() for layer in self.layers)

    def finish(self) -> nn.Module:
        """Apply the final sparsity, remove the parametrizations and leave exact zeros in the weights."""
        if self.frac < 1.0:
            self._apply(1.0)
        for layer in self.layers:
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=True)
        return self.model


def iterative_prune(model: nn.Module, recipe, train_fn: Callable[[nn.Module, int], dict | None], *, rounds: int = 3,
                    rewind: str | None = "weights", rewind_state: dict | None = None,
                    train_first: bool = True) -> tuple[nn.Module, list[dict]]:
    """Iterative magnitude pruning with rewinding, in place.

    train_fn(model, round) trains the model (any loop; pruned weights stay zero meanwhile) and may
    return metrics. Round r prunes the trained weights by magnitude to sparsity 1 - (1 - s)^(r/rounds)
    (N:M: the kept count per group steps from M to N), then, with ``rewind="weights"``, resets the
    survivors to ``rewind_state`` (a state_dict, e.g. ``snapshot(model)`` taken early in training:
    "late rewinding"; default: the weights at the call), and retrains. ``rewind="lr"`` or None keeps
    the trained weights (learning-rate rewinding is ``train_fn`` restarting its schedule).
    train_first: train the dense model before the first pruning. Returns (model, per-round history).
    """
    if rewind not in ("weights", "lr", None):
        raise ValueError(f"iterative_prune: rewind must be 'weights', 'lr' or None, got {rewind!r}")
    if rounds < 1:
        raise ValueError(f"iterative_prune: rounds must be >= 1, got {rounds}")
    specs = _specs(model, recipe)
    state = rewind_state or {}
    saved = {name: state.get(f"{name}.weight", module.weight).detach().clone() for name, module, _ in specs}
    history: list[dict] = []
    if train_first:
        history.append({"round": 0, "sparsity": 0.0, **(train_fn(model, 0) or {})})
    pruner = GradualPruner(model, recipe, begin=0, end=rounds)
    for r in range(1, rounds + 1):
        pruner.steps = r
        pruner._apply(r / rounds, geometric=True)
        if rewind == "weights":
            with torch.no_grad():
                for layer in pruner.layers:
                    layer.param.copy_(saved[layer.name].to(layer.param.device))
        history.append({"round": r, "sparsity": pruner.sparsity(), **(train_fn(model, r) or {})})
    pruner.finish()
    return model, history


def snapshot(model: nn.Module) -> dict:
    """A detached copy of the model's state (for ``iterative_prune(rewind_state=...)``)."""
    return copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
