"""Structured pruning: remove whole neurons, channels and attention heads, so dense layers really
shrink (smaller nn.Linear / nn.Conv2d, no masks, faster with any kernel).

A *group* couples every tensor that indexes the same units, and all of them are cut together:

    kind      producers (rows / out-channels)     in between (cut too)       consumers (columns / in-channels)
    neurons   fc1 (or gate_proj and up_proj)      BatchNorm1d, activations   fc2 (or down_proj)
    channels  conv                                BatchNorm2d, act., pooling  next conv, or Linear after Flatten
    heads     query, key, value (head_dim rows)   --                          attention output (head_dim columns)

Groups are found automatically: consecutive layers inside any ``nn.Sequential`` (with only
element-wise / channel-wise modules between them), and transformer blocks by their usual names
(BERT ``intermediate.dense`` -> ``output.dense`` and ``attention.self.{query,key,value}`` ->
``attention.output.dense``; LLaMA ``gate_proj``/``up_proj`` -> ``down_proj``; ``fc1`` -> ``fc2``;
``q_proj``/``k_proj``/``v_proj`` -> ``o_proj``). ``structured_groups(model)`` lists them.

Importance of a unit (higher is kept):

* ``l1`` / ``l2`` -- the norm of all its weights in the group (producer rows with their bias,
  consumer columns);
* ``taylor`` -- the first-order estimate of the loss change when the unit is removed,
  (sum over its weights of w * dL/dw)^2, averaged over the batches of a loader (Molchanov et al.,
  2019). Needs ``loader`` (batches of (inputs, labels), or a ``loss_fn``).

The same fraction of units is removed from every group (``amount``; ``head_amount`` for heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..passes.calibration import call_model
from .distill import output_tensor, split_labels

_PASS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish,
         nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveMaxPool2d)
_HEAD_ATTRS = ("num_attention_heads", "num_heads", "num_key_value_heads", "n_heads")


@dataclass
class Group:
    """Tensors indexing the same units. Producer rows u*unit .. u*unit+unit-1 (and bias) belong to
    unit u; consumer columns u*consumer_unit .. (u+1)*consumer_unit-1 likewise."""

    kind: str  # "neurons", "channels" or "heads"
    producers: list[str]
    consumers: list[str]
    norms: list[str] = field(default_factory=list)  # BatchNorm layers between producer and consumer
    unit: int = 1  # producer rows per unit (head_dim for heads)
    consumer_unit: int = 1  # consumer columns per unit (H*W for conv -> Flatten -> Linear)
    owner: str = ""  # the module whose head-count attributes follow (heads)
    size: int = 0  # number of units

    @property
    def name(self) -> str:
        return self.producers[0].rpartition(".")[0] or self.producers[0]


def _is_producer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _out_units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _sequential_groups(model: nn.Module) -> list[Group]:
    groups = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        prefix = f"{seq_name}." if seq_name else ""
        for i, (name, mod) in enumerate(kids):
            if not _is_producer(mod):
                continue
            norms, flatten, j = [], False, i + 1
            while j < len(kids):
                kid = kids[j][1]
                if isinstance(kid, (nn.BatchNorm1d, nn.BatchNorm2d)) and kid.num_features == _out_units(mod):
                    norms.append(prefix + kids[j][0])
                elif isinstance(kid, nn.Flatten) and isinstance(mod, nn.Conv2d):
                    flatten = True
                elif not isinstance(kid, _PASS):
                    break
                j += 1
            if j == len(kids):
                continue
            nxt = kids[j][1]
            units = _out_units(mod)
            if isinstance(mod, nn.Linear) and isinstance(nxt, nn.Linear) and nxt.in_features == units:
                groups.append(Group("neurons", [prefix + name], [prefix + kids[j][0]], norms, size=units))
            elif isinstance(mod, nn.Conv2d) and not flatten and isinstance(nxt, nn.Conv2d) and nxt.groups == 1 \
                    and nxt.in_channels == units:
                groups.append(Group("channels", [prefix + name], [prefix + kids[j][0]], norms, size=units))
            elif isinstance(mod, nn.Conv2d) and flatten and isinstance(nxt, nn.Linear) and nxt.in_features % units == 0:
                groups.append(Group("channels", [prefix + name], [prefix + kids[j][0]], norms,
                                    consumer_unit=nxt.in_features // units, size=units))
    return groups


def _linear(model_modules: dict, name: str) -> nn.Linear | None:
    m = model_modules.get(name)
    return m if isinstance(m, nn.Linear) else None


def _named_groups(model: nn.Module) -> list[Group]:
    mods = dict(model.named_modules())
    groups = []
    for name, mod in mods.items():
        p = f"{name}." if name else ""
        # MLPs: (producers, consumer) by common names
        for prods, cons in ((["intermediate.dense"], "output.dense"), (["gate_proj", "up_proj"], "down_proj"),
                            (["fc1"], "fc2")):
            lp = [_linear(mods, p + x) for x in prods]
            lc = _linear(mods, p + cons)
            if all(lp) and lc is not None and all(x.out_features == lc.in_features for x in lp):
                groups.append(Group("neurons", [p + x for x in prods], [p + cons], size=lc.in_features))
        # attention heads
        for qkv, out, owner in ((["self.query", "self.key", "self.value"], "output.dense", "self"),
                                (["q_proj", "k_proj", "v_proj"], "o_proj", "")):
            lq = [_linear(mods, p + x) for x in qkv]
            lo = _linear(mods, p + out)
            if not all(lq) or lo is None:
                continue
            owner_mod = mods[(p + owner).rstrip(".")] if (p + owner).rstrip(".") else model
            head_dim = getattr(owner_mod, "attention_head_size", None) or getattr(owner_mod, "head_dim", None)
            width = lq[0].out_features
            if not isinstance(head_dim, int) or any(x.out_features != width for x in lq) or \
                    lo.in_features != width or width % head_dim:
                continue  # grouped-query attention or an unknown layout: leave its heads alone
            groups.append(Group("heads", [p + x for x in qkv], [p + out], unit=head_dim, consumer_unit=head_dim,
                                owner=(p + owner).rstrip("."), size=width // head_dim))
    return groups


def structured_groups(model: nn.Module, kinds=("neurons", "channels", "heads")) -> list[Group]:
    """The coupled groups of ``model`` that structured pruning can cut, in model order."""
    bad = set(kinds) - {"neurons", "channels", "heads"}
    if bad:
        raise ValueError(f"prune_structured: unknown kinds {sorted(bad)}; expected neurons, channels, heads")
    seen, out = set(), []
    for g in _sequential_groups(model) + _named_groups(model):
        key = tuple(g.producers)
        if g.kind in kinds and key not in seen:
            seen.add(key)
            out.append(g)
    return out


# -- importance ------------------------------------------------------------------------------

def _slices(group: Group, mods: dict, tensors: str = "weight"):
    """Per tensor of the group: (tensor [units, -1] view), using ``tensors`` = "weight" or "grad"."""
    def get(p):
        return p if tensors == "weight" else p.grad

    out = []
    for name in group.producers:
        m = mods[name]
        w = get(m.weight)
        out.append(w.reshape(group.size, -1))
        if m.bias is not None:
            out.append(get(m.bias).reshape(group.size, -1))
    for name in group.consumers:
        w = get(mods[name].weight)
        if w.dim() == 4:  # conv in-channels
            w = w.transpose(0, 1)
        else:
            w = w.T
        out.append(w.reshape(group.size, -1))
    return out


def _norm_scores(group: Group, mods: dict, p: int) -> torch.Tensor:
    with torch.no_grad():
        parts = [s.detach().float().abs().pow(p).sum(1) for s in _slices(group, mods)]
    return torch.stack(parts).sum(0).pow(1.0 / p)


def _taylor_scores(model: nn.Module, groups: list[Group], loader, loss_fn) -> list[torch.Tensor]:

    mods = dict(model.named_modules())
    scores = [torch.zeros(g.size) for g in groups]
    was_training = model.training
    model.eval()  # dropout off: the estimate is for the model as it runs
    batches = 0
    try:
        for batch in loader:
            inputs, labels = split_labels(batch)
            model.zero_grad(set_to_none=True)
            out = call_model(model, inputs)
            if loss_fn is not None:
                loss = loss_fn(out, labels)
            elif labels is None:
                raise ValueError("prune_structured: criterion 'taylor' needs (inputs, labels) batches or a loss_fn")
            else:
                logits = output_tensor(out)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            with torch.no_grad():
                for i, g in enumerate(groups):
                    contrib = sum((w.detach() * gr).sum(1) for w, gr in zip(_slices(g, mods), _slices(g, mods, "grad"))
                                  if gr is not None)
                    scores[i] += contrib.float().pow(2).cpu()
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if batches == 0:
        raise ValueError("prune_structured: the loader for criterion 'taylor' yielded no batches")
    return [s / batches for s in scores]


# -- cutting ---------------------------------------------------------------------------------

def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _expand(keep: torch.Tensor, unit: int) -> torch.Tensor:
    return (keep.unsqueeze(1) * unit + torch.arange(unit)).reshape(-1)


def _cut_rows(m: nn.Module, rows: torch.Tensor) -> nn.Module:
    w = m.weight.detach()
    rows = rows.to(w.device)
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, len(rows), bias=m.bias is not None, device=w.device, dtype=w.dtype)
    else:
        new = nn.Conv2d(m.in_channels, len(rows), m.kernel_size, m.stride, m.padding, m.dilation, 1,
                        m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[rows])
        if m.bias is not None:
            new.bias.copy_(m.bias.detach()[rows])
    new.train(m.training)
    return new


def _cut_cols(m: nn.Module, cols: torch.Tensor) -> nn.Module:
    w = m.weight.detach()
    cols = cols.to(w.device)
    if isinstance(m, nn.Linear):
        new = nn.Linear(len(cols), m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
    else:
        new = nn.Conv2d(len(cols), m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                        m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[:, cols])
        if m.bias is not None:
            new.bias.copy_(m.bias.detach())
    new.train(m.training)
    return new


def _cut_norm(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = type(m)(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats,
                  device=m.weight.device if m.affine else None)
    with torch.no_grad():
        keep = keep.to(m.running_mean.device if m.track_running_stats else keep.device)
        if m.affine:
            new.weight.copy_(m.weight.detach()[keep])
            new.bias.copy_(m.bias.detach()[keep])
        if m.track_running_stats:
            new.running_mean.copy_(m.running_mean[keep])
            new.running_var.copy_(m.running_var[keep])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    new.train(m.training)
    return new


def _apply_cut(model: nn.Module, g: Group, keep: torch.Tensor) -> None:
    mods = dict(model.named_modules())
    for name in g.producers:
        _set(model, name, _cut_rows(mods[name], _expand(keep, g.unit)))
    for name in g.norms:
        _set(model, name, _cut_norm(mods[name], keep))
    for name in g.consumers:
        _set(model, name, _cut_cols(mods[name], _expand(keep, g.consumer_unit)))
    if g.kind == "heads":
        owner = mods[g.owner] if g.owner else model
        for attr in _HEAD_ATTRS:
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, len(keep))
        if isinstance(getattr(owner, "all_head_size", None), int):
            owner.all_head_size = len(keep) * g.unit


def prune_structured(model: nn.Module, amount: float, *, criterion: str = "l2", head_amount: float | None = None,
                     kinds=("neurons", "channels", "heads"), loader=None, loss_fn=None, inplace: bool = False,
                     report: list | None = None) -> nn.Module:
    """Remove the least important ``amount`` fraction of units of every coupled group (see the
    module docstring); returns the smaller model (a copy unless ``inplace``).

    criterion: "l1", "l2" or "taylor" (needs ``loader`` of (inputs, labels) batches, or batches and a
    ``loss_fn(output, labels)``). head_amount: fraction of attention heads (default ``amount``).
    kinds: which groups to cut. report: a list that receives one dict per group (names, sizes before
    and after, the kept unit indices).
    """
    import copy

    if criterion not in ("l1", "l2", "taylor"):
        raise ValueError(f"prune_structured: criterion must be 'l1', 'l2' or 'taylor', got {criterion!r}")
    head_amount = amount if head_amount is None else head_amount
    for what, value in (("amount", amount), ("head_amount", head_amount)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"prune_structured: {what} must be a fraction in [0, 1), got {value!r}")
    if criterion == "taylor" and loader is None:
        raise ValueError("prune_structured: criterion 'taylor' needs a loader of (inputs, labels) batches")
    if not inplace:
        model = copy.deepcopy(model)
    groups = structured_groups(model, kinds)
    if not groups:
        raise ValueError(f"prune_structured: found no prunable {'/'.join(kinds)} group in {type(model).__name__} "
                         f"(consecutive Linear/Conv2d layers in an nn.Sequential, or transformer MLPs/attention)")
    mods = dict(model.named_modules())
    if criterion == "taylor":
        scores = _taylor_scores(model, groups, loader, loss_fn)
    else:
        scores = [_norm_scores(g, mods, 1 if criterion == "l1" else 2) for g in groups]
    for g, score in zip(groups, scores):
        frac = head_amount if g.kind == "heads" else amount
        n_keep = max(1, g.size - int(round(frac * g.size)))
        keep = torch.sort(torch.argsort(score.cpu(), descending=True, stable=True)[:n_keep]).values
        if n_keep < g.size:
            _apply_cut(model, g, keep)
        if report is not None:
            report.append({"group": g.name, "kind": g.kind, "before": g.size, "after": n_keep,
                           "producers": g.producers, "consumers": g.consumers, "unit": g.consumer_unit,
                           "kept": keep.tolist()})
    return model
