"""pytest configuration of the benchmark suite.

Scopes (``--bench-scope`` or ``SPARSEINFER_BENCH_SCOPE``):

* ``smoke`` (the default, so plain ``pytest`` / CI stays fast): small shapes, every format,
  backend, peer, model, the cold rotation and the memory probe run once;
* ``default``: every shape x batch x hot/cold; the reference backend only on small weights;
* ``full``: everything.

Cases are generated at collection time from the backends available here, so new backends
appear without editing the suite. The memory bandwidth is measured once per run and written to
the JSON's ``machine_info["sparseinfer"]`` for the report's roofline.
"""

from __future__ import annotations

import os
import platform

import pytest
import sibench
import torch

import sparseinfer as si
from sparseinfer.apps import benchmarking as sb

_BANDWIDTH = pytest.StashKey[dict]()

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the suite needs its `benchmark` fixture: say so instead of erroring per test
    collect_ignore_glob = ["test_*.py"]
    print("bench/: pytest-benchmark is not installed (pip install 'sparseinfer[bench]'); the suite is skipped")


def pytest_addoption(parser):
    group = parser.getgroup("sparseinfer-bench", "sparseinfer benchmark suite")
    group.addoption("--bench-scope", choices=sibench.SCOPES, default=None,
                    help="smoke (default; each case once on small shapes), default (all shapes and batches), "
                         "full (also the reference backend on large weights). Env: SPARSEINFER_BENCH_SCOPE")


def bench_scope(config) -> str:
    scope = config.getoption("--bench-scope", default=None) or os.environ.get("SPARSEINFER_BENCH_SCOPE") or "smoke"
    if scope not in sibench.SCOPES:
        raise pytest.UsageError(f"SPARSEINFER_BENCH_SCOPE={scope!r}: expected one of {', '.join(sibench.SCOPES)}")
    return scope


def pytest_generate_tests(metafunc):
    scope = bench_scope(metafunc.config)
    if "kernel_case" in metafunc.fixturenames:
        cases = sibench.kernel_cases(scope)
        metafunc.parametrize("kernel_case", cases, ids=[c.id for c in cases])
    if "sweep_case" in metafunc.fixturenames:
        cases = sibench.sweep_cases(scope)
        metafunc.parametrize("sweep_case", cases, ids=[c.id for c in cases])
    if "model_case" in metafunc.fixturenames:
        cases = sibench.model_cases(scope)
        metafunc.parametrize("model_case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def smoke(pytestconfig) -> bool:
    return bench_scope(pytestconfig) == "smoke"


def _bandwidth(config) -> dict:
    if _BANDWIDTH not in config.stash:
        smoke = bench_scope(config) == "smoke"
        config.stash[_BANDWIDTH] = sb.measure_bandwidth(64 << 20 if smoke else 512 << 20, 2 if smoke else 7)
    return config.stash[_BANDWIDTH]


@pytest.fixture(scope="session", autouse=True)
def memory_bandwidth(pytestconfig) -> dict:
    """Measured before the first case, under the same conditions as the cases."""
    return _bandwidth(pytestconfig)


def _peers() -> dict[str, str]:
    """Peer name -> why it cannot run here ("" when it can)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        ort = ""
    except ImportError as err:
        ort = f"needs onnxruntime and onnx: {err}"
    return {"torch-int8-dynamic": "", "torch-sparse-csr": "", "ort-int4": ort, "ort-int8": ort}


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["sparseinfer"] = {
        "sparseinfer": si.__version__, "torch": torch.__version__, "scope": bench_scope(config),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform(),
        "l3_bytes": sb.l3_cache_bytes(), "cold_bytes": sb.cold_bytes_target(), "bandwidth": _bandwidth(config),
        "backends": si.backends(), "peers": _peers(),
    }


def pytest_configure(config):
    # The smoke scope checks paths, it does not measure them: no first-use timing of routes (the
    # built-in tables decide) and no writes to the user's cache.
    if bench_scope(config) == "smoke":
        import tempfile

        os.environ.setdefault("SPARSEINFER_MEASURE", "0")
        os.environ.setdefault("SPARSEINFER_CACHE_DIR", tempfile.mkdtemp(prefix="sparseinfer-bench-cache-"))


def pytest_terminal_summary(terminalreporter):
    if any(r.nodeid.startswith("bench/test_bench_sweep.py") or "test_sweep[" in r.nodeid
           for rs in terminalreporter.stats.values() for r in rs if hasattr(r, "nodeid")):
        for line in sibench.sweep_summary(sibench.BELOW_DENSE):
            terminalreporter.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json.setdefault("machine_info", {}).setdefault("sparseinfer", {})["below_dense"] = [
        {k: p[k] for k in ("format", "act", "shape", "batch", "speedup_vs_dense", "path", "kernel")}
        for p in sibench.BELOW_DENSE]


def pytest_sessionfinish(session):
    sibench.ColdCopies.clear()
    sibench.clear_caches()
