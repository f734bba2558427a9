"""GPTQ: second-order weight quantization (Frantar et al., 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers").

Columns are quantized left to right; each column's rounding error, divided by the diagonal of the
upper Cholesky factor of H^-1, is spread onto the columns not yet quantized (lazily, per block of
128 columns), so later columns absorb what earlier ones lost. The result is exactly what ``pack``
produces from the returned weight and scales:

* the quantizer is the format's own (symmetric: signed absmax, codes -2^(b-1)..2^(b-1)-1; int4
  asymmetric: min/max with a zero point, see formats/base.py), applied with scales fixed per group;
* group scales are computed when GPTQ reaches a group's first column, from the weights as updated
  so far (as in the reference implementation), or all up front from the original weights with
  act-order ("static groups": the packed formats need groups of consecutive columns, while
  act-order visits columns by decreasing H diagonal);
* the method sets ``pack_kwargs["scale"]`` (and ``"zero"`` for asymmetric int4), and leaves
  ``t.weight`` = the dequantized result, so ``pack(t.weight, fmt, scale=...)`` reproduces it.

N:M + int4/int8 ("2:4+int4" after a prune method): the kept set is the one ``pack`` would select
from the pruned weight; GPTQ quantizes the survivors only, keeps the pruned entries at 0 (and, as
SparseGPT does, spreads their error too when a magnitude-pruned weight had them non-zero), and uses
value groups along the kept values: with group size g (counted in kept values, g a multiple of N)
a group covers g*M/N consecutive columns of the dense weight, the same for every row.

Methods: "gptq" (act-order with static groups), "gptq-act" (the same: its name from before act-order
was the default) and "gptq-cols" (columns in order, as the paper), e.g. recipes "gptq:int4-g128",
"gptq-cols:int8", or {"default": "2:4+int4", "methods": {"prune": "wanda", "quantize": "gptq"}}.
Act-order is the default because it is what users of GPTQ expect and it costs nothing here: on
SmolLM2 int4-g128 it gave 1.115x dense perplexity against 1.303x for column order, in less CPU time
(docs/accuracy.md), and static groups keep the canonical packed layout (no reordering at run time).
"""

from __future__ import annotations

import math

import torch

from ..formats import format_of
from ..formats.base import asymmetric_quantize, symmetric_quantize
from ..formats.nm import select_nm
from .base import Target, register_method
from .calibration import calibrate
from .obs import BLOCKSIZE, PERCDAMP, inverse_hessian_cholesky
from .wanda import nm_keep_mask

CLIP_GRID = torch.linspace(1.0, 0.8, 21).tolist()  # range shrink factors tried per group
CLIP_NORM = 2.4  # the error norm of the reference implementation's MSE scale search


def _group_params(values: torch.Tensor, bits: int, symmetric: bool, clip: bool = True,
                  col_weight: torch.Tensor | None = None):
    """Scale (and zero) per row [N] of one group's values [N, g], by the format's own quantizer.
    clip: try the group's range shrunk by each factor of CLIP_GRID and keep, per row, the one with
    the lowest sum |w - q|^2.4 (the reference GPTQ's ``mse`` option): a few outliers then no longer
    stretch the grid of the whole group. col_weight [g]: weigh each column's error by it (GPTQ passes
    diag(H), the column's input energy): unweighted, the search clips the large weights of an outlier
    input channel, cheap in |w - q| and costly in the layer output (SmolLM2 layer 2 down_proj: 3.7x
    the layer output error of the weighted search on held-out text, more than no search at all)."""
    if symmetric:
        _, base = symmetric_quantize(values.unsqueeze(1), bits)
        base = base[:, 0]
    best = best_err = None
    for factor in (CLIP_GRID if clip else [1.0]):
        if symmetric:  # the absmax scale of values * f is f times that of values
            scale, zero = base * factor, None
        else:
            _, scale, zero = asymmetric_quantize((values * factor).unsqueeze(1), bits)
            scale, zero = scale[:, 0], zero[:, 0]
        err = (_quantize(values, scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1).float(), bits)
               - values).abs_().pow_(CLIP_NORM)
        err = err.sum(1) if col_weight is None else err @ col_weight
        if best is None:
            best, best_err = (scale, zero), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), None if zero is None else torch.where(better, zero, best[1]))
    return best


def _quantize(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Dequantized column, bit for bit what the packed format's to_dense() gives."""
    if zero is None:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return torch.round(col / scale).clamp_(qmin, qmax) * scale
    codes = (torch.round(col / scale) + zero).clamp_(0, (1 << bits) - 1)
    return (codes - zero) * scale


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int | None = None,
                  symmetric: bool = True, keep: torch.Tensor | None = None, act_order: bool = False,
                  prune_nm: tuple[int, int] | None = None, clip: bool = True, blocksize: int = BLOCKSIZE,
                  percdamp: float = PERCDAMP):
    """Quantize ``weight`` [N, K] with GPTQ.

    group_size: consecutive columns sharing a scale (None: the whole row). keep: bool [N, K], entries
    to quantize; the others end at 0 (N:M survivors). prune_nm (n, m): instead of a fixed ``keep``,
    prune to N:M in the same column sweep (SparseGPT's joint sparsification and quantization): at the
    first column of every group of m the m - n lowest w^2 / [H^-1]_qq^2 of the OBS-updated weights
    are dropped, the survivors quantized, and both errors spread right. A value group's scale is
    fixed at its first column from the survivors the same score predicts for the whole group; with
    act_order too, whole groups of m are visited by decreasing H diagonal sum (K a multiple of m)
    and the static value groups take their scales from the survivors the score predicts on the
    original weights (on SmolLM2 layers this lowered the added layer error on 3 of 4 layers tried).
    clip: search each group's scale (see ``_group_params``). Returns (q float32 [N, K] on the
    quantization grid, scale float32 [N, G], zero int32 [N, G] or None) with G = ceil(K / group_size).
    """
    n_out, k = weight.shape
    if prune_nm is not None:
        if keep is not None:
            raise ValueError("gptq: prune_nm chooses the mask in the sweep; it excludes keep")
        pn, pm = prune_nm
        if act_order and k % pm:
            raise ValueError(f"gptq: act_order with prune_nm={prune_nm} visits whole groups of {pm} columns; "
                             f"K={k} is not a multiple of {pm}")
        blocksize = pm * max(1, blocksize // pm)  # a group of M never straddles two blocks
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: Hessian of shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)} "
                         f"(need {k}x{k})")
    if bits not in (4, 8) or (bits == 8 and not symmetric):
        raise ValueError(f"gptq: bits={bits}, symmetric={symmetric} is not a packed format (int8 symmetric, int4)")
    span = k if group_size is None else group_size
    ngroups = math.ceil(k / span)
    w = weight.float().clone()
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.to(w.device)
    h = hessian.to(w.device).double()
    hdiag0 = torch.diag(h).float()  # the input energy of each column, in the original order
    perm = None
    if act_order and prune_nm is None:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    elif act_order:  # whole groups of M (the N:M mask is chosen per group), by decreasing H diagonal sum
        group_order = torch.argsort(torch.diag(h).reshape(-1, pm).sum(1), descending=True, stable=True)
        perm = (group_order.unsqueeze(1) * pm + torch.arange(pm, device=h.device)).reshape(-1)
    zero_f = torch.zeros((), dtype=w.dtype, device=w.device)
    scale = torch.ones(n_out, ngroups, dtype=torch.float32, device=w.device)
    zero = None if symmetric else torch.zeros(n_out, ngroups, dtype=torch.int32, device=w.device)
    if act_order:  # static groups from the original (masked) weights, then visit by decreasing H diagonal
        if prune_nm is not None:  # the survivors SparseGPT's score predicts on the original weights
            d0 = inverse_hessian_cholesky(h, percdamp, diag_only=True)[0]
            keep = nm_keep_mask(w ** 2 / d0.unsqueeze(0) ** 2, pn, pm)
        kept_w = torch.where(keep, w, zero_f)
        for g in range(ngroups):
            s, z = _group_params(kept_w[:, g * span:(g + 1) * span], bits, symmetric, clip,
                                 hdiag0[g * span:(g + 1) * span])
            scale[:, g] = s
            if zero is not None:
                zero[:, g] = z
        w, keep, h = w[:, perm], keep[:, perm], h[perm][:, perm]
    hinv, dead = inverse_hessian_cholesky(h, percdamp)
    w[:, dead] = 0
    hdiag = torch.diag(hinv)
    if prune_nm is not None:
        keep = keep.clone()
    order = perm if act_order else torch.arange(k, device=w.device)
    group_of = (order // span).tolist()
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col_idx = i1 + i
            g = group_of[col_idx]
            if prune_nm is not None and col_idx % pm == 0:
                width = min(pm, k - col_idx)
                score = w1[:, i:i + width] ** 2 / hdiag[col_idx:col_idx + width].unsqueeze(0) ** 2
                keep[:, col_idx:col_idx + width] = nm_keep_mask(score, min(pn, width), width)
            if not act_order and col_idx % span == 0:
                # the group's current values: this block's part is in w1, later blocks' in w
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :span]
                if prune_nm is None:
                    kept = keep[:, col_idx:col_idx + span]
                else:  # the survivors the score predicts (the masks of later groups of m are not chosen yet)
                    kept = nm_keep_mask(cur ** 2 / hdiag[col_idx:col_idx + cur.shape[1]].unsqueeze(0) ** 2, pn, pm)
                s, z = _group_params(torch.where(kept, cur, zero_f), bits, symmetric, clip,
                                     hdiag0[col_idx:col_idx + cur.shape[1]])
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
            col = w1[:, i]
            z = None if zero is None else zero[:, g].float()
            q = torch.where(keep[:, col_idx], _quantize(col, scale[:, g], z, bits), zero_f)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        w = w[:, torch.argsort(perm)]
    return w, scale, zero


def plan(t: Target, survivors: bool = True) -> dict | None:
    """How to GPTQ a target: bits, symmetric, K-space group size, and (``survivors``) the N:M
    survivors ``pack`` would keep; None if the target has nothing quantized."""
    fmt = format_of(t.recipe.fmt)
    bits = fmt.value_bits
    if bits is None:
        return None
    if not fmt.takes_scales:
        raise ValueError(f"gptq: recipe {t.recipe.text!r} (layer {t.name!r}): {fmt.name} derives its scales "
                         f"in pack and takes none from GPTQ; use rtn (the default) for it")
    symmetric = t.recipe.params.get("symmetric", True)
    g = t.recipe.params.get("group_size")
    plan = {"bits": bits, "symmetric": symmetric, "group_size": g, "keep": None}
    if fmt.nm is not None:
        n, m = fmt.nm
        if g is not None and g % n:
            raise ValueError(f"gptq: recipe {t.recipe.text!r} (layer {t.name!r}): value group size {g} is not a "
                             f"multiple of N={n}, so value groups would not line up with groups of {m} columns")
        plan["nm"] = (n, m)
        if survivors:
            idx = select_nm(t.weight, n, m)
            rows, k = t.weight.shape
            keep = torch.zeros(rows, idx.shape[1] * m, dtype=torch.bool)
            keep.view(rows, -1, m).scatter_(-1, idx, True)
            plan["keep"] = keep[:, :k]
        plan["group_size"] = None if g is None else g * m // n
    return plan


def set_quantized(t: Target, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """Record a GPTQ result on the target: the on-grid weight and the scales ``pack`` must use."""
    t.weight = q
    t.pack_kwargs["scale"] = scale
    if zero is not None:
        t.pack_kwargs["zero"] = zero.to(torch.uint8)
    t.quantized = True


def _gptq_method(act_order: bool):
    def run(targets: list[Target], calib, model) -> None:
        todo = [t for t in targets if not t.quantized]  # a joint SparseGPT sweep may have done some already
        plans = {t.name: plan(t) for t in todo}
        work = [t for t in todo if plans[t.name] is not None]

        def process(group, stats):
            for t in group:
                p = plans[t.name]
                q, scale, zero = gptq_quantize(t.weight, stats[t.name].hessian(), bits=p["bits"],
                                               group_size=p["group_size"], symmetric=p["symmetric"],
                                               keep=p["keep"], act_order=act_order)
                set_quantized(t, q, scale, zero)

        calibrate(model, work, calib, process, gram=True, desc="gptq" if act_order else "gptq-cols", sequential=True)

    run.__doc__ = f"GPTQ on every target with int8 / int4 values (act_order={act_order})."
    return run


# method name -> act_order
METHODS = {"gptq": True, "gptq-act": True, "gptq-cols": False}
for _name, _act_order in METHODS.items():
    register_method(_name, stage="quantize", needs_calibration=True)(_gptq_method(act_order=_act_order))
