"""SparseGPT: second-order pruning with weight updates (Frantar & Alistarh, 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot").

For a layer with input Gram matrix H = 2/n X^T X, removing weight w_q costs w_q^2 / [H^-1]_qq and the
best update of the remaining weights of its row is -w_q / [H^-1]_qq * H^-1_{:,q}. SparseGPT walks
the columns left to right, pruning and spreading each column's error onto the columns not yet
visited, using the upper Cholesky factor of H^-1 (which is the inverse Hessian of the remaining
columns at every step). The mask is chosen on the fly: for N:M at the first column of every group
of M (the M - N smallest w^2 / [H^-1]_qq^2 are dropped); for unstructured sparsity once per block of
128 columns (the adaptive mask selection of the paper).

Recipes: "sparsegpt:2:4", "sparsegpt:2:4+int8", "sparsegpt:sparse50". With GPTQ as the quantize
method, {"default": "2:4+int4", "methods": {"prune": "sparsegpt", "quantize": "gptq"}}, N:M layers
are pruned and quantized in ONE column sweep, as the SparseGPT paper does (``gptq_quantize`` with
``prune_nm``): each column is pruned, its survivors rounded to the grid, and both errors spread
onto the columns to the right -- one calibration and one sweep instead of two full passes. With
"gptq" (or "gptq-act") as the quantize method the sweep visits whole groups of M by decreasing H
diagonal (act-order; static value groups, their scales from the survivors SparseGPT's score predicts
on the original weights); when K is not a multiple of M, or with "gptq-cols", it keeps column order.
"""

from __future__ import annotations

import torch

from . import gptq
from .base import Target, register_method
from .calibration import calibrate
from .obs import BLOCKSIZE, PERCDAMP, inverse_hessian_cholesky
from .wanda import _mask_args, check_per_layer


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float | None = None,
                    n: int | None = None, m: int | None = None, blocksize: int = BLOCKSIZE,
                    percdamp: float = PERCDAMP) -> torch.Tensor:
    """Prune ``weight`` [N, K] to N:M (n, m) or unstructured ``sparsity`` with SparseGPT updates.

    hessian: [K, K] (``LayerStats.hessian()``). Returns the updated float32 weight with the pruned
    entries exactly +0: for N:M at most n non-zeros in every group of m along K.
    """
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"sparsegpt: Hessian of shape {tuple(hessian.shape)} does not match weight "
                         f"{tuple(weight.shape)} (need {k}x{k})")
    if n is None and sparsity is None:
        raise ValueError("sparsegpt: give sparsity or n and m")
    w = weight.float().clone()
    hinv, dead = inverse_hessian_cholesky(hessian.to(w.device), percdamp)
    w[:, dead] = 0
    if n is not None:
        blocksize = m * max(1, blocksize // m)  # a group of M never straddles two blocks
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if n is None:  # adaptive mask: the block's lowest w^2 / d^2, all rows together
            score = (w1 ** 2 / d.unsqueeze(0) ** 2).flatten()
            drop = int(round(score.numel() * sparsity))
            prune1.view(-1)[score.argsort(stable=True)[:drop]] = True
        for i in range(i2 - i1):
            col = w1[:, i]
            if n is not None and i % m == 0:
                width = min(m, i2 - i1 - i)  # a last group cut short by K: pack pads it with zeros
                ndrop = width - min(n, width)
                if ndrop:
                    score = w1[:, i:i + width] ** 2 / d[i:i + width].unsqueeze(0) ** 2
                    idx = score.argsort(dim=1, stable=True)[:, :ndrop]
                    prune1[:, i:i + width] = prune1[:, i:i + width].scatter(1, idx, True)
            q = torch.where(prune1[:, i], torch.zeros((), dtype=col.dtype), col)
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)  # spread the error right
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy update of the columns after the block
    return w


@register_method("sparsegpt", stage="prune", needs_calibration=True)
def sparsegpt(targets: list[Target], calib, model) -> None:
    """Prune every target that asks for N:M or unstructured sparsity with SparseGPT (and quantize
    N:M+int targets in the same sweep when their quantize method is GPTQ)."""
    def process(group, stats):
        for t in group:
            hessian = stats[t.name].hessian()
            method = t.recipe.quant_method
            joint = gptq.plan(t, survivors=False) if method in gptq.METHODS else None
            if joint is not None and "nm" in joint:
                # act-order visits whole groups of M, so K must hold a whole number of them
                act = gptq.METHODS[method] and t.weight.shape[1] % joint["nm"][1] == 0
                q, scale, zero = gptq.gptq_quantize(t.weight, hessian, bits=joint["bits"],
                                                    group_size=joint["group_size"], symmetric=joint["symmetric"],
                                                    prune_nm=joint["nm"], act_order=act)
                gptq.set_quantized(t, q, scale, zero)
            else:
                t.weight = sparsegpt_prune(t.weight, hessian, **_mask_args(t))

    calibrate(model, check_per_layer(targets, "sparsegpt"), calib, process, gram=True, desc="sparsegpt",
              sequential=True)
