"""The benchmark report renderer and `sparseinfer bench` plumbing, on a small synthetic
pytest-benchmark JSON (the suite itself runs in bench/ in its smoke scope)."""

from __future__ import annotations

import copy
import json
from argparse import Namespace
from pathlib import Path

import pytest

from sparseinfer.apps import benchmarking as sb
from sparseinfer.cli import main
from sparseinfer.commands import bench as bench_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BANDWIDTH = 50.0  # GB/s


def _kernel(provider, median, fmt=None, backend=None, weight_bytes=32 << 20, n=4096, k=4096, batch=1, mode="hot"):
    bytes_moved = weight_bytes + batch * k * 4 + batch * n * 4
    fmt = fmt or provider
    name = f"test_kernel[{provider if provider != 'sparseinfer' else f'si-{fmt}-{backend}'}-{n}x{k}-b{batch}-{mode}]"
    return {"name": name, "group": f"{n}x{k} b{batch} {mode}",
            "stats": {"median": median, "mean": median, "min": median, "max": median, "rounds": 10},
            "extra_info": {"kind": "kernel", "provider": provider, "format": fmt, "backend": backend or provider,
                           "n": n, "k": k, "batch": batch, "mode": mode, "weight_bytes": weight_bytes,
                           "bytes_moved": bytes_moved, "flops": 2 * batch * n * k}}


def _model(provider, median, fmt=None, backend=None, batch=1):
    fmt = fmt or provider
    name = f"test_model[mlp-b{batch}-{provider if provider != 'sparseinfer' else f'si-{fmt}-{backend}'}]"
    return {"name": name, "stats": {"median": median, "rounds": 5},
            "extra_info": {"kind": "model", "model": "mlp", "batch": batch, "seq": None, "provider": provider,
                           "format": fmt, "backend": backend or provider, "weight_bytes": 96_000_000 // (
                               4 if provider == "sparseinfer" else 1),
                           "peak_rss_mb": 400.0, "runtime_rss_mb": 250.0, "sqnr_db": 40.0}}


def _results() -> dict:
    benches = [
        _kernel("torch-fp32", 10e-3, fmt="fp32", weight_bytes=64 << 20),
        _kernel("torch-bf16", 6e-3, fmt="bf16", weight_bytes=32 << 20),
        _kernel("ort-int4", 2e-3, fmt="int4-g128 (MatMulNBits acc4)", weight_bytes=9 << 20),
        _kernel("sparseinfer", 1e-3, fmt="int4-g128", backend="cpu", weight_bytes=9 << 20),
        _kernel("sparseinfer", 50e-3, fmt="int4-g128", backend="reference", weight_bytes=9 << 20),
        _kernel("torch-fp32", 12e-3, fmt="fp32", weight_bytes=64 << 20, mode="cold"),
        _kernel("sparseinfer", 3e-3, fmt="int4-g128", backend="cpu", weight_bytes=9 << 20, mode="cold"),
        _model("torch-fp32", 8e-3),
        _model("sparseinfer", 4e-3, fmt="int8", backend="cpu"),
        {"name": "test_unrelated", "stats": {"median": 1.0}, "extra_info": {}},  # not from the suite: ignored
    ]
    return {"machine_info": {"cpu": {"brand_raw": "Test CPU"},
                             "sparseinfer": {"bandwidth": {"read_gbps": BANDWIDTH, "copy_gbps": 40.0,
                                                           "buffer_bytes": 256 << 20},
                                             "l3_bytes": 32 << 20, "cold_bytes": 64 << 20, "scope": "default",
                                             "cpu_count": 2, "torch_threads": 2, "torch": "2.x", "sparseinfer": "0",
                                             "backends": {"cpu": {"available": True, "detail": "avx512"}},
                                             "peers": {"ort-int4": "", "torch-sparse-csr": ""}}},
            "datetime": "2025-01-01T00:00:00", "version": "5", "benchmarks": benches}


@pytest.fixture
def results_file(tmp_path) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_results()))
    return path


def _table_row(md: str, *cells: str) -> str:
    """The markdown table row whose cells start with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    hits = [line for line in md.splitlines() if line.startswith(prefix)]
    assert len(hits) == 1, f"expected one row starting {prefix!r}, got {hits}"
    return hits[0]


def test_speedup_and_bandwidth_math():
    rows = sb.annotate(sb.rows(_results()), BANDWIDTH)
    assert len(rows) == 9  # the unrelated benchmark is dropped
    si_cpu = next(r for r in rows if r["backend"] == "cpu" and r["kind"] == "kernel" and r["mode"] == "hot")
    assert si_cpu["speedup"] == pytest.approx({"torch-fp32": 10.0, "torch-bf16": 6.0, "ort-int4": 2.0})
    expected_gbps = ((9 << 20) + 4096 * 4 * 2) / 1e-3 / 1e9
    assert si_cpu["gbps"] == pytest.approx(expected_gbps)
    assert si_cpu["roofline"] == pytest.approx(expected_gbps / BANDWIDTH)
    assert si_cpu["gflops"] == pytest.approx(2 * 4096 * 4096 / 1e-3 / 1e9)
    # a baseline is not compared with itself; groups (hot / cold) are separate
    fp32_hot = next(r for r in rows if r["provider"] == "torch-fp32" and r["kind"] == "kernel" and r["mode"] == "hot")
    assert "torch-fp32" not in fp32_hot["speedup"] and fp32_hot["speedup"]["torch-bf16"] == pytest.approx(0.6)
    si_cold = next(r for r in rows if r["backend"] == "cpu" and r["kind"] == "kernel" and r["mode"] == "cold")
    assert si_cold["speedup"] == pytest.approx({"torch-fp32": 4.0})


def test_report_tables_and_charts(results_file, tmp_path):
    written = sb.render_report(results_file, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["report.md", "size_vs_latency.png", "speedup_cold.png", "speedup_hot.png"]
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Test CPU" in md and "read 50.0 GB/s" in md
    header = "| batch | mode | what | weight | median | GB/s | roofline | GFLOP/s | vs fp32 | vs bf16 | vs ORT int4 |"
    assert header in md
    row = _table_row(md, "1", "hot", "int4-g128 @ cpu", "9.44 MB", "1.00 ms")
    assert row.endswith("| 9.47 | — | 33.6 | 10.00× | 6.00× | 2.00× |")  # no DRAM roofline for hot weights
    assert _table_row(md, "1", "hot", "int4-g128 @ reference").endswith("| 0.20× | 0.12× | 0.040× |")
    # cold: 3.16 GB/s of the measured 50 GB/s
    assert _table_row(md, "1", "cold", "int4-g128 @ cpu").endswith("| 3.16 | 6% | 11.2 | 4.00× | — | — |")
    model = _table_row(md, "1", "int8 @ cpu", "4.00 ms", "2.00×")
    assert "| 24.00 MB | 400 MB | 250 MB | 40.0 dB |" in model
    assert "![Speedup vs fp32 dense by format and shape (hot)](speedup_hot.png)" in md


def test_compare_two_runs(results_file, tmp_path):
    other = copy.deepcopy(_results())
    for b in other["benchmarks"]:
        if b["name"].startswith("test_kernel[si-int4-g128-cpu-4096x4096-b1-hot"):
            b["stats"]["median"] = 2e-3  # the other run was 2x slower there
        if b["name"].startswith("test_kernel[torch-fp32-4096x4096-b1-hot"):
            b["stats"]["median"] = 9.8e-3  # within the noise threshold
    other["benchmarks"] = other["benchmarks"][1:]  # and lacked one case
    other_file = tmp_path / "old.json"
    other_file.write_text(json.dumps(other))
    sb.render_report(results_file, tmp_path / "out", compare=other_file)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Comparison with the previous run" in md
    assert "8 cases in both runs: 1 faster, 0 slower by more than 10%; 1 only in this run, 0 only in the other." in md
    assert "| `test_kernel[si-int4-g128-cpu-4096x4096-b1-hot]` | 2.00 ms | 1.00 ms | -50.0% | faster |" in md


def test_cli_report(results_file, tmp_path, capsys):
    assert main(["bench", "report", str(results_file), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out
    # default output folder: next to the results
    assert main(["bench", "report", str(results_file)]) == 0
    assert (results_file.parent / "run-report" / "speedup_hot.png").is_file()


def test_cli_report_bad_input(tmp_path, capsys):
    assert main(["bench", "report", str(tmp_path / "missing.json")]) == 2
    assert "no results file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "benchmarks"}')
    assert main(["bench", "report", str(bad)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    disabled = tmp_path / "disabled.json"
    disabled.write_text('{"benchmarks": []}')
    assert main(["bench", "report", str(disabled)]) == 2
    assert "no sparseinfer benchmark" in capsys.readouterr().err


def test_cli_bench_without_suite(monkeypatch, capsys):
    monkeypatch.setattr(bench_cmd, "find_suite", lambda: None)
    assert main(["bench", "--quick"]) == 2
    assert "ships in the source tree (bench/)" in capsys.readouterr().err


def test_suite_is_found_in_checkout_and_command_line(tmp_path):
    suite = bench_cmd.find_suite()
    assert suite is not None and (suite / "sibench.py").is_file()
    args = Namespace(quick=False, full=True, keyword="4096x4096 and b1", json_out=tmp_path / "o.json", max_time=0.2,
                     pytest_args=["-x"])
    cmd = bench_cmd.pytest_command(suite, args)
    assert "--bench-scope=full" in cmd and f"--benchmark-json={tmp_path / 'o.json'}" in cmd
    assert cmd[cmd.index("-k") + 1] == "4096x4096 and b1" and cmd[-1] == "-x"


def test_machine_helpers(monkeypatch):
    assert sb.l3_cache_bytes() > 0
    monkeypatch.setenv("SPARSEINFER_BENCH_COLD_BYTES", "8M")
    assert sb.cold_bytes_target() == 8 << 20
    assert sb.cold_copies(1 << 20) == 8 and sb.cold_copies(1 << 30) == 2 and sb.cold_copies(1 << 10, limit=4) == 4
    monkeypatch.setenv("SPARSEINFER_BENCH_COLD_BYTES", "lots")
    with pytest.raises(ValueError, match="SPARSEINFER_BENCH_COLD_BYTES"):
        sb.cold_bytes_target()
    monkeypatch.delenv("SPARSEINFER_BENCH_COLD_BYTES")
    assert sb.cold_bytes_target() >= sb.MIN_COLD_BYTES
    bw = sb.measure_bandwidth(4 << 20, repeats=1)
    assert bw["read_gbps"] > 0 and bw["copy_gbps"] > 0
    rss = sb.rss_bytes()
    assert rss is None or rss > 0
