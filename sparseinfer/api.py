"""compress() and explain(): turn a dense model into a compressed one, and say what it runs."""

from __future__ import annotations

from torch import nn

from .eval.autotune import compress_to_target
from .passes.calibration import as_calibration
from .passes.pipeline import RECIPE_ATTR, compress_with_recipe
from .runtime.explain import Explanation, explain

__all__ = ["compress", "explain", "Explanation", "RECIPE_ATTR"]


def compress(model: nn.Module, recipe=None, calib=None, *, inplace: bool = False, backend: str | None = None,
             progress: bool | None = None, target=None, data=None, tokenizer=None) -> nn.Module:
    """Replace the eligible nn.Linear / nn.Conv2d layers of ``model`` by compressed ones.

    recipe: a string ("int8", "int4-g64", "2:4+int8", "sparse90", ...), a dict with per-layer
    overrides, or a YAML path (see ``sparseinfer.recipe``). calib: calibration batches for
    methods that need them (an iterable of model inputs), or text -- a list of strings or a file
    path -- with ``tokenizer`` (cut into windows of 512 tokens, see
    ``passes.calibration.text_batches``). The model is copied first unless ``inplace``. ``backend``
    pins every layer to one backend (default: best available per call). Sibling layers that read one
    input (q / k / v, gate / up) are joined into one packed call each (``runtime/fused.py``: the same
    bits as apart where the joint call takes a member's own path); a deep copy of the result runs
    them apart.
    target: instead of a recipe, an allowed quality drop (e.g. 0.01), or {"max_drop", "minimize":
    "latency"|"size", "candidates"}: a per-layer recipe is searched on ``data`` (evaluation
    batches) and measured on this machine (see ``sparseinfer.eval.autotune``).
    """
    if target is not None:
        if recipe is not None or inplace:
            raise ValueError("compress: pass a recipe or target=, not both (target= does not support inplace=True)")
        return compress_to_target(model, target, data, calib=calib, backend=backend, progress=progress)
    if recipe is None:
        raise ValueError("compress: give a recipe, or target= with data=")
    calib = as_calibration(calib, tokenizer)
    return compress_with_recipe(model, recipe, calib, inplace=inplace, backend=backend, progress=progress)
