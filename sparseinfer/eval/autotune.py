"""Choose a per-layer recipe that meets a quality budget at the lowest measured cost.

``choose_recipe(model, data, budget=0.01)`` returns the dict recipe ``compress`` accepts
(``{"default": "dense", "layers": {name: format}}``) whose quality drop on ``data`` is at most
``budget`` (see ``sparseinfer.eval.metrics`` for what the drop is per task: 0.01 = one point of
accuracy) and whose cost is as low as the search finds. The cost is, per ``minimize``:

* ``"latency"`` (default): each layer timed on this machine, on the input it sees when the
  model runs ``latency_inputs``, dense and in every candidate format;
* ``"size"``: each layer's bytes (packed tensors + bias);
* a callable ``cost(name, module, x) -> float`` for anything else.

The search:

1. per layer and candidate, the cost and the damage when that layer alone is compressed
   (the evaluation's ``divergence``, a continuous distance between the outputs: one layer
   rarely flips a prediction, so the accuracy drop alone would rank nothing); candidates no
   cheaper than dense for a layer are dropped there;
2. a path from all dense to every layer at its cheapest option: at each step the (layer,
   format) change that saves the most cost per unit of added damage;
3. binary search along the path for the longest prefix whose *whole-model* drop, measured,
   is within ``budget`` (about log2(steps) compressions and evaluations; damage is not
   additive, so only measured drops decide);
4. for latency, time the whole chosen model against the dense one and keep the faster.

The drop is measured on ``data``, which also chose the recipe, so it is optimistic: hold out
another set to report the final quality, and with few samples pass ``conservative=True``
(classification) to bound the drop by its 95% interval rather than its point estimate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..passes.pipeline import RECIPE_ATTR, compress_with_recipe
from .data import as_batches, call_model
from .metrics import Evaluation, collect, compare
from .sensitivity import compressed_layers, compressible_layers, swapped
from .sweeps import measure_latencies, measure_latency, model_size

DEFAULT_CANDIDATES = ("int8", "int4", "2:4+int8", "2:4+int4")


@dataclass
class TuneResult:
    """What ``tune`` chose and why."""

    recipe: dict  # {"default": "dense", "layers": {name: format}}
    model: nn.Module  # the compressed model (the verified one)
    evaluation: Evaluation | None  # of ``model`` against the original (None when all dense)
    minimize: str
    cost: float  # estimated total cost of the chosen layers (sum over layers)
    dense_cost: float
    size_bytes: int
    dense_size_bytes: int
    latency_ms: float | None = None  # whole model, when minimize == "latency"
    dense_latency_ms: float | None = None
    table: list[dict] = field(default_factory=list)  # per (layer, format): cost, drop
    log: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-able summary (no model)."""
        return {"recipe": self.recipe, "minimize": self.minimize, "cost": self.cost, "dense_cost": self.dense_cost,
                "size_bytes": self.size_bytes, "dense_size_bytes": self.dense_size_bytes,
                "latency_ms": self.latency_ms, "dense_latency_ms": self.dense_latency_ms,
                "drop": None if self.evaluation is None else self.evaluation.drop,
                "quality": None if self.evaluation is None else self.evaluation.quality, "log": self.log}

    def __str__(self) -> str:
        chosen = self.recipe["layers"]
        counts: dict[str, int] = {}
        for fmt in chosen.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        parts = [f"{len(chosen)} of {len({r['layer'] for r in self.table}) or len(chosen)} layers compressed "
                 f"({', '.join(f'{n} {f}' for f, n in sorted(counts.items())) or 'none'})",
                 f"size {self.size_bytes / 1e6:.2f} MB vs {self.dense_size_bytes / 1e6:.2f} MB dense"]
        if self.latency_ms is not None:
            parts.append(f"latency {self.latency_ms:.2f} ms vs {self.dense_latency_ms:.2f} ms dense")
        if self.evaluation is not None:
            parts.append(f"{self.evaluation['quality_name']} {self.evaluation.quality:.4f} "
                         f"(drop {self.evaluation.drop:+.4f})")
        return "; ".join(parts)


def _module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _layer_inputs(model: nn.Module, layers: list[str], inputs) -> dict[str, torch.Tensor]:
    """The input each layer sees when ``model`` runs ``inputs`` (first call of each layer)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.setdefault(n, args[0].detach().clone())) for n in layers]
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ValueError(f"autotune: layers {missing[:5]} are not called by the model on the latency inputs")
    return seen


def _cost_fn(minimize, warmup: int, repeat: int):
    """``costs(name, {option: module}, x) -> {option: cost}`` for one layer's options."""
    if callable(minimize):
        return lambda name, modules, x: {k: float(minimize(name, m, x)) for k, m in modules.items()}
    if minimize == "size":
        return lambda name, modules, x: {k: float(_module_bytes(m)) for k, m in modules.items()}
    if minimize == "latency":  # one layer's options timed together, in interleaved rounds
        return lambda name, modules, x: dict(zip(modules, (t * 1e3 for t in measure_latencies(
            list(modules.values()), x, warmup=warmup, repeat=repeat))))
    raise ValueError(f"autotune: minimize must be 'latency', 'size' or a callable, got {minimize!r}")


def _path(options: dict[str, dict[str, tuple[float, float]]]) -> list[tuple[str, str]]:
    """Order the moves from all dense to every layer at its cheapest option. options:
    {layer: {format: (cost, damage)}} including "dense"; each move is (layer, format) and
    takes the change with the most cost saved per unit of added damage (a change that adds no
    damage first, the largest saving first among those)."""
    choice = {layer: "dense" for layer in options}
    moves = []
    while True:
        best = None
        for layer, opts in options.items():
            cost0, damage0 = opts[choice[layer]]
            for fmt, (cost, damage) in opts.items():
                saving, extra = cost0 - cost, damage - damage0
                if saving <= 0:
                    continue
                key = (True, saving, 0.0) if extra <= 0 else (False, saving / extra, saving)
                if best is None or key > best[0]:
                    best = (key, layer, fmt)
        if best is None:
            return moves
        _, layer, fmt = best
        choice[layer] = fmt
        moves.append((layer, fmt))


def _recipe_at(moves: list[tuple[str, str]], k: int) -> dict:
    """The recipe after the first ``k`` moves (a layer's later move overrides its earlier one)."""
    layers: dict[str, str] = {}
    for layer, fmt in moves[:k]:
        layers[layer] = fmt
    return {"default": "dense", "layers": layers}


def tune(model: nn.Module, data, budget: float = 0.01, candidates=DEFAULT_CANDIDATES, *, minimize="latency",
         calib=None, latency_inputs=None, task: str = "auto", warmup: int = 3, repeat: int = 15,
         backend: str | None = None, conservative: bool = False, progress: bool | None = None) -> TuneResult:
    """Search a per-layer recipe (see the module docstring) and return it with the evidence.

    backend: pin compressed layers to one backend (as ``compress(backend=)``), timed as such.
    conservative: for classification with labels, a step passes only when the upper end of
    the paired 95% interval of the accuracy drop is within ``budget`` (not the point estimate)."""
    if not isinstance(budget, (int, float)) or budget < 0:
        raise ValueError(f"autotune: budget must be a non-negative number (allowed quality drop), got {budget!r}")
    candidates = [candidates] if isinstance(candidates, str) else list(candidates)
    if not candidates:
        raise ValueError("autotune: no candidate formats")
    costs_of = _cost_fn(minimize, warmup, repeat)
    mode = minimize if isinstance(minimize, str) else getattr(minimize, "__name__", "custom")
    batches = as_batches(data)
    layers = compressible_layers(model, candidates[0])
    if not layers:
        raise ValueError(f"autotune: {type(model).__name__} has no layer to compress")
    reference = collect(model, batches, task=task)
    inputs = batches[0].inputs if latency_inputs is None else latency_inputs
    xs = _layer_inputs(model, layers, inputs)
    log: list[str] = []
    disable = None if progress is None else not progress

    # 1. cost and one-layer damage of every (layer, candidate)
    replacements = {fmt: compressed_layers(model, fmt, layers, calib, backend) for fmt in candidates}
    options: dict[str, dict[str, tuple[float, float]]] = {}
    table = []
    was_training = model.training
    model.eval()
    try:
        for layer in tqdm(layers, desc="autotune", unit="layer", disable=disable):
            costs = costs_of(layer, {"dense": model.get_submodule(layer),
                                     **{fmt: replacements[fmt][layer] for fmt in candidates}}, xs[layer])
            options[layer] = {"dense": (costs["dense"], 0.0)}
            for fmt in candidates:
                row = {"layer": layer, "format": fmt, "cost": costs[fmt], "dense_cost": costs["dense"], "drop": None,
                       "divergence": None}
                if costs[fmt] < costs["dense"]:  # only a cheaper option is worth its quality drop
                    with swapped(model, layer, replacements[fmt][layer]):
                        ev = compare(reference, collect(model, batches, task=reference.task))
                    row["drop"], row["divergence"] = ev.drop, ev["divergence"]
                    options[layer][fmt] = (costs[fmt], ev["divergence"])
                table.append(row)
    finally:
        model.train(was_training)
    del replacements
    cheaper = sum(len(o) - 1 for o in options.values())
    log.append(f"{cheaper} of {len(layers) * len(candidates)} (layer, format) options cost less than dense "
               f"({mode})")

    # 2-3. the path from dense to cheapest, and the longest prefix that measures within budget
    moves = _path(options)
    measured: dict[int, tuple[dict, nn.Module, Evaluation]] = {}

    def within(k: int) -> bool:
        recipe = _recipe_at(moves, k)
        candidate = compress_with_recipe(model, recipe, calib, backend=backend, progress=False)
        ev = compare(reference, collect(candidate, batches, task=reference.task))
        drop = ev["accuracy_drop_ci"][1] if conservative and "accuracy_drop_ci" in ev else ev.drop
        what = "drop (95% upper bound)" if conservative and "accuracy_drop_ci" in ev else "drop"
        log.append(f"{k} of {len(moves)} steps ({len(recipe['layers'])} layers compressed): {what} {drop:.4g} "
                   f"{'<=' if drop <= budget else '>'} {budget:.4g}")
        if drop <= budget:
            measured.clear()  # accepted prefixes only grow: keep the latest model alone
            measured[k] = (recipe, candidate, ev)
            return True
        return False

    best = 0
    if moves and not within(len(moves)):
        lo, hi = 1, len(moves) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if within(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
    elif moves:
        best = len(moves)
    dense_cost = sum(o["dense"][0] for o in options.values())
    if best:
        chosen, compressed, evaluation = measured[best]
    else:
        chosen, compressed, evaluation = {"default": "dense", "layers": {}}, model, None
        log.append("no step fits the budget: keeping the model dense" if moves else "nothing to try: keeping dense")
    cost = sum(options[n][chosen["layers"].get(n, "dense")][0] for n in layers)

    # 4. latency of the whole model, measured
    latency = dense_latency = None
    if mode == "latency":
        if chosen["layers"]:
            dense_latency, latency = (t * 1e3 for t in measure_latencies([model, compressed], inputs, warmup=warmup,
                                                                         repeat=repeat))
            if latency >= dense_latency:
                log.append(f"whole model: {latency:.2f} ms compressed vs {dense_latency:.2f} ms dense: keeping dense")
                chosen, compressed, evaluation, latency, cost = {"default": "dense", "layers": {}}, model, None, \
                    dense_latency, dense_cost
        else:
            dense_latency = latency = measure_latency(model, inputs, warmup=warmup, repeat=repeat) * 1e3
    if not chosen["layers"]:
        compressed = copy.deepcopy(model)  # never hand back the caller's own module
        setattr(compressed, RECIPE_ATTR, chosen)
    return TuneResult(chosen, compressed, evaluation, mode, cost, dense_cost, model_size(compressed)["total_bytes"],
                      model_size(model)["total_bytes"], latency, dense_latency, table, log)


def choose_recipe(model: nn.Module, data, budget: float = 0.01, candidates=DEFAULT_CANDIDATES, **kwargs) -> dict:
    """The per-layer recipe dict ``compress`` accepts (see the module docstring; keyword
    arguments as for ``tune``)."""
    return tune(model, data, budget, candidates, **kwargs).recipe


def _parse_target(target) -> dict:
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return {"max_drop": float(target)}
    if isinstance(target, str):
        if target not in ("latency", "size"):
            raise ValueError(f"target: a string target must be 'latency' or 'size', got {target!r}")
        return {"minimize": target}
    if isinstance(target, dict):
        unknown = set(target) - {"max_drop", "minimize", "candidates"}
        if unknown:
            raise ValueError(f"target: unknown keys {sorted(unknown)}; expected max_drop, minimize, candidates")
        return dict(target)
    raise ValueError(f"target must be a number (allowed quality drop), 'latency' / 'size', or a dict, "
                     f"got {type(target).__name__}")


def compress_to_target(model: nn.Module, target, data, *, calib=None, candidates=None, **kwargs) -> nn.Module:
    """Compress ``model`` with the cheapest per-layer recipe found that meets ``target``.

    target: the allowed quality drop (0.01), "latency" / "size" (what to minimise, drop 0.01),
    or {"max_drop": 0.01, "minimize": "latency", "candidates": [...]}. data: evaluation batches
    (see ``sparseinfer.eval.data``); calib: calibration batches for candidates that need them.
    The returned model carries the search's summary as ``model.sparseinfer_tune``."""
    if data is None:
        raise ValueError("compress(target=...) needs data= to measure quality on (batches, or (inputs, labels))")
    spec = _parse_target(target)
    result = tune(model, data, spec.get("max_drop", 0.01),
                  candidates or spec.get("candidates") or DEFAULT_CANDIDATES,
                  minimize=spec.get("minimize", "latency"), calib=calib, **kwargs)
    result.model.sparseinfer_tune = result.summary()
    return result.model
