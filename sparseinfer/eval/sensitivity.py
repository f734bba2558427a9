"""Layer sensitivity: the damage from compressing one layer at a time, everything else dense.

A layer whose compression alone costs much quality should keep a gentler format; one that
costs nothing can take the most aggressive. ``sparseinfer.eval.autotune`` turns these numbers
(plus each layer's measured cost) into a per-layer recipe.

Each format is applied once to the whole model (so calibrated methods see the usual inputs),
then its layers are swapped one by one into the original model, evaluated, and swapped back.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..passes.pipeline import compress_with_recipe, recipe_layers
from ..runtime.modules import CompressedConv2d
from .data import as_batches
from .metrics import Outputs, collect, compare


def compressible_layers(model: nn.Module, recipe="int8") -> list[str]:
    """Names of the layers ``compress(model, recipe)`` replaces, in model order (nn.Linear and
    single-GEMM nn.Conv2d, minus ignored layers and heads tied to an embedding)."""
    return [name for name, _, _ in recipe_layers(model, recipe) if name]


@contextmanager
def swapped(model: nn.Module, name: str, module: nn.Module):
    """Temporarily put ``module`` at ``name`` inside ``model``; the original comes back on exit."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield model
    finally:
        setattr(parent, child, original)


def compressed_layers(model: nn.Module, fmt: str, layers: list[str], calib=None,
                      backend: str | None = None) -> dict[str, nn.Module]:
    """{name: compressed replacement} for ``layers`` under layer recipe ``fmt`` (``model`` is not changed)."""
    recipe = {"default": "dense", "layers": {n: fmt for n in layers}}
    compressed = compress_with_recipe(model, recipe, calib, backend=backend, progress=False)
    return {n: compressed.get_submodule(n) for n in layers}


def layer_sensitivity(model: nn.Module, data, fmt: str = "int4", *, layers: list[str] | None = None, calib=None,
                      task: str = "auto", reference: Outputs | None = None,
                      progress: bool | None = None) -> list[dict]:
    """For each layer (default: every compressible one), compress it alone with ``fmt`` and
    evaluate the model against the dense original on ``data``.

    Returns rows {"layer", "format", "quality", "drop", "packed_bytes", "dense_bytes"} in model
    order; ``drop`` is the task's quality drop (see ``sparseinfer.eval.metrics``)."""
    batches = as_batches(data)
    layers = compressible_layers(model, fmt) if layers is None else list(layers)
    if not layers:
        raise ValueError(f"layer_sensitivity: {type(model).__name__} has no layer that {fmt!r} compresses")
    reference = collect(model, batches, task=task) if reference is None else reference
    replacements = compressed_layers(model, fmt, layers, calib)
    rows = []
    disable = None if progress is None else not progress  # None: a bar on terminals only
    for name in tqdm(layers, desc=f"sensitivity {fmt}", unit="layer", disable=disable):
        layer = replacements[name]
        packed = (layer.linear if isinstance(layer, CompressedConv2d) else layer).packed
        with swapped(model, name, layer):
            ev = compare(reference, collect(model, batches, task=reference.task))
        rows.append({"layer": name, "format": fmt, "quality": ev.quality, "drop": ev.drop,
                     "packed_bytes": packed.nbytes, "dense_bytes": packed.dense_nbytes})
    return rows


def plot_sensitivity(rows: list[dict], path, title: str = "") -> Path:
    """Horizontal bars of the quality drop per layer, one colour per format."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    formats = list(dict.fromkeys(r["format"] for r in rows))
    drop = {(r["layer"], r["format"]): r["drop"] for r in rows}
    fig = Figure(figsize=(8, 0.8 + 0.22 * len(layers) * max(1, len(formats)) ** 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    height = 0.8 / len(formats)
    for j, fmt in enumerate(formats):
        ys = [i + (j - (len(formats) - 1) / 2) * height for i in range(len(layers))]
        ax.barh(ys, [drop.get((name, fmt), 0.0) for name in layers], height=height, label=fmt)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top, no empty margins
    ax.set_xlabel("quality drop when only this layer is compressed")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
