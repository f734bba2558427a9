"""The extension itself under AddressSanitizer + UBSan: bindings.cpp (argument checks, the weight-
lifetime mechanism) and every kernel it calls, driven from Python.

csrc/tests/build.py compiles sparseinfer._C from its sources with -fsanitize=address,undefined (kernel
objects shared with, and cached like, the sanitized kernel driver of tests/test_neon_qemu.py); a fresh
Python preloads the ASan runtime and runs tests/native/binding_checks.py on that module: every format
on every ISA, bad arguments, source tensors moved (share_memory_, set_) or rewritten in place under a
prepacked weight, and calls racing with rebuilds. Any invalid access, use after free or undefined
behaviour aborts the run with a report. (A build of the extension from before the weight-lifetime
fix reports a heap-use-after-free in int8_gemm_scalar on the first share_memory_ check.)

Needs, or skips naming it: a native g++ / clang with libasan and libubsan, and pybind11's headers
(in the [test] extra).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_module():
    spec = importlib.util.spec_from_file_location("_sparseinfer_csrc_tests_build", ROOT / "csrc" / "tests" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before exec: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bindings_and_weight_lifetime_under_sanitizers():
    build = _build_module()
    missing = build.sanitizers_missing()
    if missing:
        pytest.skip(f"requires {missing}")
    try:
        extension = build.build_extension()
        preload = build.asan_preload()
    except build.ToolMissing as err:
        pytest.skip(f"requires {err}")
    except build.BuildError as err:
        pytest.fail(f"the sanitized extension does not build:\n{err}", pytrace=False)
    env = {**os.environ, "LD_PRELOAD": preload,
           # Python and torch are not instrumented and keep memory to the end: no leak check
           "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    env.pop("SPARSEINFER_ISA", None)  # the script runs every ISA itself
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "native" / "binding_checks.py"), str(extension)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    report = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, report
    assert proc.stdout.strip().splitlines()[-1].startswith("OK "), report
