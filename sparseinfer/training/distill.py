"""Knowledge distillation and quantization-aware training (QAT) for recovering compressed models.

    result = si.distill(student, teacher, loader, epochs=3, temperature=4.0, alpha=0.7)
    result.history          # per epoch: loss and each component (and eval_fn's metrics)

Loss per batch (each term only when it applies)::

    alpha       * T^2 * KL(softmax(teacher / T) || softmax(student / T))     soft targets (Hinton et al.)
    (1 - alpha) * cross_entropy(student, labels)                             hard labels, when the batch has them
    feature_weight  * sum over pairs  MSE(proj(student feature), teacher feature)          (FitNets)
    relation_weight * sum over pairs  MSE(S_s, S_t), S = row-normalised f f^T per batch    (similarity-preserving)

The T^2 factor keeps the soft term's gradients on the scale of the hard term's as T changes.
``output_loss="mse"`` or ``"cosine"`` replaces the KL term for models whose outputs are not logits
(sentence embeddings). Feature pairs name a student module and a teacher module (their outputs are
matched); a learned linear projection bridges different widths.

The student's sparsity is kept (``keep_sparsity=True``): weights that are exactly zero in a pruned
nn.Linear / nn.Conv2d at the start stay zero (their gradients and values are masked after every
step), so a 2:4 student remains 2:4.

QAT: ``qat="2:4+int8"`` (any recipe; its formats, not its methods) fake-quantizes the matching
layers during training with a straight-through estimator: the forward uses exactly
``pack(w, fmt).to_dense()``, the backward treats the rounding as identity. At the end the weights
are left *on the grid*, so ``si.compress(student, same recipe)`` packs them without further loss
(packing is idempotent) and the packed model computes what the QAT model computed.
``prepare_qat`` / ``finish_qat`` do the same around a training loop of your own.

Batches: ``(inputs, labels)`` tuples (as a DataLoader over a TensorDataset yields), a mapping of
keyword inputs (a ``labels`` key is taken as labels), or inputs alone (no hard loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..formats import pack
from ..passes.calibration import call_model
from ..passes.pipeline import fit_groups, recipe_layers
from ..passes.prune import magnitude_mask

# -- QAT -----------------------------------------------------------------------------------------


class FakePack(nn.Module):
    """Weight parametrization: forward = the packed format's dequantized weight, gradient = identity
    (straight-through). Works on the GEMM form [out, in * kh * kw] of conv weights."""

    def __init__(self, fmt: str, params: dict, sparsity: float | None = None):
        super().__init__()
        self.fmt, self.params, self.sparsity = fmt, dict(params), sparsity

    def project(self, w: torch.Tensor) -> torch.Tensor:
        """The dense weight ``pack`` would store for ``w`` (no gradient)."""
        with torch.no_grad():
            w2 = w.detach().reshape(w.shape[0], -1).float()
            if self.sparsity is not None:
                w2 = w2 * magnitude_mask(w2, self.sparsity)
            return pack(w2, self.fmt, **self.params).to_dense().reshape(w.shape).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.project(w) - w).detach()

    def extra_repr(self) -> str:
        return f"fmt={self.fmt!r}, params={self.params}"


def prepare_qat(model: nn.Module, recipe) -> list[str]:
    """Fake-quantize (in place) the layers ``recipe`` selects; returns their names."""
    names = []
    for name, module, layer_recipe in recipe_layers(model, recipe, require=True):
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"prepare_qat: layer {name!r} is already parametrized (prepare_qat called twice?)")
        layer_recipe = fit_groups(layer_recipe, module.weight[0].numel())
        parametrize.register_parametrization(
            module, "weight", FakePack(layer_recipe.fmt, layer_recipe.params, layer_recipe.sparsity))
        names.append(name)
    return names


def finish_qat(model: nn.Module) -> None:
    """Remove the fake-quant parametrizations, leaving every weight on its format's grid."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, FakePack) for p in module.parametrizations["weight"]):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


# -- distillation --------------------------------------------------------------------------------


@dataclass
class DistillResult:
    student: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch

    def __str__(self) -> str:
        return "\n".join(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                         for row in self.history)


def output_tensor(out: Any) -> torch.Tensor:
    """Logits (or the main output) of a model call: a tensor, ``.logits``, ``.last_hidden_state``,
    or the first item of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"distill: cannot find the output tensor in a {type(out).__name__}")


def split_labels(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        if "labels" in batch:
            return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        return batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(f"distill: a batch tuple must be (inputs, labels) or (inputs,), got {len(batch)} items")
    return batch, None


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), averaged over rows (all dims but the last)."""
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def relation_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """MSE between the row-normalised batch similarity matrices of two feature batches."""
    gs = F.normalize(fs.reshape(fs.shape[0], -1) @ fs.reshape(fs.shape[0], -1).T, dim=1)
    gt = F.normalize(ft.reshape(ft.shape[0], -1) @ ft.reshape(ft.shape[0], -1).T, dim=1)
    return F.mse_loss(gs, gt)


class _Features:
    """Forward hooks recording the output tensor of named modules."""

    def __init__(self, model: nn.Module, names: list[str], who: str):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"distill: {who} has no module {missing}; its modules include "
                             f"{[n for n in modules if n][:8]}")
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, out):
            self.values[name] = output_tensor(out)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _sparsity_masks(model: nn.Module, min_sparsity: float = 0.05) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, keep-mask) for every Linear / Conv2d weight with at least ``min_sparsity`` zeros."""
    out = []
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        p = module.parametrizations["weight"].original if parametrize.is_parametrized(module, "weight") \
            else module.weight
        keep = p.detach() != 0
        if (~keep).float().mean().item() >= min_sparsity:
            out.append((p, keep))
    return out


def distill(student: nn.Module, teacher: nn.Module, loader, *, epochs: int = 1, lr: float = 1e-4,
            optimizer: torch.optim.Optimizer | None = None, temperature: float = 2.0, alpha: float = 0.5,
            output_loss: str = "kl", features: dict[str, str] | None = None, feature_weight: float = 1.0,
            relation_weight: float = 0.0, keep_sparsity: bool = True, qat=None,
            eval_fn: Callable[[nn.Module], dict] | None = None, callbacks: list[Callable[[], None]] | None = None,
            max_steps: int | None = None, progress: bool | None = None) -> DistillResult:
    """Train ``student`` (in place) to match ``teacher`` on the batches of ``loader``.

    temperature, alpha: soft-target KL at temperature T weighted alpha (times T^2), hard-label cross
    entropy weighted 1 - alpha when batches carry labels. output_loss: "kl" (logits), "mse" or
    "cosine" (embeddings). features: {student module name: teacher module name} pairs matched with
    MSE (after a learned projection when widths differ); relation_weight > 0 adds the batch
    similarity loss on the same pairs. keep_sparsity: pruned weights stay zero. qat: a recipe whose
    formats are fake-quantized with a straight-through estimator (weights end on the grid).
    eval_fn(student) -> dict of metrics, recorded after every epoch. callbacks: called with no
    argument after every optimizer step (e.g. ``GradualPruner.step``). max_steps: stop early.
    Returns a DistillResult.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise ValueError("distill: student and teacher must be nn.Modules")
    if epochs < 1 or not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"distill: need epochs >= 1, 0 <= alpha <= 1, temperature > 0; got epochs={epochs}, "
                         f"alpha={alpha}, temperature={temperature}")
    if output_loss not in ("kl", "mse", "cosine"):
        raise ValueError(f"distill: output_loss must be 'kl', 'mse' or 'cosine', got {output_loss!r}")
    if isinstance(loader, (torch.Tensor, Mapping)) or loader is None:
        raise ValueError("distill: loader must be an iterable of batches (e.g. a DataLoader), got "
                         f"{type(loader).__name__}")
    pairs = list((features or {}).items())
    if relation_weight > 0 and not pairs:
        raise ValueError("distill: relation_weight > 0 needs feature pairs (features={student_module: teacher_module})")
    if qat is not None:
        prepare_qat(student, qat)
    masks = _sparsity_masks(student) if keep_sparsity else []
    fs = _Features(student, [s for s, _ in pairs], "the student")
    ft = _Features(teacher, [t for _, t in pairs], "the teacher")
    projections = nn.ModuleDict()
    device = next(student.parameters()).device
    teacher_was_training = teacher.training
    teacher.eval()
    history: list[dict[str, float]] = []
    opt = optimizer
    step = 0
    try:
        bar = tqdm(range(epochs), desc="distill", unit="epoch", disable=None if progress is None else not progress)
        for epoch in bar:
            student.train()
            sums: dict[str, float] = {}
            batches = 0
            for batch in loader:
                inputs, labels = split_labels(batch)
                with torch.no_grad():
                    t_out = output_tensor(call_model(teacher, inputs))
                s_out = output_tensor(call_model(student, inputs))
                if s_out.shape != t_out.shape:
                    raise ValueError(f"distill: student output {tuple(s_out.shape)} and teacher output "
                                     f"{tuple(t_out.shape)} differ")
                terms: dict[str, torch.Tensor] = {}
                if output_loss == "kl":
                    terms["soft"] = alpha * soft_target_loss(s_out, t_out, temperature)
                elif output_loss == "mse":
                    terms["soft"] = alpha * F.mse_loss(s_out, t_out)
                else:
                    terms["soft"] = alpha * (1 - F.cosine_similarity(s_out, t_out, dim=-1)).mean()
                if labels is not None and alpha < 1:
                    labels = labels.to(s_out.device)
                    terms["hard"] = (1 - alpha) * F.cross_entropy(s_out.reshape(-1, s_out.shape[-1]),
                                                                  labels.reshape(-1))
                for s_name, t_name in pairs:
                    a, b = fs.values[s_name], ft.values[t_name].detach()
                    if a.shape[-1] != b.shape[-1]:
                        key = s_name.replace(".", "__")
                        if key not in projections:
                            projections[key] = nn.Linear(a.shape[-1], b.shape[-1], bias=False).to(device)
                            if opt is not None:
                                opt.add_param_group({"params": projections[key].parameters()})
                        a = projections[key](a)
                    if a.shape != b.shape:
                        raise ValueError(f"distill: feature {s_name!r} {tuple(a.shape)} vs teacher {t_name!r} "
                                         f"{tuple(b.shape)}: shapes differ beyond the last dim")
                    terms["feature"] = terms.get("feature", 0) + feature_weight * F.mse_loss(a, b)
                    if relation_weight > 0:
                        terms["relation"] = terms.get("relation", 0) + relation_weight * relation_loss(
                            fs.values[s_name], b)
                loss = sum(terms.values())
                if opt is None:
                    opt = torch.optim.Adam([*student.parameters(), *projections.parameters()], lr=lr)
                opt.zero_grad()
                loss.backward()
                for p, keep in masks:
                    if p.grad is not None:
                        p.grad.mul_(keep)
                opt.step()
                with torch.no_grad():
                    for p, keep in masks:
                        p.mul_(keep)
                for callback in callbacks or ():
                    callback()
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
                batches += 1
                step += 1
                if max_steps is not None and step >= max_steps:
                    break
            if batches == 0:
                raise ValueError("distill: the loader yielded no batches")
            row = {"epoch": epoch + 1, **{k: v / batches for k, v in sums.items()}}
            student.eval()
            if eval_fn is not None:
                row.update(eval_fn(student))
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            if max_steps is not None and step >= max_steps:
                break
    finally:
        fs.remove()
        ft.remove()
        teacher.train(teacher_was_training)
        if qat is not None:
            finish_qat(student)
    student.eval()
    return DistillResult(student, history)
