"""explain(): what each compressed layer of a model holds and what a call would run."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..backends import cpu_heap, resolve
from . import attention
from .modules import CompressedConv2d, CompressedLinear
from .serialization import RECIPE_ATTR


class Explanation(list):
    """Rows (dicts) describing each compressed layer; prints as a table. ``dense`` lists the weight
    layers that stayed dense ({"layer", "kind", "shape", "bytes", "why"}), ``notes`` what holds for the
    whole process (lines printed below the total)."""

    COLUMNS = ("layer", "format", "shape", "packed_bytes", "dense_bytes", "ratio", "backend", "kernel", "path", "act",
               "why")

    def __init__(self, rows=(), dense=(), notes=()):
        super().__init__(rows)
        self.dense = list(dense)
        self.notes = list(notes)

    def __str__(self) -> str:
        rows = [[str(r[c]) for c in self.COLUMNS] for r in self]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(self.COLUMNS)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        packed = sum(r["packed_bytes"] for r in self)
        dense = sum(r["dense_bytes"] for r in self)
        total = f"total: {len(self)} compressed layers, {packed / 1e6:.2f} MB packed vs {dense / 1e6:.2f} MB fp32"
        kept = [f"stayed dense: {d['layer']} ({d['kind']} {d['shape']}, {d['bytes'] / 1e6:.2f} MB): {d['why']}"
                for d in self.dense]
        return "\n".join([line(self.COLUMNS), *(line(r) for r in rows), total, *self.notes, *kept])


def _dense_layers(model: nn.Module) -> list[dict]:
    """The nn.Linear / nn.Conv2d / nn.Embedding layers that compress() left dense, and why."""
    compressed = getattr(model, RECIPE_ATTR, None) is not None
    embeddings = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            continue
        w = m.weight
        row = {"layer": name, "kind": type(m).__name__, "shape": "x".join(map(str, w.shape)),
               "bytes": w.numel() * w.element_size()}
        if isinstance(m, nn.Embedding):
            row["why"] = "an embedding (a lookup reads one row per token)" + (
                "; its tied head stayed dense too" if any(
                    isinstance(h, nn.Linear) and h.weight is w for h in model.modules()) else "")
        elif id(w) in embeddings:
            row["why"] = (f"tied to the embedding {embeddings[id(w)]!r}: kept dense unless the recipe's layers name it "
                          f"(e.g. {{\"layers\": {{\"{name}\": \"int8\"}}}})")
        elif isinstance(m, nn.Conv2d) and CompressedConv2d.eligible(m) is not None:
            row["why"] = f"not compressible: {CompressedConv2d.eligible(m)}"
        elif not compressed:
            row["why"] = "the model was not compressed by compress()"
        elif fnmatch.fnmatchcase(name.rpartition(".")[2], "lm_head"):
            row["why"] = "an LM head: kept dense unless the recipe's layers name it"
        else:
            row["why"] = "the recipe left it dense (a dense pattern, the ignore list, or no default)"
        out.append(row)
    return out


def explain(model: nn.Module, batch: int = 1, dtype: torch.dtype = torch.float32) -> Explanation:
    """Per compressed layer: format, packed vs fp32 bytes, and what a call with ``batch`` rows of
    ``dtype`` activations would run on the layer's device: backend, kernel, path ("kernel", or the
    "dense" fallback / "dense_int8" where that was measured faster), the activation precision that
    runs (act) and why (measured times or the table and rule that decided, and the act mode); a
    layer joined with its siblings (q / k / v, gate / up) reports the joint call it runs as.
    ``.dense`` (printed below the table) lists the weight layers that stayed dense and why, ``.notes``
    process-wide settings that apply (the CPU allocator's: backends/cpu_heap.py) and, for a transformers
    model, which attention it runs (runtime/attention.py)."""
    rows = Explanation(dense=_dense_layers(model))
    names = {id(m): name for name, m in model.named_modules()}
    for name, module in model.named_modules():
        if not isinstance(module, CompressedLinear):
            continue
        w = module.packed
        x = torch.empty(batch, w.shape[1], dtype=dtype, device=w.device)
        # a member of a shared-input group (runtime/fused.py) runs as the group's joint call, whose
        # route is the joint weight's
        group = module._group
        runs = group.joint if group is not None and group.runs_jointly(x) else module
        b = resolve(runs.packed, x, runs.backend)
        about = b.describe(runs.packed, batch, runs.act)
        if runs is not module:
            n, k = runs.packed.shape
            siblings = ", ".join(names.get(id(m), "?").rpartition(".")[2] for m in group.members)
            about["why"] = f"one {n}x{k} call joined with its siblings ({siblings}); {about['why']}"
        rows.append({"layer": name, "format": w.fmt, "shape": f"{w.shape[0]}x{w.shape[1]}",
                     "packed_bytes": w.nbytes, "dense_bytes": w.dense_nbytes,
                     "ratio": f"{w.dense_nbytes / w.nbytes:.2f}x", "backend": b.name, **about})
    if any(r["backend"] == "cpu" for r in rows):
        rows.notes.append(f"cpu allocator: {cpu_heap.setting()}")
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation is not None:
        rows.notes.append(f"attention: {attention.describe(implementation)}")
    return rows
