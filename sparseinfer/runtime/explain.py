"""explain(): what each compressed layer of a model holds and what a call would run."""

from __future__ import annotations

import torch
from torch import nn

from ..backends import resolve
from .modules import CompressedLinear


class Explanation(list):
    """Rows (dicts) describing each compressed layer; prints as a table."""

    COLUMNS = ("layer", "format", "shape", "packed_bytes", "dense_bytes", "ratio", "backend", "kernel", "path", "act",
               "why")

    def __str__(self) -> str:
        rows = [[str(r[c]) for c in self.COLUMNS] for r in self]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(self.COLUMNS)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        packed = sum(r["packed_bytes"] for r in self)
        dense = sum(r["dense_bytes"] for r in self)
        total = f"total: {len(self)} compressed layers, {packed / 1e6:.2f} MB packed vs {dense / 1e6:.2f} MB fp32"
        return "\n".join([line(self.COLUMNS), *(line(r) for r in rows), total])


def explain(model: nn.Module, batch: int = 1, dtype: torch.dtype = torch.float32) -> Explanation:
    """Per compressed layer: format, packed vs fp32 bytes, and what a call with ``batch`` rows of
    ``dtype`` activations would run on the layer's device: backend, kernel, path ("kernel", or the
    "dense" fallback / "dense_int8" where that was measured faster), the activation precision that
    runs (act) and why (measured times or the table and rule that decided, and the act mode)."""
    rows = Explanation()
    for name, module in model.named_modules():
        if not isinstance(module, CompressedLinear):
            continue
        w = module.packed
        x = torch.empty(batch, w.shape[1], dtype=dtype, device=w.device)
        b = resolve(w, x, module.backend)
        rows.append({"layer": name, "format": w.fmt, "shape": f"{w.shape[0]}x{w.shape[1]}",
                     "packed_bytes": w.nbytes, "dense_bytes": w.dense_nbytes,
                     "ratio": f"{w.dense_nbytes / w.nbytes:.2f}x", "backend": b.name,
                     **b.describe(w, batch, module.act)})
    return rows
