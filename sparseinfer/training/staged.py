"""Staged compression recipes (prune -> recover -> quantize) written as data, with the metrics of
every stage recorded.

    result = si.run_stages(model, [
        {"prune": "sparsegpt:2:4"},                                   # zero weights in the dense model
        {"distill": {"epochs": 5, "lr": 5e-4, "temperature": 4}},     # recover, keeping the 2:4 mask
        {"compress": "2:4+int8"},                                     # pack (must be last)
    ], calib=calib, loader=train_loader, evaluate=lambda m: {"acc": accuracy(m)})
    print(result)            # one row per stage: seconds, size, zeros, your metrics
    result.model             # the final model

A stage is a mapping with one action key and an optional ``name``:

    prune       recipe (string / dict)  ``prune()``: a recipe's prune step (magnitude, wanda, sparsegpt)
                                        applied to the dense model -- exact zeros, nothing packed
    structured  kwargs of ``prune_structured`` (amount, criterion, head_amount, kinds)
    gradual     {"recipe", "epochs", "criterion", "every", + distill kwargs}: gradual magnitude or
                movement pruning during distillation from the teacher
    distill     kwargs of ``distill`` (epochs, lr, temperature, alpha, qat, features, ...)
    compress    recipe: ``compress()``; packs the model, so only ``recover`` stages may follow it
    recover     kwargs of ``recover`` (steps, lr, temperature, hidden_weight, checkpoint, ...):
                distillation of a compressed causal LM from the teacher with its masks and
                quantization grids fixed (sparseinfer.training.recover); batches from ``loader``

The stages may also be given as {"stages": [...]} or as a YAML / JSON file holding either.
The teacher (for ``distill`` and ``gradual``) defaults to a frozen copy of the input model.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import compress
from ..passes import METHODS
from ..passes.calibration import sync_weights
from ..passes.pipeline import targets as recipe_targets
from ..passes.prune import nm_magnitude_mask
from ..passes.wanda import apply_mask, prune_spec
from ..recipe import Recipe
from .distill import distill
from .movement import GradualPruner
from .recover import recover
from .structured import prune_structured

ACTIONS = ("prune", "structured", "gradual", "distill", "compress", "recover")


def prune(model: nn.Module, recipe, calib=None, *, inplace: bool = False) -> nn.Module:
    """Run the prune step of ``recipe`` on the layers it selects and leave the result in the dense
    model (pruned weights exactly 0; N:M layers keep at most N of every M); nothing is packed, so
    the model can be fine-tuned or distilled next. Returns the model (a copy unless ``inplace``)."""
    recipe = Recipe.from_any(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    targets = [t for t in recipe_targets(model, recipe) if prune_spec(t) is not None]
    if not targets:
        raise ValueError(f"prune: recipe {recipe.to_json()!r} selects no nn.Linear / nn.Conv2d layer of "
                         f"{type(model).__name__} to prune (it needs 'N:M' or 'sparseXX')")
    if calib is None and any(METHODS[t.recipe.prune_method].needs_calibration for t in targets):
        raise ValueError(f"prune: recipe {recipe.to_json()!r} needs calibration data: pass calib=[batch, ...]")
    for method in sorted({t.recipe.prune_method for t in targets}):
        METHODS[method].run([t for t in targets if t.recipe.prune_method == method], calib, model)
    for t in targets:
        spec = prune_spec(t)
        if "n" in spec:  # magnitude leaves N:M to pack's selection: make it explicit here
            t.weight = apply_mask(t.weight, nm_magnitude_mask(t.weight, spec["n"], spec["m"]))
    sync_weights(targets)
    return model


@dataclass
class StagedResult:
    model: nn.Module
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per stage, the input first

    def __str__(self) -> str:
        cols: list[str] = []
        for row in self.metrics:
            cols += [c for c in row if c not in cols]
        cells = [[_fmt(row.get(c, "")) for c in cols] for row in self.metrics]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
        return "\n".join([line(cols), *(line(r) for r in cells)])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and buffers, packed weights as stored), shared once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weight_zeros(model: nn.Module) -> float | None:
    """Fraction of exact zeros over the dense nn.Linear / nn.Conv2d weights (None if there are none)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total if total else None


def load_stages(stages) -> list[dict]:
    """Normalise stages from a list, {"stages": [...]}, or a YAML / JSON path; validates them."""
    if isinstance(stages, (str, Path)):
        path = Path(stages)
        if not path.is_file():
            raise ValueError(f"stages file {str(path)!r} does not exist")
        if path.suffix == ".json":
            stages = json.loads(path.read_text())
        else:
            import yaml

            stages = yaml.safe_load(path.read_text())
    if isinstance(stages, dict):
        if set(stages) != {"stages"}:
            raise ValueError(f"stages: a mapping must hold only 'stages', got keys {sorted(stages)}")
        stages = stages["stages"]
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError("stages: expected a non-empty list of stages, e.g. [{'prune': 'wanda:2:4'}, "
                         "{'distill': {'epochs': 2}}, {'compress': '2:4+int8'}]")
    out = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            raise ValueError(f"stage {i}: expected a mapping like {{'prune': 'wanda:2:4'}}, got {type(st).__name__}")
        actions = [k for k in st if k in ACTIONS]
        unknown = set(st) - set(ACTIONS) - {"name"}
        if unknown or len(actions) != 1:
            raise ValueError(f"stage {i}: needs exactly one of {list(ACTIONS)} (and optionally 'name'); got keys "
                             f"{sorted(st)}")
        action = actions[0]
        args = st[action]
        if action in ("prune", "compress"):
            Recipe.from_any(args)  # parse now: a bad recipe fails before any work is done
        elif not isinstance(args, dict):
            raise ValueError(f"stage {i} ({action}): expected a mapping of arguments, got {type(args).__name__}")
        out.append({"name": st.get("name", action), "action": action, "args": args})
    actions = [st["action"] for st in out]
    if "compress" in actions:
        i = actions.index("compress")
        if any(a != "recover" for a in actions[i + 1:]):
            raise ValueError(f"stage {i}: 'compress' packs the model; only 'recover' stages may follow it, got "
                             f"{actions[i + 1:]}")
    return out


def run_stages(model: nn.Module, stages, *, calib=None, loader=None, teacher: nn.Module | None = None,
               evaluate: Callable[[nn.Module], dict] | None = None, inplace: bool = False,
               progress: bool | None = None) -> StagedResult:
    """Run staged ``stages`` (see the module docstring) on ``model`` (a copy unless ``inplace``).

    calib: calibration batches for prune / compress stages that need them. loader: training batches
    for distill / gradual / structured-taylor stages. evaluate(model) -> dict of metrics, recorded for
    the input and after every stage (with seconds, bytes and the fraction of zero weights).
    """
    plan = load_stages(stages)
    needs_loader = [s["name"] for s in plan if s["action"] in ("distill", "gradual", "recover") or
                    (s["action"] == "structured" and s["args"].get("criterion") == "taylor")]
    if needs_loader and loader is None:
        raise ValueError(f"stages {needs_loader} train the model: pass loader=[batches]")
    if not inplace:
        model = copy.deepcopy(model)
    if teacher is None and any(s["action"] in ("distill", "gradual", "recover") for s in plan):
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    show = sys.stderr.isatty() if progress is None else progress  # like tqdm's disable=None
    result = StagedResult(model)

    def record(name: str, action: str, seconds: float, extra: dict | None = None) -> None:
        row = {"stage": name, "action": action, "seconds": round(seconds, 2), "MB": model_bytes(result.model) / 1e6}
        zeros = weight_zeros(result.model)
        if zeros is not None:
            row["zeros"] = zeros
        row.update(extra or {})
        if evaluate is not None:
            was = result.model.training
            result.model.eval()
            with torch.no_grad():
                row.update(evaluate(result.model))
            result.model.train(was)
        result.metrics.append(row)
        if show:
            tqdm.write("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))

    record("input", "-", 0.0)
    for i, st in enumerate(tqdm(plan, desc="stages", unit="stage", disable=not show)):
        action, args, t0 = st["action"], st["args"], time.perf_counter()
        extra: dict[str, Any] = {}
        try:
            if action == "prune":
                result.model = prune(result.model, args, calib, inplace=True)
            elif action == "structured":
                report: list = []
                result.model = prune_structured(result.model, inplace=True, loader=loader, report=report, **args)
                extra["groups_cut"] = sum(r["after"] < r["before"] for r in report)
            elif action == "distill":
                res = distill(result.model, teacher, loader, progress=False, **args)
                extra["loss"] = res.history[-1]["loss"]
            elif action == "gradual":
                args = dict(args)
                recipe, epochs = args.pop("recipe"), args.pop("epochs", 1)
                try:
                    steps = epochs * len(loader)
                except TypeError:
                    raise ValueError(f"stage {i} (gradual): the loader has no len(); give it one") from None
                pruner = GradualPruner(result.model, recipe, end=max(1, int(steps * args.pop("end_fraction", 0.75))),
                                       every=args.pop("every", 1), criterion=args.pop("criterion", "magnitude"))
                try:
                    res = distill(result.model, teacher, loader, epochs=epochs, callbacks=[pruner.step],
                                  keep_sparsity=False, progress=False, **args)
                finally:
                    pruner.finish()
                extra["loss"] = res.history[-1]["loss"]
            elif action == "recover":
                res = recover(result.model, teacher, loader, inplace=True, progress=False, **args)
                result.model = res.model
                extra["loss"] = res.history[-1]["loss"] if res.history else float("nan")
            else:
                result.model = compress(result.model, args, calib=calib, inplace=True, progress=False)
        except TypeError as err:  # an unknown or misspelt argument in the stage
            raise ValueError(f"stage {i} ({st['name']}): {err}") from err
        record(st["name"], action, time.perf_counter() - t0, extra)
    return result
