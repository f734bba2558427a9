"""Benchmark helpers shared by the suite in ``bench/`` and ``sparseinfer bench``: machine facts
(L3 size, memory bandwidth, RSS), and the report renderer (markdown table, PNG charts, run
comparison) over pytest-benchmark JSON.

The package never imports ``bench/`` (it is not installed); the suite imports this module.

Each benchmark in the JSON carries ``extra_info`` written by the suite:

* kernels: ``kind="kernel"``, ``provider`` (``sparseinfer`` or a baseline / peer name), ``format``,
  ``backend``, ``n``, ``k``, ``batch``, ``mode`` (``hot`` / ``cold``), ``weight_bytes``,
  ``bytes_moved`` (packed weight + activations + output), ``flops``;
* models: ``kind="model"``, ``model``, ``batch``, ``provider``, ``format``, ``backend``,
  ``weight_bytes``, ``peak_rss_mb``, ``runtime_rss_mb``, ``sqnr_db``.

``machine_info["sparseinfer"]`` holds the bandwidth measured in the same run
(``bandwidth["read_gbps"]``), the L3 size, the scope and the backends.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

# Baselines every row is compared against, and the peers a user would pick instead.
BASELINES = ("torch-fp32", "torch-bf16")
PEERS = ("torch-int8-dynamic", "torch-sparse-csr", "ort-int4", "ort-int8")
PEER_LABELS = {"torch-fp32": "fp32", "torch-bf16": "bf16", "torch-int8-dynamic": "torch int8",
               "torch-sparse-csr": "torch csr", "ort-int4": "ORT int4", "ort-int8": "ORT int8"}
DEFAULT_L3 = 32 << 20  # Zen 5 CCD; used when sysfs and lscpu say nothing
MIN_COLD_BYTES = 64 << 20  # floor for the cold rotation: VMs often under-report the L3


# -- peers ----------------------------------------------------------------------------------

def int8_per_channel(w):
    """The usual symmetric per-channel int8 of torch and ORT: scale = absmax / 127 (> 0)."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def fbgemm_int8(w):
    """torch's dynamic int8 linear (FBGEMM on x86), the int8 peer every benchmark uses: per-channel
    int8 weight, activations quantized per call to 7 bits (reduce_range, as ``quantize_dynamic``
    does on x86). Returns (make() -> a new prepacked copy, call(x, packed) -> y, dequantized weight)."""
    q, scale = int8_per_channel(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in favour of torchao
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)

    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ops.quantized.linear_prepack(qw, None)

    def call(x, packed):
        return torch.ops.quantized.linear_dynamic(x, packed, True)

    return make, call, q.float() * scale[:, None]


# -- machine facts ---------------------------------------------------------------------------

def _parse_size(text: str) -> int | None:
    text = text.strip().upper().replace("IB", "").replace("B", "")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        return None


def l3_cache_bytes() -> int:
    """Size of one L3 cache (the largest reported), from sysfs; DEFAULT_L3 if unknown."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu*/cache/index*"):
        try:
            if Path(index, "level").read_text().strip() == "3":
                size = _parse_size(Path(index, "size").read_text())
                if size:
                    sizes.append(size)
        except OSError:
            continue
    return max(sizes) if sizes else DEFAULT_L3


def cold_bytes_target() -> int:
    """How many weight bytes a cold run rotates through: 2x the L3, at least MIN_COLD_BYTES
    (``SPARSEINFER_BENCH_COLD_BYTES`` overrides)."""
    env = os.environ.get("SPARSEINFER_BENCH_COLD_BYTES")
    if env:
        size = _parse_size(env)
        if not size or size <= 0:
            raise ValueError(f"SPARSEINFER_BENCH_COLD_BYTES={env!r} is not a size (e.g. 128M)")
        return size
    return max(2 * l3_cache_bytes(), MIN_COLD_BYTES)


def cold_copies(weight_bytes: int, limit: int | None = None) -> int:
    """Copies of a weight of ``weight_bytes`` to rotate through in cold mode (at least 2)."""
    copies = max(2, math.ceil(cold_bytes_target() / max(1, weight_bytes)))
    return min(copies, limit) if limit else copies


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Memory bandwidth in GB/s (1e9 bytes/s), best of ``repeats`` with torch's threads and with one:
    ``read_gbps`` from a sum over a float32 buffer of ``nbytes`` (read only, the traffic pattern
    of a weight-streaming kernel) and ``copy_gbps`` (read + write bytes) from a tensor copy."""
    n = max(1, nbytes // 4)
    src = torch.ones(n)
    dst = torch.empty_like(src)
    best_read = best_copy = float("inf")
    threads = torch.get_num_threads()
    try:
        # with all threads, and with one: on a busy machine one thread can beat a descheduled team
        for t in dict.fromkeys((threads, 1)):
            torch.set_num_threads(t)
            src.sum()
            dst.copy_(src)
            for _ in range(repeats):
                t0 = time.perf_counter()
                src.sum()
                t1 = time.perf_counter()
                dst.copy_(src)
                t2 = time.perf_counter()
                best_read, best_copy = min(best_read, t1 - t0), min(best_copy, t2 - t1)
    finally:
        torch.set_num_threads(threads)
    size = n * 4
    return {"read_gbps": size / best_read / 1e9, "copy_gbps": 2 * size / best_copy / 1e9,
            "buffer_bytes": size, "repeats": repeats, "threads": threads,
            "method": f"best of torch.sum (read) and Tensor.copy_ (read+write), {threads} and 1 threads"}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux), or None."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size since start or the last ``reset_peak_rss``; falls back to
    ``ru_maxrss`` off Linux."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``) so that RSS reflects live
    data; a no-op elsewhere."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- results ---------------------------------------------------------------------------------

def load_results(path) -> dict:
    """Read a pytest-benchmark JSON file; ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return data


def _row(bench: dict) -> dict | None:
    info = bench.get("extra_info") or {}
    kind = info.get("kind")
    if kind not in ("kernel", "model"):
        return None
    row = dict(info)
    row["name"] = bench.get("name", "")
    row["median"] = float(bench["stats"]["median"])
    row["rounds"] = int(bench["stats"].get("rounds", 0))
    return row


def rows(data: dict) -> list[dict]:
    """One dict per benchmark of the suite: its extra_info plus ``name``, ``median`` (s), ``rounds``."""
    return [r for r in (_row(b) for b in data["benchmarks"]) if r is not None]


def group_key(row: dict) -> tuple:
    """Rows with the same key are timed on the same problem and can be compared."""
    if row["kind"] == "kernel":
        return ("kernel", row["n"], row["k"], row["batch"], row["mode"])
    return ("model", row["model"], row["batch"])


def label(row: dict) -> str:
    """What ran: ``int4-g128 @ cpu`` for sparseinfer, the provider name for the others."""
    if row.get("provider") == "sparseinfer":
        return f"{row['format']} @ {row['backend']}"
    return row["provider"]


def annotate(all_rows: list[dict], bandwidth_gbps: float | None) -> list[dict]:
    """Add speedups vs the baselines and peers of each row's group (baseline median / row
    median: > 1 means the row is faster), and GB/s, roofline fraction and GFLOP/s."""
    groups: dict[tuple, list[dict]] = {}
    for r in all_rows:
        groups.setdefault(group_key(r), []).append(r)
    for members in groups.values():
        refs = {r["provider"]: r["median"] for r in members if r["provider"] in BASELINES + PEERS}
        for r in members:
            r["speedup"] = {p: refs[p] / r["median"] for p in refs if r["median"] > 0 and p != r["provider"]}
            if r["kind"] == "kernel" and r["median"] > 0:
                r["gbps"] = r["bytes_moved"] / r["median"] / 1e9
                r["roofline"] = r["gbps"] / bandwidth_gbps if bandwidth_gbps else None
                r["gflops"] = r["flops"] / r["median"] / 1e9
    return all_rows


# -- markdown --------------------------------------------------------------------------------

def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _x(value) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.3f}×" if value >= 0.001 else "<0.001×"


def _g(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return out


def _present(members: list[dict], names) -> list[str]:
    have = {r["provider"] for r in members}
    return [p for p in names if p in have]


def _order(r: dict) -> tuple:
    known = BASELINES + PEERS
    return (known.index(r["provider"]) if r["provider"] in known else len(known), label(r))


def machine_lines(data: dict) -> list[str]:
    mi = data.get("machine_info") or {}
    si = mi.get("sparseinfer") or {}
    bw = si.get("bandwidth") or {}
    cpu = mi.get("cpu") or {}
    lines = [f"- CPU: {cpu.get('brand_raw') or mi.get('processor') or 'unknown'}, "
             f"{si.get('cpu_count', '?')} cores, torch threads {si.get('torch_threads', '?')}, "
             f"L3 {fmt_bytes(si.get('l3_bytes'))}, cold rotation over {fmt_bytes(si.get('cold_bytes'))}"]
    if bw:
        lines.append(f"- memory bandwidth measured in this run: read {bw['read_gbps']:.1f} GB/s, "
                     f"copy {bw['copy_gbps']:.1f} GB/s ({fmt_bytes(bw.get('buffer_bytes'))} buffer)")
    lines.append(f"- torch {si.get('torch', '?')}, sparseinfer {si.get('sparseinfer', '?')}, "
                 f"scope `{si.get('scope', '?')}`, run {data.get('datetime', '?')}")
    backends = si.get("backends") or {}
    if backends:
        lines.append("- backends: " + "; ".join(
            f"{name} {'✓' if b.get('available') else '✗'} ({b.get('detail', '')})" for name, b in backends.items()))
    peers = si.get("peers") or {}
    missing = [f"{p} ({why})" for p, why in peers.items() if why]
    if missing:
        lines.append("- peers not run: " + "; ".join(missing))
    if si.get("scope") == "smoke":
        lines.append("- **smoke scope: every case ran once; the times are single shots, not for decisions**")
    return lines


def kernel_tables(all_rows: list[dict]) -> list[str]:
    kern = [r for r in all_rows if r["kind"] == "kernel"]
    if not kern:
        return []
    out = ["## Kernels", "",
           "Median per call; speedup = other's median / this median (> 1: faster). GB/s counts the packed "
           "weight, the activations and the output once; roofline = GB/s / measured read bandwidth, for cold "
           "weights only (hot ones are read from cache). "
           "GFLOP/s counts the dense-equivalent 2·M·N·K.", ""]
    for n, k in sorted({(r["n"], r["k"]) for r in kern}, key=lambda s: (-s[0] * s[1], s)):
        shape_rows = [r for r in kern if (r["n"], r["k"]) == (n, k)]
        refs = _present(shape_rows, BASELINES + PEERS)
        header = ["batch", "mode", "what", "weight", "median", "GB/s", "roofline", "GFLOP/s"]
        header += [f"vs {PEER_LABELS[p]}" for p in refs]
        body = []
        for batch, mode in sorted({(r["batch"], r["mode"]) for r in shape_rows}, key=lambda b: (b[0], b[1] != "hot")):
            for r in sorted((r for r in shape_rows if (r["batch"], r["mode"]) == (batch, mode)), key=_order):
                roof = r.get("roofline") if mode == "cold" else None  # hot weights stream from cache
                body.append([str(batch), mode, label(r), fmt_bytes(r.get("weight_bytes")), fmt_time(r["median"]),
                             _g(r["gbps"]), "—" if roof is None else f"{roof:.0%}", _g(r["gflops"])]
                            + [_x(r["speedup"].get(p)) for p in refs])
        out += [f"### {n}×{k} (N×K)", "", *_table(header, body), ""]
    return out


def model_tables(all_rows: list[dict]) -> list[str]:
    mod = [r for r in all_rows if r["kind"] == "model"]
    if not mod:
        return []
    out = ["## Models", "",
           "Median per forward. weights = bytes of all parameters and packed buffers; peak RSS = peak "
           "resident memory of a fresh process running two forwards of the ready model (once per variant, at "
           "batch 1; runtime = the same process before the model was built); SQNR against the fp32 "
           "model's output.", ""]
    for model in sorted({r["model"] for r in mod}):
        model_rows = [r for r in mod if r["model"] == model]
        refs = _present(model_rows, BASELINES + PEERS)
        header = ["batch", "what", "median"] + [f"vs {PEER_LABELS[p]}" for p in refs]
        header += ["weights", "peak RSS", "runtime RSS", "SQNR"]
        body = []
        for batch in sorted({r["batch"] for r in model_rows}):
            for r in sorted((r for r in model_rows if r["batch"] == batch), key=_order):
                rss = r.get("peak_rss_mb")
                base = r.get("runtime_rss_mb")
                sqnr = r.get("sqnr_db")
                body.append([str(batch), label(r), fmt_time(r["median"])]
                            + [_x(r["speedup"].get(p)) for p in refs]
                            + [fmt_bytes(r.get("weight_bytes")), "—" if rss is None else f"{rss:.0f} MB",
                               "—" if base is None else f"{base:.0f} MB",
                               "—" if sqnr is None else ("∞" if math.isinf(sqnr) else f"{sqnr:.1f} dB")])
        seq = model_rows[0].get("seq")
        title = f"### {model}" + (f" (seq {seq})" if seq else "")
        out += [title, "", *_table(header, body), ""]
    return out


def compare_lines(new: list[dict], old: list[dict], threshold: float = 0.10) -> list[str]:
    """Cases present in both runs: old and new medians and the change (new/old - 1)."""
    old_by_name = {r["name"]: r for r in old}
    common = [r for r in new if r["name"] in old_by_name]
    out = ["## Comparison with the previous run", ""]
    if not common:
        return out + ["No case appears in both runs.", ""]
    body, faster, slower = [], 0, 0
    for r in sorted(common, key=lambda r: r["name"]):
        before = old_by_name[r["name"]]["median"]
        change = r["median"] / before - 1 if before > 0 else float("nan")
        mark = ""
        if change <= -threshold:
            mark, faster = "faster", faster + 1
        elif change >= threshold:
            mark, slower = "slower", slower + 1
        body.append([f"`{r['name']}`", fmt_time(before), fmt_time(r["median"]), f"{change:+.1%}", mark])
    only_new = len(new) - len(common)
    only_old = len(old) - len(common)
    out.append(f"{len(common)} cases in both runs: {faster} faster, {slower} slower by more than "
               f"{threshold:.0%}; {only_new} only in this run, {only_old} only in the other.")
    out += ["", *_table(["case", "other run", "this run", "change", ""], body), ""]
    return out


# -- charts ----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _best_per_format(members: list[dict]) -> dict[str, dict]:
    """For sparseinfer rows: the fastest backend per format."""
    best: dict[str, dict] = {}
    for r in members:
        if r["provider"] == "sparseinfer" and (r["format"] not in best or r["median"] < best[r["format"]]["median"]):
            best[r["format"]] = r
    return best


def speedup_chart(all_rows: list[dict], mode: str, path: Path) -> Path | None:
    """Bars: speedup vs fp32 dense of each format (best backend) and each peer, per shape; one
    panel per batch size."""
    kern = [r for r in all_rows if r["kind"] == "kernel" and r["mode"] == mode]
    batches = sorted({r["batch"] for r in kern})
    if not kern or not any(r["provider"] == "sparseinfer" for r in kern):
        return None
    plt = _pyplot()
    from matplotlib import ticker

    shapes = sorted({(r["n"], r["k"]) for r in kern}, key=lambda s: (s[0] * s[1], s))
    series = sorted({r["format"] for r in kern if r["provider"] == "sparseinfer"})
    series += [p for p in BASELINES[1:] + PEERS if any(r["provider"] == p for r in kern)]
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(8, 1.2 * len(shapes) * max(1, len(series)) / 3),
                                                       3.2 * len(batches)), squeeze=False)
    width = 0.8 / max(1, len(series))
    for ax, batch in zip(axes[:, 0], batches):
        for i, name in enumerate(series):
            values = []
            for n, k in shapes:
                members = [r for r in kern if (r["n"], r["k"], r["batch"]) == (n, k, batch)]
                r = _best_per_format(members).get(name) or next((m for m in members if m["provider"] == name), None)
                values.append(r["speedup"].get("torch-fp32", float("nan")) if r else float("nan"))
            # bars grow from 1x, up when faster than fp32, down when slower, on a log axis
            ax.bar([x + i * width for x in range(len(shapes))], [v - 1 for v in values], width, bottom=1.0,
                   label=PEER_LABELS.get(name, name), hatch="//" if name in PEERS + BASELINES else None,
                   color=plt.get_cmap("tab20")(i % 20))
        ax.set_yscale("log")  # 0.05x .. 20x both readable
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(shapes))])
        ax.set_xticklabels([f"{n}×{k}" for n, k in shapes], fontsize=8)
        ax.set_ylabel("speedup vs fp32")
        ax.set_title(f"batch {batch}, {mode} weights", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    # above the panels, so that it hides no bar
    fig.legend(handles, labels, fontsize=7, ncol=min(8, len(series)), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def size_latency_chart(all_rows: list[dict], path: Path) -> Path | None:
    """Scatter: weight bytes vs median latency, for kernels at the smallest batch with cold weights
    (the memory-bound case, where bytes should buy time; the reference backend left out) and for
    models. Circles: sparseinfer; squares: fp32 / bf16; triangles: peers."""
    kern = [r for r in all_rows if r["kind"] == "kernel"]
    mode = "cold" if any(r["mode"] == "cold" for r in kern) else "hot"
    batch = min((r["batch"] for r in kern), default=1)
    kern = [r for r in kern if r["batch"] == batch and r["mode"] == mode and r.get("backend") != "reference"]
    mod = [r for r in all_rows if r["kind"] == "model" and r.get("weight_bytes")]
    if not kern and not mod:
        return None
    plt = _pyplot()
    panels = [(title, rs) for title, rs in ((f"kernels ({mode}, batch {batch})", kern), ("models", mod)) if rs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (title, rs) in zip(axes[0], panels):
        names = sorted({label(r) for r in rs}, key=lambda n: (n in BASELINES, n in PEERS, n))
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate(names):
            pts = [r for r in rs if label(r) == name]
            marker = "s" if name in BASELINES else "^" if name in PEERS else "o"
            ax.scatter([r["weight_bytes"] / 1e6 for r in pts], [r["median"] * 1e3 for r in pts],
                       label=name, color=cmap(i % 20), marker=marker, s=26)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("weight bytes (MB)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the report ------------------------------------------------------------------------------

def render_report(results, out_dir, compare=None) -> list[Path]:
    """Write ``report.md`` and PNG charts for a pytest-benchmark JSON (a path or a loaded dict)
    into ``out_dir``; with ``compare`` (another run), add a comparison section. Returns the files."""
    data = results if isinstance(results, dict) else load_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw = ((data.get("machine_info") or {}).get("sparseinfer") or {}).get("bandwidth") or {}
    all_rows = annotate(rows(data), bw.get("read_gbps"))
    if not all_rows:
        raise ValueError("the results hold no sparseinfer benchmark (no extra_info kind=kernel/model); "
                         "was the run made with --benchmark-disable?")
    written = []
    charts = []
    for mode in ("hot", "cold"):
        png = speedup_chart(all_rows, mode, out_dir / f"speedup_{mode}.png")
        if png:
            charts.append((f"Speedup vs fp32 dense by format and shape ({mode})", png))
    png = size_latency_chart(all_rows, out_dir / "size_vs_latency.png")
    if png:
        charts.append(("Size vs latency", png))
    lines = ["# sparseinfer benchmark report", "", *machine_lines(data), ""]
    lines += model_tables(all_rows)
    lines += kernel_tables(all_rows)
    if compare is not None:
        other = compare if isinstance(compare, dict) else load_results(compare)
        lines += compare_lines(all_rows, rows(other))
    for title, png in charts:
        lines += [f"![{title}]({png.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    written.append(report)
    written += [png for _, png in charts]
    return written
