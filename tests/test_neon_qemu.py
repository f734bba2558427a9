"""The C++ kernels outside Python: the NEON kernels cross-compiled for aarch64 and run under qemu-user,
and this machine's own kernels under AddressSanitizer + UBSan, all against the vectors the Python
tests use.

Both run csrc/tests/kernel_test.cpp -- no Python or torch inside -- built straight from the kernel
sources by csrc/tests/build.py (cached by content hash in the temp dir, so a re-run recompiles only
what changed), on vectors csrc/tests/refvectors.py writes at test time with ``sparseinfer.pack`` and
``backends.reference_linear``: every format x K in (1, 3, 17, 100, 129) x N in (1, 7, 33) x batch in
(1, 2, 3, 17), fp32 / bf16 / fp16 activations, plus one shape large enough to split over threads.
Per case and ISA the driver checks poisoned outputs (every element written, no padding or foreign
column touched, x never read past K), a derived per-element error bound, and, for int8
activations, bit-equality with the scalar kernel. The bounds are stated in kernel_test.cpp.

Needs, or skips naming the missing tool: ``aarch64-linux-gnu-g++`` and ``qemu-aarch64`` (Debian:
g++-aarch64-linux-gnu qemu-user, installed by .ci/run), and a native g++ with libasan / libubsan.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

CSRC_TESTS = Path(__file__).resolve().parents[1] / "csrc" / "tests"


def _load(name: str):
    module_name = f"_sparseinfer_csrc_tests_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, CSRC_TESTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before exec: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[module_name]


build = _load("build")
refvectors = _load("refvectors")

APT_HINT = "Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu qemu-user"
# Every NEON kernel the dispatcher can pick; the qemu run must exercise each of them.
NEON_KERNELS = {"int8_gemm_neon", "int4_gemm_neon", "int8_panel_gemm_neon", "int4_panel_gemm_neon", "nm_gemm_neon",
                "nm_int8_gemm_neon", "nm_int4_gemm_neon", "csr_gemm_neon", "csr_int8_gemm_neon", "int8_q8_gemm_dot_neon",
                "int4_q8_gemm_dot_neon", "nm_int8_q8_tiles_dot_neon", "nm_int4_q8_tiles_dot_neon"}


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kernel-vectors") / "vectors.bin"
    assert refvectors.write(path) > 0
    return path


def _build(target: str, sanitize: bool = False):
    try:
        return build.build(target, sanitize=sanitize)
    except build.ToolMissing as err:
        hint = APT_HINT if target == "aarch64" else "a C++ compiler (set CXX)"
        pytest.skip(f"requires {err} ({hint})")
    except build.BuildError as err:
        pytest.fail(f"the kernel test driver does not build:\n{err}", pytrace=False)


@pytest.fixture(scope="module")
def aarch64_driver():
    return _build("aarch64")


def _run(driver, args, cpu=None, env=None) -> list[str]:
    """Runs the driver; fails listing every FAIL line (or the crash) unless all cases passed."""
    tc, binary = driver
    result = tc.run(binary, [str(a) for a in args], cpu=cpu, env=env)
    lines = result.stdout.splitlines()
    failures = [line for line in lines if line.startswith("FAIL")]
    summary = next((line for line in lines if line.startswith("SUMMARY")), None)
    where = " ".join(tc.runner + [binary.name] + [str(a) for a in args]) + (f" (cpu {cpu})" if cpu else "")
    assert summary is not None, (f"{where}: crashed with exit status {result.returncode}\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    assert not failures and result.returncode == 0, (
        f"{where}: {summary}\n" + "\n".join(failures[:30]) + f"\n{result.stderr[-3000:]}")
    return lines


def _features(driver, cpu=None) -> list[str]:
    """The FEATURES / ISAS / COMPILED lines of ``kernel_test --features``."""
    tc, binary = driver
    result = tc.run(binary, ["--features"], cpu=cpu, timeout=60)
    assert result.returncode == 0, f"kernel_test --features (cpu {cpu}): {result.stdout}{result.stderr}"
    return result.stdout.splitlines()


def _kernels(lines: list[str], isa: str) -> set[str]:
    return {field.split("=", 1)[1] for line in lines if f" isa={isa} " in line
            for field in line.split() if field.startswith("kernel=")}


# -- aarch64, under qemu ------------------------------------------------------------------------------

def test_hwcap_detection(aarch64_driver):
    """dispatch.cpp reads getauxval(AT_HWCAP): NEON always, dotprod only where the CPU has it."""
    tc, _ = aarch64_driver
    if not tc.runner:
        lines = _features(aarch64_driver)
        assert "neon=1" in lines[0] and "ISAS scalar neon" in lines
        return
    for cpu, dotprod in (("cortex-a53", 0), ("cortex-a76", 1), ("max", 1)):
        lines = _features(aarch64_driver, cpu=cpu)
        assert lines[0].startswith("FEATURES arch=aarch64 neon=1") and f"dotprod={dotprod}" in lines[0], (cpu, lines)
        assert "ISAS scalar neon" in lines, (cpu, lines)


def test_neon_kernels_match_reference(aarch64_driver, vectors):
    """Every format and shape on the NEON level (a CPU with dotprod: qemu's `max`); every NEON kernel
    runs, none falls back to scalar."""
    lines = _run(aarch64_driver, [vectors, "--isa", "neon", "--verbose"], cpu="max")
    assert _kernels(lines, "neon") == NEON_KERNELS


def test_neon_without_dotprod(aarch64_driver, vectors):
    """On a CPU without dotprod (Cortex-A53) the sdot rows are never picked (SIGILL otherwise):
    int8-activation calls run the fp32 NEON kernels, and everything still matches."""
    tc, _ = aarch64_driver
    if not tc.runner:
        pytest.skip("needs qemu to pick a CPU model without dotprod (running natively on aarch64)")
    # int8 / int4 weights only (the records named int8-* / int4-*): the other kernels are the same
    # code as on `max`.
    lines = _run(aarch64_driver, [vectors, "--isa", "neon", "--only", "int", "--verbose"], cpu="cortex-a53")
    assert _kernels(lines, "neon") == {"int8_gemm_neon", "int4_gemm_neon", "int8_panel_gemm_neon", "int4_panel_gemm_neon"}


def test_scalar_kernels_on_aarch64(aarch64_driver, vectors):
    lines = _run(aarch64_driver, [vectors, "--isa", "scalar", "--verbose"])
    assert _kernels(lines, "scalar") and all(k.endswith("_scalar") for k in _kernels(lines, "scalar"))


# -- native, under AddressSanitizer + UBSan ------------------------------------------------------------

def test_native_kernels_under_sanitizers(vectors):
    """Every ISA this CPU runs (scalar, and the x86 SIMD levels it supports), fp32 and int8
    activations, with AddressSanitizer + UBSan: any out-of-bounds access, leak or undefined
    behaviour in a kernel, the dispatcher or the thread pool aborts the run."""
    missing = build.sanitizers_missing()
    if missing:
        pytest.skip(f"requires {missing}")
    driver = _build("native", sanitize=True)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    lines = _run(driver, [vectors, "--verbose"], env=env)
    isas = next(line for line in lines if line.startswith("ISAS")).split()[1:]
    for isa in isas:
        assert _kernels(lines, isa), f"no case ran on {isa}"
