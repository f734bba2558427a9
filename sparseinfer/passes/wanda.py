"""Wanda: prune by |W_ij| * ||X_j||_2 (Sun et al., 2023, "A Simple and Effective Pruning Approach
for Large Language Models").

A weight multiplying a large input matters more than its magnitude alone says. Wanda scores every
weight by its magnitude times the L2 norm of its input column over the calibration rows and drops
the lowest scores -- per output row for unstructured sparsity (the paper's comparison group), per
group of M for N:M. No weight update, one calibration pass, no Hessian.

Recipes: "wanda:2:4", "wanda:2:4+int8", "wanda:sparse50" (per layer only: scores of different
layers are not comparable, so "-global" is refused).
"""

from __future__ import annotations

import torch

from ..formats import format_of
from ..formats.base import pad_k
from .base import Target, register_method
from .calibration import calibrate


def prune_spec(t: Target) -> dict | None:
    """What a target's recipe prunes: {"n", "m"} for N:M, {"sparsity"} for unstructured, None."""
    if t.recipe.sparsity is not None:
        return {"sparsity": t.recipe.sparsity, "scope": t.recipe.scope}
    nm = format_of(t.recipe.fmt).nm
    return None if nm is None else {"n": nm[0], "m": nm[1]}


def nm_keep_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of the n highest scores in every group of m along K (ties -> lower index)."""
    rows, k = score.shape
    groups = pad_k(score.float(), m)
    if groups.shape[1] != k:  # padding must never be kept over a real column
        groups[:, k:] = -1.0
    groups = groups.reshape(rows, -1, m)
    order = torch.sort(-groups, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(rows, -1)[:, :k]


def row_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping round(sparsity * K) lowest scores in every row."""
    drop = int(round(sparsity * score.shape[1]))
    mask = torch.ones_like(score, dtype=torch.bool)
    if drop:
        order = score.argsort(dim=1, stable=True)[:, :drop]
        mask.scatter_(1, order, False)
    return mask


def wanda_mask(weight: torch.Tensor, col_norms: torch.Tensor, *, sparsity: float | None = None,
               n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Keep-mask for ``weight`` [N, K] given ||X_j|| [K]: N:M (n, m) or per-row ``sparsity``."""
    if col_norms.shape != (weight.shape[1],):
        raise ValueError(f"wanda: input norms of shape {tuple(col_norms.shape)} do not match weight "
                         f"{tuple(weight.shape)} (need K={weight.shape[1]})")
    score = weight.abs().float() * col_norms.float().to(weight.device).unsqueeze(0)
    if n is not None:
        return nm_keep_mask(score, n, m)
    if sparsity is None:
        raise ValueError("wanda: give sparsity or n and m")
    return row_keep_mask(score, sparsity)


def apply_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """weight with the dropped entries set to +0 (so ``pack`` keeps exactly the survivors)."""
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def check_per_layer(targets: list[Target], method: str) -> list[Target]:
    """The targets that prune something; refuses global-threshold recipes."""
    work = []
    for t in targets:
        spec = prune_spec(t)
        if spec is None:
            continue
        if spec.get("scope") == "global":
            raise ValueError(f"{method}: recipe {t.recipe.text!r} (layer {t.name!r}) asks for one global threshold; "
                             f"{method} prunes each layer on its own -- drop '-global'")
        work.append(t)
    return work


@register_method("wanda", stage="prune", needs_calibration=True)
def wanda(targets: list[Target], calib, model) -> None:
    """Prune every target that asks for N:M or unstructured sparsity by Wanda's score."""

    def process(group, stats):
        for t in group:
            t.weight = apply_mask(t.weight, wanda_mask(t.weight, stats[t.name].col_norms, **_mask_args(t)))

    calibrate(model, check_per_layer(targets, "wanda"), calib, process, gram=False, desc="wanda")


def _mask_args(t: Target) -> dict:
    spec = prune_spec(t)
    return {"n": spec["n"], "m": spec["m"]} if "n" in spec else {"sparsity": spec["sparsity"]}
