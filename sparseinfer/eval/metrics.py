"""``evaluate(original, compressed, data)``: how far a compressed model is from its original.

The two models run on the same batches (see ``sparseinfer.eval.data`` for what ``data`` may
be) and their outputs are compared per task:

* **classification** (outputs [B, C] logits, or probabilities when every row is non-negative
  and sums to 1): accuracy of both models with Wilson 95% intervals, the paired accuracy drop
  with its 95% interval, top-1 agreement, mean |difference of top-1 confidence|, expected
  calibration error (15 equal-width bins), the critical failures (original right, compressed
  wrong) ranked by how much probability the true class lost, and with group labels the
  per-group accuracy and the disparate-impact ratio (lowest / highest group accuracy);
* **embedding** (a ``last_hidden_state``, or any other tensor): cosine similarity of the two
  models' per-sample vectors (3-D outputs are mean-pooled over tokens under the attention
  mask, as sentence-transformers does): mean, min and percentiles;
* **lm** (``logits`` [B, T, V] over the input tokens): perplexity of both models on the next
  token, their ratio and the top-1 next-token agreement.

``task="auto"`` picks: an output with ``logits`` is classification when 2-D and lm when 3-D;
one with ``last_hidden_state`` is an embedding; a plain 2-D tensor with labels is
classification, a plain 3-D tensor on integer [B, T] inputs is lm, anything else an embedding.

Every result has a ``quality`` (higher is better), a ``drop`` (how much worse than the
original; budgets in ``sparseinfer.eval.autotune`` bound it) and a ``divergence``, a continuous
distance between the two models' outputs that ranks small changes the discrete accuracy cannot
see (mean total-variation distance between the probability vectors; 1 - mean cosine; mean
|difference of per-token NLL|):

=============================  ===============================  ==========================
task                           quality                          drop
=============================  ===============================  ==========================
classification with labels     accuracy                         original - compressed
classification without labels  top-1 agreement                  1 - agreement
embedding                      mean cosine similarity           1 - mean cosine
lm                             original ppl / compressed ppl    compressed / original - 1
=============================  ===============================  ==========================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from .data import Batch, as_batches, call_model

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ECE_BINS = 15
TASKS = ("auto", "classification", "embedding", "lm")


# -- statistics on known inputs -------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (stays inside [0, 1], sane at 0 and n)."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes={successes} outside [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 and n the bounds are exactly 0 and 1; rounding would leave 1e-16 off
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def paired_difference_interval(a_correct: torch.Tensor, b_correct: torch.Tensor, z: float = Z95):
    """(difference, (low, high)) of accuracy a - b on the same samples. The interval is Agresti
    and Min's adjusted Wald interval for matched proportions (0.5 added to each cell of the 2x2
    table): it uses the discordant pairs, so it is much tighter than two independent
    intervals, and unlike the plain Wald interval it keeps a width when no pair is discordant."""
    a, b = a_correct.bool(), b_correct.bool()
    n = a.numel()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    diff = (only_a - only_b) / n
    oa, ob, nn_ = only_a + 0.5, only_b + 0.5, n + 2
    centre = (oa - ob) / nn_
    half = z * math.sqrt(max(0.0, (oa + ob) - (oa - ob) ** 2 / nn_)) / nn_
    return diff, (max(-1.0, centre - half), min(1.0, centre + half))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """sum_b |accuracy_b - confidence_b| * n_b / n over equal-width confidence bins
    (i/n_bins, (i+1)/n_bins]; confidence is the top-1 probability (a confidence of 0 goes to
    the first bin)."""
    conf, pred = probs.double().max(dim=1)
    correct = pred.eq(labels).double()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    return float((acc_sum - conf_sum).abs().sum() / conf.numel())


def _percentiles(values: torch.Tensor, qs=(1, 5, 50)) -> dict[str, float]:
    v = values.double()
    return {f"p{q:02d}": float(torch.quantile(v, q / 100)) for q in qs}


# -- collecting outputs --------------------------------------------------------------------------

@dataclass
class Outputs:
    """What ``collect`` keeps of one model's outputs on a dataset (enough to compare two models)."""

    task: str
    n: int  # samples
    labels: torch.Tensor | None = None  # [n] class indices (classification)
    groups: list | None = None  # [n] group labels
    probs: torch.Tensor | None = None  # [n, C] float64 (classification)
    embeddings: torch.Tensor | None = None  # [n, D] float64 (embedding)
    token_nll: torch.Tensor | None = None  # [tokens] float64 (lm)
    token_pred: torch.Tensor | None = None  # [tokens] argmax next token (lm)
    token_target: torch.Tensor | None = None  # [tokens] (lm)


def _field(output, name):
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def _primary(output) -> tuple[torch.Tensor, str | None]:
    """The tensor to compare and what kind it is ("logits", "hidden" or None for plain)."""
    if isinstance(output, torch.Tensor):
        return output, None
    for name, kind in (("logits", "logits"), ("last_hidden_state", "hidden"), ("sentence_embedding", "hidden")):
        value = _field(output, name)
        if isinstance(value, torch.Tensor):
            return value, kind
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], None
    raise ValueError(f"evaluate: cannot find a tensor in the model output of type {type(output).__name__}; "
                     f"return a tensor or an object with .logits / .last_hidden_state, or pass output_fn=")


def _token_ids(inputs) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, Mapping):
        return inputs.get("input_ids")
    return None


def _infer_task(out: torch.Tensor, kind: str | None, batch: Batch) -> str:
    if kind == "logits":
        return "classification" if out.dim() == 2 else "lm" if out.dim() == 3 else "embedding"
    if kind == "hidden":
        return "embedding"
    ids = _token_ids(batch.inputs)
    if out.dim() == 2 and batch.labels is not None:
        return "classification"
    if out.dim() == 3 and ids is not None and not ids.is_floating_point() and tuple(ids.shape) == tuple(out.shape[:2]):
        return "lm"
    return "embedding"


def _looks_like_probs(x: torch.Tensor) -> bool:
    return bool(x.min() >= 0 and x.max() <= 1 and torch.allclose(x.sum(1), torch.ones_like(x[:, 0]), atol=1e-4))


def _pool(out: torch.Tensor, inputs) -> torch.Tensor:
    out = out.double()
    if out.dim() == 3:
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is not None and tuple(mask.shape) == tuple(out.shape[:2]):
            m = mask.to(out.dtype).unsqueeze(-1)
            return (out * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return out.mean(1)
    return out.reshape(out.shape[0], -1)


def collect(model: nn.Module, data, *, task: str = "auto", groups=None, output_fn=None) -> Outputs:
    """Run ``model`` on ``data`` (no grad) and keep what ``evaluate`` compares. Pass the result
    as ``original`` to ``evaluate`` to run the original model once for many compressed ones.

    output_fn: optional ``fn(output, inputs) -> tensor`` choosing the tensor to compare."""
    if task not in TASKS:
        raise ValueError(f"evaluate: task must be one of {TASKS}, got {task!r}")
    batches = data if isinstance(data, list) and data and all(isinstance(b, Batch) for b in data) \
        else as_batches(data, groups)
    parts: dict[str, list] = {"probs": [], "embeddings": [], "nll": [], "pred": [], "target": []}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                output = call_model(model, batch.inputs)
                out, kind = (output_fn(output, batch.inputs), None) if output_fn else _primary(output)
                if not isinstance(out, torch.Tensor):
                    raise ValueError(f"evaluate: output_fn returned {type(out).__name__}, expected a tensor")
                if i == 0 and task == "auto":
                    task = _infer_task(out, kind, batch)
                _collect_batch(task, out.float(), batch, parts, i)
    finally:
        model.train(was_training)
    labels = torch.cat([b.labels for b in batches]) if batches[0].labels is not None else None
    group_list = [g for b in batches for g in b.groups] if batches[0].groups is not None else None
    n = sum(b.size for b in batches)
    if task == "classification":
        return Outputs(task, n, labels, group_list, probs=torch.cat(parts["probs"]))
    if task == "embedding":
        return Outputs(task, n, None, group_list, embeddings=torch.cat(parts["embeddings"]))
    return Outputs(task, n, None, group_list, token_nll=torch.cat(parts["nll"]),
                   token_pred=torch.cat(parts["pred"]), token_target=torch.cat(parts["target"]))


def _collect_batch(task: str, out: torch.Tensor, batch: Batch, parts: dict, i: int) -> None:
    if out.shape[0] != batch.size:
        raise ValueError(f"evaluate: batch {i} has {batch.size} samples but the model output has shape "
                         f"{tuple(out.shape)}")
    if task == "classification":
        if out.dim() != 2:
            raise ValueError(f"evaluate: classification needs [batch, classes] outputs, got {tuple(out.shape)}")
        if batch.labels is not None and int(batch.labels.max()) >= out.shape[1]:
            raise ValueError(f"evaluate: batch {i} has label {int(batch.labels.max())} but the model "
                             f"outputs only {out.shape[1]} classes")
        probs = out.double() if _looks_like_probs(out) else torch.softmax(out.double(), dim=1)
        parts["probs"].append(probs)
    elif task == "embedding":
        parts["embeddings"].append(_pool(out, batch.inputs))
    else:
        ids = batch.labels if batch.labels is not None else _token_ids(batch.inputs)
        if out.dim() != 3 or ids is None or tuple(ids.shape) != tuple(out.shape[:2]):
            raise ValueError(f"evaluate: lm needs logits [batch, tokens, vocab] over token ids [batch, tokens]; "
                             f"got logits {tuple(out.shape)} and ids "
                             f"{None if ids is None else tuple(ids.shape)}")
        logits, target = out[:, :-1].double(), ids[:, 1:].long()
        keep = target != -100
        mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, Mapping) else None
        if mask is not None:
            keep &= mask[:, 1:].bool()
        logits, target = logits[keep], target[keep]
        parts["nll"].append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        parts["pred"].append(logits.argmax(-1))
        parts["target"].append(target)


# -- comparing -----------------------------------------------------------------------------------

class Evaluation(dict):
    """The metrics of one (original, compressed) pair: a JSON-able dict that prints as a summary.
    Always has ``task``, ``n``, ``quality_name``, ``quality``, ``drop`` and ``divergence``
    (see the module doc)."""

    @property
    def quality(self) -> float:
        return self["quality"]

    @property
    def drop(self) -> float:
        return self["drop"]

    def __str__(self) -> str:
        lines = [f"{self['task']} on {self['n']} samples: {self['quality_name']} {self['quality']:.4f} "
                 f"(drop {self['drop']:+.4f})"]
        if "accuracy" in self:
            lo, hi = self["accuracy_ci"]
            olo, ohi = self["accuracy_original_ci"]
            dlo, dhi = self["accuracy_drop_ci"]
            lines += [f"  accuracy         {self['accuracy']:.4f} [{lo:.4f}, {hi:.4f}]  original "
                      f"{self['accuracy_original']:.4f} [{olo:.4f}, {ohi:.4f}]",
                      f"  accuracy drop    {self['accuracy_drop']:+.4f} [{dlo:+.4f}, {dhi:+.4f}] (paired 95%)",
                      f"  ECE              {self['ece']:.4f}  original {self['ece_original']:.4f}",
                      f"  critical         {self['critical_failures']} (original right, compressed wrong)"]
        if "agreement" in self:
            lines.append(f"  agreement        {self['agreement']:.4f}  mean |confidence diff| "
                         f"{self['confidence_diff']:.4f}")
        if "groups" in self:
            for g, row in self["groups"].items():
                lines.append(f"  group {str(g):<10} n={row['n']:<5} accuracy {row['accuracy']:.4f}  "
                             f"original {row['accuracy_original']:.4f}")
            lines.append(f"  disparate impact {self['disparate_impact']:.4f}  original "
                         f"{self['disparate_impact_original']:.4f}")
        if "cosine_mean" in self:
            lines.append(f"  cosine           mean {self['cosine_mean']:.5f}  min {self['cosine_min']:.5f}  "
                         f"p01 {self['cosine_p01']:.5f}  p05 {self['cosine_p05']:.5f}")
        if "perplexity" in self:
            lines.append(f"  perplexity       {self['perplexity']:.3f}  original {self['perplexity_original']:.3f}  "
                         f"token agreement {self['token_agreement']:.4f}")
        return "\n".join(lines)


def _group_accuracy(correct: torch.Tensor, groups: list) -> dict:
    rows: dict = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    return {g: correct[torch.tensor(idx)].double().mean().item() for g, idx in rows.items()}, rows


def _disparate_impact(acc: dict) -> float:
    hi = max(acc.values())
    return min(acc.values()) / hi if hi > 0 else 1.0


def _classification(o: Outputs, c: Outputs, top_failures: int) -> Evaluation:
    if o.probs.shape != c.probs.shape:
        raise ValueError(f"evaluate: original outputs {tuple(o.probs.shape)} and compressed {tuple(c.probs.shape)} "
                         f"differ in shape")
    conf_o, pred_o = o.probs.max(1)
    conf_c, pred_c = c.probs.max(1)
    agreement = pred_o.eq(pred_c).double().mean().item()
    ev = Evaluation(task="classification", n=o.n, agreement=agreement,
                    confidence_diff=(conf_o - conf_c).abs().mean().item(),
                    divergence=0.5 * (o.probs - c.probs).abs().sum(1).mean().item())
    labels = o.labels
    if labels is None:
        ev.update(quality_name="agreement", quality=agreement, drop=1 - agreement)
        return ev
    right_o, right_c = pred_o.eq(labels), pred_c.eq(labels)
    k_o, k_c = int(right_o.sum()), int(right_c.sum())
    drop, drop_ci = paired_difference_interval(right_o, right_c)
    ev.update(quality_name="accuracy", quality=k_c / o.n, drop=drop,
              accuracy=k_c / o.n, accuracy_ci=wilson_interval(k_c, o.n),
              accuracy_original=k_o / o.n, accuracy_original_ci=wilson_interval(k_o, o.n),
              accuracy_drop=drop, accuracy_drop_ci=drop_ci,
              ece=expected_calibration_error(c.probs, labels), ece_original=expected_calibration_error(o.probs, labels))
    critical = (right_o & ~right_c).nonzero().flatten()
    p_true_o = o.probs.gather(1, labels[:, None]).squeeze(1)
    p_true_c = c.probs.gather(1, labels[:, None]).squeeze(1)
    gap = p_true_o - p_true_c
    ranked = sorted(critical.tolist(), key=lambda i: (-gap[i].item(), i))
    ev["critical_failures"] = len(ranked)
    ev["failures"] = [{"index": i, "label": int(labels[i]), "original_pred": int(pred_o[i]),
                       "compressed_pred": int(pred_c[i]), "original_p_true": p_true_o[i].item(),
                       "compressed_p_true": p_true_c[i].item(), "gap": gap[i].item(),
                       **({"group": o.groups[i]} if o.groups is not None else {})}
                      for i in ranked[:top_failures]]
    if o.groups is not None:
        acc_c, members = _group_accuracy(right_c, o.groups)
        acc_o, _ = _group_accuracy(right_o, o.groups)
        ev["groups"] = {g: {"n": len(members[g]), "accuracy": acc_c[g], "accuracy_original": acc_o[g]}
                        for g in sorted(members, key=str)}
        ev["disparate_impact"] = _disparate_impact(acc_c)
        ev["disparate_impact_original"] = _disparate_impact(acc_o)
    return ev


def _embedding(o: Outputs, c: Outputs) -> Evaluation:
    if o.embeddings.shape != c.embeddings.shape:
        raise ValueError(f"evaluate: original embeddings {tuple(o.embeddings.shape)} and compressed "
                         f"{tuple(c.embeddings.shape)} differ in shape")
    cos = torch.nn.functional.cosine_similarity(o.embeddings, c.embeddings, dim=1, eps=1e-12)
    mean = cos.mean().item()
    ev = Evaluation(task="embedding", n=o.n, quality_name="cosine", quality=mean, drop=1 - mean, divergence=1 - mean,
                    cosine_mean=mean, cosine_min=cos.min().item(),
                    **{f"cosine_{k}": v for k, v in _percentiles(cos).items()})
    return ev


def _lm(o: Outputs, c: Outputs) -> Evaluation:
    if not torch.equal(o.token_target, c.token_target):
        raise ValueError("evaluate: the two models were scored on different tokens")
    if o.token_nll.numel() == 0:
        raise ValueError("evaluate: no tokens to score (sequences of length 1, or everything masked)")
    ppl_o, ppl_c = math.exp(o.token_nll.mean().item()), math.exp(c.token_nll.mean().item())
    return Evaluation(task="lm", n=o.n, quality_name="perplexity ratio", quality=ppl_o / ppl_c,
                      drop=ppl_c / ppl_o - 1, perplexity=ppl_c, perplexity_original=ppl_o,
                      perplexity_ratio=ppl_c / ppl_o, n_tokens=o.token_nll.numel(),
                      divergence=(o.token_nll - c.token_nll).abs().mean().item(),
                      token_agreement=o.token_pred.eq(c.token_pred).double().mean().item())


def compare(original: Outputs, compressed: Outputs, top_failures: int = 20) -> Evaluation:
    """Metrics between two ``collect`` results on the same data."""
    if original.task != compressed.task or original.n != compressed.n:
        raise ValueError(f"evaluate: outputs differ: {original.task} on {original.n} samples vs "
                         f"{compressed.task} on {compressed.n}")
    if original.task == "classification":
        return _classification(original, compressed, top_failures)
    if original.task == "embedding":
        return _embedding(original, compressed)
    return _lm(original, compressed)


def evaluate(original, compressed: nn.Module, data, *, task: str = "auto", groups=None, output_fn=None,
             top_failures: int = 20) -> Evaluation:
    """Compare ``compressed`` against ``original`` on ``data``.

    original: the dense model, or its ``collect(original, data)`` result (reused as is).
    data: a tensor, (inputs, labels[, groups]), or an iterable of batches (``eval.data``).
    task: "auto", "classification", "embedding" or "lm" (see the module docstring).
    groups: per-sample group labels, if the batches do not carry them.
    output_fn: ``fn(output, inputs) -> tensor`` when the model output needs picking apart.
    top_failures: how many critical failures to list (all are counted).
    """
    batches = as_batches(data, groups)
    if isinstance(original, Outputs):
        ref = original
        task = ref.task if task == "auto" else task
        if ref.n != sum(b.size for b in batches):
            raise ValueError(f"evaluate: the original outputs hold {ref.n} samples but data has "
                             f"{sum(b.size for b in batches)}")
    else:
        ref = collect(original, batches, task=task, output_fn=output_fn)
    comp = collect(compressed, batches, task=ref.task, output_fn=output_fn)
    # labels / groups come with the data: a reused original collected without them still gets them
    ref = replace(ref, labels=ref.labels if ref.labels is not None else comp.labels,
                  groups=ref.groups if ref.groups is not None else comp.groups)
    return compare(ref, comp, top_failures)
