"""Magnitude pruning: unstructured (per layer or one global threshold) and N:M."""

from __future__ import annotations

import torch

from ..formats.nm import select_nm
from .base import Target, register_method


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``sparsity`` fraction of smallest |w| (exactly that many)."""
    drop = int(round(sparsity * weight.numel()))
    mask = torch.ones_like(weight, dtype=torch.bool)
    if drop:
        order = weight.abs().flatten().argsort(stable=True)
        mask.view(-1)[order[:drop]] = False
    return mask


def global_magnitude_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One threshold over all weights together: layers end with different sparsities."""
    flat = torch.cat([w.abs().flatten() for w in weights])
    drop = int(round(sparsity * flat.numel()))
    if drop == 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights]
    threshold = flat.kthvalue(drop).values
    return [w.abs() > threshold for w in weights]


def nm_magnitude_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of the n largest |w| in every group of m along K (as ``pack`` selects)."""
    rows, k = weight.shape
    idx = select_nm(weight, n, m)
    mask = torch.zeros(rows, idx.shape[1] * m, dtype=torch.bool, device=weight.device)
    mask.view(rows, -1, m).scatter_(-1, idx, True)
    return mask[:, :k]


@register_method("magnitude", stage="prune")
def magnitude(targets: list[Target], calib, model) -> None:
    """Zero the smallest weights of targets with an unstructured sparsity. N:M targets need no
    work here: ``pack`` keeps the largest n of every m."""
    by_scope: dict[float, list[Target]] = {}
    for t in targets:
        if t.recipe.sparsity is None:
            continue
        if t.recipe.scope == "global":
            by_scope.setdefault(t.recipe.sparsity, []).append(t)
        else:
            t.weight = t.weight * magnitude_mask(t.weight, t.recipe.sparsity)
    for sparsity, group in by_scope.items():
        for t, mask in zip(group, global_magnitude_masks([t.weight for t in group], sparsity)):
            t.weight = t.weight * mask
