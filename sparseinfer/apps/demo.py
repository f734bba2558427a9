"""The demo: compress the real all-MiniLM-L6-v2 with several recipes and measure, in one run,
size, compression against fp32, embedding cosine similarity to the dense model and latency
against the dense model; then save one compressed model, load it back and check it matches.

Quality is measured on real English sentences from the Python documentation shipped with the
standard library (``pydoc_data.topics``), embedded the way sentence-transformers does for this
model (mean pooling over the attention mask). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sparseinfer as si

from ..backends import cpu_routes
from ..eval.data import sentences
from ..runtime import attention
from ..runtime.modules import CompressedLinear
from . import models

# Plain rounding / magnitude next to their calibrated counterparts (GPTQ, SparseGPT: a few seconds
# each on the demo's calibration sentences), so the table shows what calibration buys.
DEFAULT_RECIPES = ("int8", "int4-g64", "gptq:int4-g64", "2:4", "2:4+int8", "sparsegpt:2:4+int8", "2:4+int4-g64",
                   "sparse50", "sparse90")
QUICK_RECIPES = ("int8", "2:4+int4-g64")
CALIB_SENTENCES = 32  # extra sentences, for recipes whose methods need calibration (wanda:2:4, gptq:int4)
# Timed passes per model, alternated with dense (one sentence: 5x as many). On a shared 2-core host a
# median of 3 put int8 at 1.22x where 7 interleaved rounds gave 1.72x (bench/README.md); 7 cost the
# demo ~10 s more.
REPEATS = 7
ATTENTION_ROW = "dense+attention"


@dataclass
class Row:
    recipe: str
    size_bytes: int  # every tensor of the model (packed layers + dense embeddings, norms, biases)
    fp32_bytes: int  # the same model all fp32
    cos_mean: float  # mean cosine similarity of sentence embeddings to the dense model's
    cos_min: float
    latency_ms: float  # median forward time of one batch
    dense_ms: float
    backend: str
    layer_ratio: float = 1.0  # fp32 bytes / packed bytes of the compressed layers alone
    latency1_ms: float = 0.0  # median forward time of one sentence (0: not measured)
    dense1_ms: float = 0.0

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.size_bytes

    @property
    def speed(self) -> float:
        return self.dense_ms / self.latency_ms

    @property
    def speed1(self) -> float:
        return self.dense1_ms / self.latency1_ms if self.latency1_ms else 0.0


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor the model holds (what an artifact stores)."""
    seen, total = set(), 0
    for t in list(model.state_dict().values()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def fp32_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model`` with every compressed layer stored dense in fp32."""
    packed = [m.packed for m in model.modules() if isinstance(m, CompressedLinear)]
    return model_bytes(model) - sum(w.nbytes for w in packed) + sum(w.dense_nbytes for w in packed)


@torch.no_grad()
def paired_latency_ms(model, dense, batch: dict, repeats: int, step=None) -> tuple[float, float]:
    """Median wall times of ``model(**batch)`` and ``dense(**batch)`` over ``repeats`` calls each,
    alternated call by call after one warm-up each: drift in the machine's speed (other processes,
    clocks) hits both alike, so their ratio is steadier than from two separate runs."""
    model(**batch)
    dense(**batch)
    times = {id(model): [], id(dense): []}
    for _ in range(repeats):
        for m in (model, dense):
            t0 = time.perf_counter()
            m(**batch)
            times[id(m)].append((time.perf_counter() - t0) * 1e3)
        if step:
            step()
    return statistics.median(times[id(model)]), statistics.median(times[id(dense)])


@torch.no_grad()
def latency_ms(model, batch: dict, repeats: int, step=None) -> float:
    """Median wall time of ``model(**batch)`` over ``repeats`` calls after one warm-up."""
    model(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch)
        times.append((time.perf_counter() - t0) * 1e3)
        if step:
            step()
    return statistics.median(times)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def format_table(rows: list[Row], dense: Row) -> str:
    head = ("recipe", "size MB", "vs fp32", "layers vs fp32", "cos mean", "cos min", "latency ms", "speed vs dense",
            "1 sentence ms", "speed (1)", "backend")
    cells = [(r.recipe, f"{r.size_bytes / 1e6:.1f}", f"{r.ratio:.2f}x", f"{r.layer_ratio:.2f}x", f"{r.cos_mean:.4f}",
              f"{r.cos_min:.4f}", f"{r.latency_ms:.1f}", f"{r.speed:.2f}x",
              f"{r.latency1_ms:.1f}" if r.latency1_ms else "-", f"{r.speed1:.2f}x" if r.latency1_ms else "-",
              r.backend) for r in [dense, *rows]]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(c) for c in cells)])


@contextlib.contextmanager
def measuring_every_route():
    """Lift the per-process first-use measuring budget (cpu_routes.MEASURE_BUDGET_S, 2 s) while the
    demo runs, unless SPARSEINFER_MEASURE_BUDGET_S sets one: the demo compresses nine models in one
    process, ~15 s of route measurements on a new machine, and with the default budget the later
    recipes ran the built-in rules (the 50 %-sparse model took the CSR kernel at 33 rows and ran
    0.76x dense for one sentence on a Xeon where it loses there; measured: 0.95-1.0x)."""
    if os.environ.get("SPARSEINFER_MEASURE_BUDGET_S") is not None:
        yield
        return
    before, cpu_routes.MEASURE_BUDGET_S = cpu_routes.MEASURE_BUDGET_S, math.inf
    try:
        yield
    finally:
        cpu_routes.MEASURE_BUDGET_S = before


@measuring_every_route()
def run(n_sentences: int = 256, recipes=DEFAULT_RECIPES, batch_size: int = 64, repeats: int | None = None,
        save_load: str | None = "2:4+int8", out=print, progress: bool | None = None, latency_batch: int = 16,
        act: str | None = None) -> dict:
    """Run the demo; print with ``out``; return {"dense": Row, "rows": [Row], "attention": Row | None,
    "save_load": {...}} ("attention": the dense model on sparseinfer's attention kernel).

    Quality batches hold ``batch_size`` sentences of similar length (sorted, as sentence-
    transformers does, so little padding); latency is timed on the first ``latency_batch``
    sentences in their natural order. save_load: the recipe whose compressed model is saved and
    loaded back (None: skip; a recipe not in ``recipes`` falls back to the first one). act: the
    activation precision the compressed models may use (``sparseinfer.set_act``). Every layer's
    kernel-or-dense route is measured on first use (``measuring_every_route``)."""
    if n_sentences < 1:
        raise ValueError(f"demo: --sentences must be at least 1, got {n_sentences}")
    repeats = REPEATS if repeats is None else repeats
    recipes = list(recipes)
    for r in recipes:
        si.Recipe.from_any(r)  # fail on a bad recipe before the slow part
    model, tokenizer, _ = models.load_hf(models.MINILM)
    texts = sentences(n_sentences + CALIB_SENTENCES)
    texts, calib_texts = texts[:n_sentences], texts[n_sentences:]  # calibrate on other sentences than measured
    by_length = sorted(texts, key=len)
    batches = [models.tokenize(tokenizer, by_length[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    timed = models.tokenize(tokenizer, texts[:latency_batch])
    single = models.tokenize(tokenizer, texts[:1])
    avail = ", ".join(f"{n}: {'yes' if v['available'] else 'no'} ({v['detail']})" for n, v in si.backends().items())
    out(f"all-MiniLM-L6-v2 on {len(texts)} sentences from pydoc_data.topics; latency = median of {repeats} "
        f"forward passes over a batch of {timed['input_ids'].shape[0]} (and of {5 * repeats} over one sentence, "
        f"{single['input_ids'].shape[1]} tokens), each recipe alternated call by call with dense (speed = that "
        f"dense time / the recipe's); compressed layers' activations: "
        f"{act or 'the default (SPARSEINFER_ACT, else auto)'}\nbackends: {avail}")

    # one progress step per forward pass (and per compression), so a slow backend still shows motion
    steps = (1 + len(recipes)) * (len(batches) + repeats) + len(recipes)
    bar = tqdm(total=steps, desc="demo", unit="step", disable=None if progress is None else not progress)

    bar.set_postfix_str("dense")
    dense_emb = models.embed(model, batches, step=lambda: bar.update(1))
    # one sentence: the small-batch case where packed weights pay most on a CPU (fewer bytes to stream)
    dense_ms = latency_ms(model, timed, repeats, step=lambda: bar.update(1))
    dense1_ms = latency_ms(model, single, 5 * repeats)
    size = model_bytes(model)
    dense = Row("dense fp32", size, size, 1.0, 1.0, dense_ms, dense_ms, "torch", 1.0, dense1_ms, dense1_ms)
    rows: list[Row] = []
    result = {"dense": dense, "rows": rows, "save_load": None}
    keep = save_load if save_load in recipes else (recipes[0] if save_load and recipes else None)
    kept_model = None
    calib = [models.tokenize(tokenizer, calib_texts[i:i + 16]) for i in range(0, len(calib_texts), 16)]
    for recipe in recipes:
        bar.set_postfix_str(f"compress {recipe}")
        compressed = si.set_act(si.compress(model, recipe, calib=calib, progress=False), act)
        bar.update(1)
        bar.set_postfix_str(recipe)
        emb = models.embed(compressed, batches, step=lambda: bar.update(1))
        # each recipe timed against dense call by call (the row's own dense time)
        ms, pair_ms = paired_latency_ms(compressed, model, timed, repeats, step=lambda: bar.update(1))
        ms1, pair1_ms = paired_latency_ms(compressed, model, single, 5 * repeats)
        cos = cosine(emb, dense_emb)
        layers = si.explain(compressed, batch=timed["input_ids"].numel())
        backends = "+".join(sorted({r["backend"] for r in layers}))
        layer_ratio = sum(r["dense_bytes"] for r in layers) / max(1, sum(r["packed_bytes"] for r in layers))
        rows.append(Row(recipe, model_bytes(compressed), fp32_bytes(compressed), cos.mean().item(), cos.min().item(),
                        ms, pair_ms, backends, layer_ratio, ms1, pair1_ms))
        if recipe == keep:
            kept_model = compressed
    # the attention kernel alone, in the dense model: every compressed row runs it too (si.compress
    # installs it), so this row shows what the rows owe to it rather than to their compressed layers
    attend = copy.deepcopy(model)
    extra = []
    if attention.install(attend):
        bar.set_postfix_str(ATTENTION_ROW)
        cos = cosine(models.embed(attend, batches), dense_emb)
        ms, pair_ms = paired_latency_ms(attend, model, timed, repeats)
        ms1, pair1_ms = paired_latency_ms(attend, model, single, 5 * repeats)
        extra.append(Row(ATTENTION_ROW, size, size, cos.mean().item(), cos.min().item(), ms, pair_ms, "torch+cpu", 1.0,
                         ms1, pair1_ms))
    result["attention"] = extra[0] if extra else None
    bar.close()
    out(format_table(rows + extra, dense))
    if extra:
        out(f"{ATTENTION_ROW}: the dense model with sparseinfer's attention kernel, which every compressed model above "
            f"runs too (sparseinfer/runtime/attention.py); the rest of a row's speed is its compressed layers'")
    if kept_model is not None:
        result["save_load"] = check_save_load(kept_model, keep, tokenizer, batches, out, act)
    return result


def check_save_load(model, recipe: str, tokenizer, batches: list[dict], out=print, act: str | None = None) -> dict:
    """Save ``model`` to a temporary artifact, load it back (from its exported program, no model
    code) and compare its sentence embeddings with the in-memory model's."""
    with tempfile.TemporaryDirectory(prefix="sparseinfer-demo-") as tmp:
        path = Path(tmp) / "minilm.sinf"
        t0 = time.perf_counter()
        si.save(model, path, models.example_inputs(tokenizer), metadata={"model": models.MINILM})
        t1 = time.perf_counter()
        loaded = si.load(path, act=act)
        t2 = time.perf_counter()
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        a, b = models.embed(model, batches), models.embed(loaded, batches)
    diff = (a - b).abs().max().item()
    cos = cosine(a, b).min().item()
    ok = diff <= 1e-5 * max(1.0, a.abs().max().item())
    out(f"save -> load ({recipe}): artifact {nbytes / 1e6:.1f} MB, saved in {t1 - t0:.1f} s, loaded in {t2 - t1:.1f} s "
        f"(exported program, no model code); loaded vs in-memory embeddings: max |diff| = {diff:.2e}, min cosine = "
        f"{cos:.6f} -> {'matches' if ok else 'MISMATCH'}")
    return {"recipe": recipe, "bytes": nbytes, "max_abs_diff": diff, "min_cosine": cos, "matches": ok}
