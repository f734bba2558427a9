"""`sparseinfer bench`: run the benchmark suite (bench/, shipped in the source tree) and render
its pytest-benchmark JSON as a report.

    sparseinfer bench                         all shapes and batches, hot and cold (minutes)
    sparseinfer bench --quick                 every case once on small shapes (about a minute)
    sparseinfer bench --full -k "4096x4096"   also the reference backend on large weights
    sparseinfer bench report RESULTS.json [--compare OTHER.json] [--out DIR]
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from ..apps.benchmarking import render_report

SUITE_ENV = "SPARSEINFER_BENCH_DIR"


def find_suite() -> Path | None:
    """The bench/ folder: $SPARSEINFER_BENCH_DIR, ./bench, or the one next to the package in a
    source checkout (editable install)."""
    candidates = []
    if os.environ.get(SUITE_ENV):
        candidates.append(Path(os.environ[SUITE_ENV]))
    candidates += [Path.cwd() / "bench", Path(__file__).resolve().parents[2] / "bench"]
    for c in candidates:
        if (c / "conftest.py").is_file() and (c / "sibench.py").is_file():
            return c.resolve()
    return None


def register(sub):
    p = sub.add_parser("bench", help="run the benchmark suite, or render its results (bench report)",
                       description="Run the benchmark suite (kernels x formats x backends x shapes x batch, hot and "
                                   "cold, and whole models, against torch fp32/bf16 and the installed peers) and "
                                   "write pytest-benchmark JSON. `sparseinfer bench report RESULTS.json` renders it.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true",
                       help="smoke scope: every case once on small shapes (single-shot times: a check, not a decision)")
    scope.add_argument("--full", action="store_true", help="also time the reference backend on large weights")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression over case ids, e.g. "
                   "'4096x4096 and (b1 or b64)', 'int4', 'minilm', 'not cold'")
    p.add_argument("--json", dest="json_out", metavar="OUT", type=Path,
                   help="where to write the pytest-benchmark JSON (default: sparseinfer-bench-<time>.json)")
    p.add_argument("--max-time", type=float, default=0.5, metavar="S",
                   help="seconds of timing per case (pytest-benchmark --benchmark-max-time; default 0.5)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for torch and ONNX Runtime (sets OMP_NUM_THREADS; default: torch's default). "
                        "On a busy machine, 1 gives steadier numbers")
    p.add_argument("--report", dest="report_dir", metavar="DIR", type=Path,
                   help="also render the report into DIR after the run")
    p.add_argument("--pytest-arg", dest="pytest_args", action="append", default=[], metavar="ARG",
                   help="extra argument for pytest (repeatable), e.g. --pytest-arg=-x")
    p.set_defaults(func=_run)

    rsub = p.add_subparsers(dest="bench_command", metavar="report")
    r = rsub.add_parser("report", help="render results JSON as report.md + PNG charts",
                        description="Render a pytest-benchmark JSON written by `sparseinfer bench` as a markdown "
                                    "table (median, speedups vs fp32/bf16 dense and each peer, GB/s, roofline "
                                    "fraction, memory) and PNG charts; optionally compare with another run.")
    r.add_argument("results", type=Path, help="pytest-benchmark JSON of this run")
    r.add_argument("--compare", type=Path, metavar="OTHER.json", help="an earlier run to compare with")
    r.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: <results stem>-report)")
    r.set_defaults(func=_report)


def _report(args) -> int:
    out = args.out or args.results.with_name(args.results.stem + "-report")
    written = render_report(args.results, out, compare=args.compare)
    for path in written:
        print(path)
    return 0


def pytest_command(suite: Path, args) -> list[str]:
    scope = "smoke" if args.quick else "full" if args.full else "default"
    cmd = [sys.executable, "-m", "pytest", str(suite), f"--bench-scope={scope}", f"--benchmark-json={args.json_out}",
           f"--benchmark-max-time={args.max_time}", "--benchmark-min-rounds=5", "--benchmark-columns=median,iqr,rounds",
           "--benchmark-sort=name", "-p", "no:cacheprovider", "-q"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    return cmd + list(args.pytest_args)


def _run(args) -> int:
    suite = find_suite()
    if suite is None:
        raise FileNotFoundError(
            "the benchmark suite is not installed with the package: it ships in the source tree (bench/). "
            "Run `sparseinfer bench` from a checkout (pip install -e '.[bench,peers]'), or point "
            f"{SUITE_ENV} at its bench/ folder")
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise FileNotFoundError("sparseinfer bench needs pytest and pytest-benchmark: "
                                "pip install 'sparseinfer[bench]'") from None
    if args.json_out is None:
        args.json_out = Path(f"sparseinfer-bench-{datetime.now():%Y%m%d-%H%M%S}.json")
    args.json_out = args.json_out.resolve()
    cmd = pytest_command(suite, args)
    print("+ " + " ".join(cmd), flush=True)
    # run from the checkout so that its pytest configuration (pyproject.toml) applies
    env = dict(os.environ)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        env["OMP_NUM_THREADS"] = str(args.threads)
    rc = subprocess.call(cmd, cwd=suite.parent, env=env)
    if not args.json_out.is_file() or args.json_out.stat().st_size == 0:  # pytest-benchmark creates it early
        print(f"sparseinfer bench: no results written (pytest exit code {rc})", file=sys.stderr)
        return rc or 1
    print(f"results: {args.json_out}\nreport:  sparseinfer bench report {args.json_out}")
    if args.report_dir:
        for path in render_report(args.json_out, args.report_dir):
            print(path)
    return rc
