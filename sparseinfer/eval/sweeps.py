"""Sweeps: a grid of recipes measured for size, quality and latency on this machine, the Pareto
frontier over the three, its knee, a plot and a report.

* **size**: ``explain(model)`` packed bytes plus every parameter and buffer left dense.
* **quality**: ``evaluate(original, compressed, data).quality`` (accuracy, agreement, mean
  cosine or perplexity ratio; see ``sparseinfer.eval.metrics``).
* **latency**: the model called on one batch here, after ``warmup`` calls, median of ``repeat``
  timed calls (each layer uses whatever ``si.backends()`` resolves on this machine). All the
  sweep's models are held and timed in interleaved rounds, so load from other processes
  spreads over them evenly.

The **Pareto frontier** is the set of recipes no other recipe beats on one objective without
losing on another (size lower, quality higher, latency lower). The **knee** is chosen on the
frontier only, by this rule:

1. normalise each objective over the frontier to [0, 1], 1 the best value, 0 the worst (an
   objective with one value everywhere is 1 for all);
2. take the extremes: for each objective the frontier point best on it;
3. the knee is the frontier point farthest from the line (2 extremes) or plane (3) through the
   extremes, on the side of the ideal point (1, 1, 1): where the trade-off bends most, as in
   "Kneedle" for two objectives and Das's normal-boundary rule for more;
4. when no point lies beyond that line or plane (e.g. every frontier point is an extreme), the
   knee is the point with the largest sum of normalised objectives.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backends import backends
from ..passes.pipeline import compress_with_recipe
from ..runtime.explain import explain
from ..runtime.modules import CompressedLinear
from .data import as_batches, call_model
from .metrics import collect, compare

OBJECTIVES = (("size_bytes", "min"), ("quality", "max"), ("latency_ms", "min"))


# -- measurements --------------------------------------------------------------------------------

def model_size(model: nn.Module) -> dict[str, int]:
    """{"packed_bytes", "dense_bytes", "total_bytes"}: the compressed layers' packed tensors
    (from ``explain``) and every other parameter and buffer, each shared tensor counted once."""
    packed = sum(r["packed_bytes"] for r in explain(model))
    skip = {id(b) for m in model.modules() if isinstance(m, CompressedLinear)
            for n, b in m.named_buffers(recurse=False) if n.startswith("packed_")}
    seen, dense = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in skip or id(t) in seen:
            continue
        seen.add(id(t))
        dense += t.numel() * t.element_size()
    return {"packed_bytes": packed, "dense_bytes": dense, "total_bytes": packed + dense}


def measure_latency(model: nn.Module, inputs, *, warmup: int = 2, repeat: int = 7) -> float:
    """Median wall time in seconds of ``model(inputs)`` (no grad) after ``warmup`` calls."""
    return measure_latencies([model], inputs, warmup=warmup, repeat=repeat)[0]


def measure_latencies(models, inputs, *, warmup: int = 2, repeat: int = 7, min_sample_s: float = 1e-2) -> list[float]:
    """Median seconds per call of each model on ``inputs``.

    Timed in interleaved rounds (one sample of each model per round), so that a burst of load
    from elsewhere on a shared machine hits every model alike instead of whichever happened to
    be running. A sample is ``number`` back-to-back calls, with ``number`` chosen after the
    warm-up so that a sample lasts at least ``min_sample_s`` (as ``timeit`` autoranges): a
    20-microsecond layer is not timed one call at a time."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f"measure_latency: need repeat >= 1 and warmup >= 0, got {repeat}, {warmup}")
    models = list(models)
    modes = [m.training for m in models]
    times: list[list[float]] = [[] for _ in models]
    numbers = []
    try:
        with torch.inference_mode():
            for m in models:
                m.eval()
                for _ in range(warmup):
                    call_model(m, inputs)
                start = time.perf_counter()
                call_model(m, inputs)
                one = time.perf_counter() - start
                numbers.append(max(1, min(1000, math.ceil(min_sample_s / max(one, 1e-9)))))
            for _ in range(repeat):
                for m, number, t in zip(models, numbers, times):
                    start = time.perf_counter()
                    for _ in range(number):
                        call_model(m, inputs)
                    t.append((time.perf_counter() - start) / number)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [statistics.median(t) for t in times]


def machine_info() -> dict[str, Any]:
    """Where the latencies were measured."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "backends": [n for n, b in backends().items() if b["available"]]}


# -- Pareto frontier and knee --------------------------------------------------------------------

def _oriented(points, senses) -> list[list[float]]:
    """Flip the "min" objectives so that larger is better everywhere."""
    if not senses or any(s not in ("min", "max") for s in senses):
        raise ValueError(f"senses must be a sequence of 'min' / 'max', got {senses!r}")
    out = []
    for p in points:
        if len(p) != len(senses):
            raise ValueError(f"point {p!r} has {len(p)} values for {len(senses)} objectives")
        if any(not math.isfinite(float(v)) for v in p):
            raise ValueError(f"point {p!r} has a value that is not finite")
        out.append([float(v) if s == "max" else -float(v) for v, s in zip(p, senses)])
    return out


def pareto_front(points, senses=("min", "max", "min")) -> list[int]:
    """Indices (in input order) of the points no other point dominates. A point dominates
    another when it is at least as good on every objective and better on one; equal points do
    not dominate each other, so both stay."""
    pts = _oriented(points, senses)
    front = []
    for i, p in enumerate(pts):
        dominated = any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p))
                        for j, q in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return front


def normalise(points, senses) -> torch.Tensor:
    """Each objective scaled over ``points`` to [0, 1] with 1 the best (1 everywhere if constant)."""
    x = torch.tensor(_oriented(points, senses), dtype=torch.float64)
    lo, hi = x.min(0).values, x.max(0).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.ones_like(x))


def knee_point(points, senses=("min", "max", "min")) -> int:
    """Index of the knee of ``points`` (all taken to be on the frontier; pass ``pareto_front``'s
    points). See the module docstring for the rule."""
    if not points:
        raise ValueError("knee_point: no points")
    x = normalise(points, senses)
    if len(points) <= 2:
        return int(x.sum(1).argmax())
    total = x.sum(1)
    extremes = []
    for j in range(x.shape[1]):
        best = x[:, j].max()
        ties = [i for i in range(len(points)) if x[i, j] == best]
        pick = max(ties, key=lambda i: (total[i].item() - x[i, j].item(), -i))
        if pick not in extremes:
            extremes.append(pick)
    if len(extremes) < 2:
        return int(total.argmax())
    base = x[extremes[0]]
    span = x[extremes[1:]] - base  # rows span the line / plane through the extremes
    _, s, vh = torch.linalg.svd(span, full_matrices=False)
    basis = vh[s > 1e-12 * max(1.0, s.max().item())]

    def residual(v: torch.Tensor) -> torch.Tensor:
        d = v - base
        return d - (d @ basis.T) @ basis

    towards_ideal = residual(torch.ones_like(base))
    dist = torch.stack([residual(x[i]).norm() * torch.sign(residual(x[i]) @ towards_ideal)
                        for i in range(len(points))])
    if dist.max() <= 1e-12:
        return int(total.argmax())
    best = dist.max()
    return max((i for i in range(len(points)) if dist[i] >= best - 1e-12), key=lambda i: (total[i].item(), -i))


# -- the sweep -----------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """One row per recipe (the dense original first), the frontier and the knee (row indices)."""

    rows: list[dict]
    front: list[int]
    knee: int
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"info": self.info, "front": self.front, "knee": self.knee, "rows": self.rows}

    def markdown(self) -> str:
        """The results as a markdown table (also what ``str()`` prints)."""
        q = self.info.get("quality_name", "quality")
        unit, scale = _size_unit(self.rows)
        head = f"| recipe | size ({unit}) | vs dense | {q} | drop | latency (ms) | speed-up | frontier |"
        lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for i, r in enumerate(self.rows):
            mark = "**knee**" if i == self.knee else "yes" if i in self.front else ""
            lines.append(f"| `{r['label']}` | {r['size_bytes'] * scale:.2f} | {r['compression']:.2f}x | "
                         f"{r['quality']:.4f} | {r['drop']:+.4f} | {r['latency_ms']:.2f} | {r['speedup']:.2f}x | "
                         f"{mark} |")
        return "\n".join(lines)

    __str__ = markdown


def _size_unit(rows) -> tuple[str, float]:
    """MB for models of a megabyte or more, else KB."""
    return ("MB", 1e-6) if max(r["size_bytes"] for r in rows) >= 1e6 else ("KB", 1e-3)


def _label(recipe) -> str:
    return recipe if isinstance(recipe, str) else json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def sweep(model: nn.Module, data, recipes, *, calib=None, latency_inputs=None, task: str = "auto",
          warmup: int = 2, repeat: int = 7, name: str | None = None, backend: str | None = None,
          progress: bool | None = None) -> SweepResult:
    """Compress ``model`` with each recipe and measure size, quality against ``model`` on
    ``data``, and latency on ``latency_inputs`` (default: the first batch's inputs).

    recipes: a list of recipes (strings or dicts), or a dict {label: recipe}. The dense model
    is always the first row ("dense"). calib: calibration batches for recipes that need them.
    backend: pin every compressed layer to one backend (default: the best available per call).
    """
    items = list(recipes.items()) if isinstance(recipes, dict) else [(_label(r), r) for r in recipes]
    if not items:
        raise ValueError("sweep: no recipes given")
    batches = as_batches(data)
    inputs = batches[0].inputs if latency_inputs is None else latency_inputs
    reference = collect(model, batches, task=task)
    dense_size = model_size(model)["total_bytes"]
    rows = [{"label": "dense", "recipe": "dense", "size_bytes": dense_size, "kernels": ["torch"],
             **_quality_fields(compare(reference, reference))}]
    models = [model]
    bar = tqdm(items, desc="sweep", unit="recipe", disable=None if progress is None else not progress)
    for label, recipe in bar:
        bar.set_postfix_str(label)
        compressed = compress_with_recipe(model, recipe, calib, backend=backend, progress=False)
        ev = compare(reference, collect(compressed, batches, task=reference.task))
        kernels = sorted({f"{r['format']}: {r['kernel']}" for r in explain(compressed, batch=_rows(inputs))})
        rows.append({"label": label, "recipe": recipe, "size_bytes": model_size(compressed)["total_bytes"],
                     "kernels": kernels, **_quality_fields(ev)})
        models.append(compressed)
    # all models are timed together, round by round (see measure_latencies)
    for r, t in zip(rows, measure_latencies(models, inputs, warmup=warmup, repeat=repeat)):
        r["latency_ms"] = t * 1e3
    del models
    for r in rows:
        r["compression"] = dense_size / r["size_bytes"]
        r["speedup"] = rows[0]["latency_ms"] / r["latency_ms"]
    points = [[r[k] for k, _ in OBJECTIVES] for r in rows]
    senses = [s for _, s in OBJECTIVES]
    front = pareto_front(points, senses)
    knee = front[knee_point([points[i] for i in front], senses)]
    for i, r in enumerate(rows):
        r["pareto"], r["knee"] = i in front, i == knee
    info = {"model": name or type(model).__name__, "task": reference.task, "samples": reference.n,
            "quality_name": rows[0]["quality_name"], "warmup": warmup, "repeat": repeat,
            "latency_batch": _describe(inputs), **machine_info()}
    return SweepResult(rows, front, knee, info)


def _quality_fields(ev) -> dict:
    keep = {k: v for k, v in ev.items() if k not in ("failures", "task", "n", "groups")}
    return {"quality_name": ev["quality_name"], "quality": ev["quality"], "drop": ev["drop"],
            "metrics": {k: list(v) if isinstance(v, tuple) else v for k, v in keep.items()}}


def _rows(inputs) -> int:
    """Rows a linear layer sees for these inputs: the tokens of token-id inputs, else the batch."""
    first = inputs if isinstance(inputs, torch.Tensor) else next(
        (v for v in (inputs.values() if isinstance(inputs, Mapping) else inputs) if isinstance(v, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        return 1
    if not first.is_floating_point():
        return first.numel()
    return max(1, first.numel() // first.shape[-1]) if first.dim() > 1 else first.shape[0]


def _describe(inputs) -> str:
    """"100x64", or "8x46 input_ids" for a mapping: the timed batch's shape."""
    if isinstance(inputs, torch.Tensor):
        return "x".join(map(str, inputs.shape))
    if isinstance(inputs, Mapping):
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                return f"{'x'.join(map(str, v.shape))} {k}"
    return type(inputs).__name__


# -- plot and report -----------------------------------------------------------------------------

def plot_sweep(result: SweepResult, path) -> Path:
    """Two panels, quality against size and against latency; frontier points filled and
    connected, the knee starred, every point labelled. Writes a PNG (matplotlib, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, q = result.rows, result.info.get("quality_name", "quality")
    unit, size_scale = _size_unit(rows)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, xlabel in zip(fig.subplots(1, 2), ("size_bytes", "latency_ms"), (f"size ({unit})", "latency (ms)")):
        scale = size_scale if key == "size_bytes" else 1.0
        xs = [r[key] * scale for r in rows]
        ys = [r["quality"] for r in rows]
        others = [i for i in range(len(rows)) if i not in result.front]
        ax.scatter([xs[i] for i in others], [ys[i] for i in others], c="0.6", label="dominated", zorder=2)
        ax.scatter([xs[i] for i in result.front], [ys[i] for i in result.front], c="tab:blue",
                   label="Pareto frontier", zorder=3)
        ax.scatter([xs[result.knee]], [ys[result.knee]], marker="*", s=320, c="tab:red",
                   label=f"knee: {rows[result.knee]['label']}", zorder=4)
        _annotate(ax, xs, ys, [r["label"] for r in rows])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(q)
        ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    info = result.info
    fig.suptitle(f"{info.get('model', '')}: {info.get('samples', '?')} samples; latency on "
                 f"{info.get('latency_batch', '')}, {info.get('torch_threads', '?')} thread(s) of "
                 f"{info.get('cores', '?')} cores, backends {', '.join(info.get('backends', []))}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _annotate(ax, xs, ys, labels) -> None:
    """Label each point; a label that would sit on an earlier one (in axis-normalised
    coordinates) moves below its point instead."""
    spans = [(max(v) - min(v)) or 1.0 for v in (xs, ys)]
    placed: list[tuple[float, float]] = []
    for x, y, label in zip(xs, ys, labels):
        near = any(abs(x - px) / spans[0] < 0.08 and abs(y - py) / spans[1] < 0.04 for px, py in placed)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -11) if near else (5, 4), fontsize=8)
        placed.append((x, y))


def write_report(result: SweepResult, out_dir, stem: str = "sweep") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.png``, ``<stem>.md`` and ``<stem>.html`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "png": out / f"{stem}.png", "md": out / f"{stem}.md",
             "html": out / f"{stem}.html"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n")
    plot_sweep(result, paths["png"])
    info, knee = result.info, result.rows[result.knee]
    summary = (f"{info.get('model')} ({info.get('task')}, {info.get('samples')} samples); latency: median of "
               f"{info.get('repeat')} calls on {info.get('latency_batch')}, {info.get('cpu')}, "
               f"{info.get('torch_threads')} threads, backends {', '.join(info.get('backends', []))}.")
    frontier = ", ".join(f"`{result.rows[i]['label']}`" for i in result.front)
    paths["md"].write_text(
        f"# Sweep: {info.get('model')}\n\n{summary}\n\n{result.markdown()}\n\n"
        f"Pareto frontier (size, {info.get('quality_name')}, latency): {frontier}.\n"
        f"Knee: `{knee['label']}` (farthest frontier point from the plane through the extremes, normalised axes).\n\n"
        f"![sweep]({paths['png'].name})\n\nKernels (format: backend kernel, at the timed batch):\n\n" +
        "".join(f"- `{r['label']}`: {'; '.join(r.get('kernels', []))}\n" for r in result.rows[1:]))
    unit, scale = _size_unit(result.rows)
    head = ["recipe", f"size ({unit})", "vs dense", info.get("quality_name", "quality"), "drop", "latency (ms)",
            "speed-up", "frontier"]
    body = []
    for i, r in enumerate(result.rows):
        mark = "knee" if i == result.knee else "yes" if i in result.front else ""
        cells = [r["label"], f"{r['size_bytes'] * scale:.2f}", f"{r['compression']:.2f}x", f"{r['quality']:.4f}",
                 f"{r['drop']:+.4f}", f"{r['latency_ms']:.2f}", f"{r['speedup']:.2f}x", mark]
        style = ' style="background:#fde"' if mark == "knee" else ' style="background:#def"' if mark else ""
        body.append(f"<tr{style}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    paths["html"].write_text(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sparseinfer sweep</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
        f"</head><body>\n<h1>Sweep: {html.escape(str(info.get('model')))}</h1>\n<p>{html.escape(summary)}</p>\n"
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>\n" + "\n".join(body) +
        f"</table>\n<p>Knee: <b>{html.escape(knee['label'])}</b></p>\n"
        f"<img src=\"{paths['png'].name}\" alt=\"sweep plot\" width=\"100%\">\n</body></html>\n")
    return paths
