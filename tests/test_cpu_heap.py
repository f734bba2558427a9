"""The CPU runtime's allocator setting (sparseinfer/backends/cpu_heap.py): once a compressed layer is
built for the CPU kernels, memory a forward pass frees stays with the process for the next one instead
of coming back from the system page by page. Checked in fresh processes, by the page faults of a
pass-like loop of allocations, with the setting and without it (SPARSEINFER_HEAP_KEEP_MB=0)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import sparseinfer as si
from sparseinfer import _native
from sparseinfer.backends import cpu_heap

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (Linux)")

# A pass: 24 blocks of 4 MiB (96 MiB, past glibc's own largest trim threshold of 64 MiB) allocated,
# written and freed, four times after a first; minor page faults of the last four.
PASSES = """
import json, resource, sys, torch
import sparseinfer as si
from sparseinfer.backends import cpu_heap
if sys.argv[1] == "build":
    from sparseinfer.backends.cpu_native import build_native_weight
    build_native_weight(si.pack(torch.randn(8, 64), "int8"))

def one_pass():
    blocks = [torch.empty(1 << 20).fill_(1.0) for _ in range(24)]
    del blocks

one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one_pass()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "setting": cpu_heap.setting()}))
"""
PAGES = 4 * 24 * (4 << 20) // 4096


def run_passes(build: bool, keep_mb: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES",
                                                                                            "LD_PRELOAD")}
    env.pop("SPARSEINFER_HEAP_KEEP_MB", None)
    if keep_mb is not None:
        env["SPARSEINFER_HEAP_KEEP_MB"] = keep_mb
    proc = subprocess.run([sys.executable, "-c", PASSES, "build" if build else "none"], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_native._C is None, reason="requires the C++ extension sparseinfer._C")
def test_a_built_cpu_layer_keeps_freed_memory_for_the_next_pass():
    kept = run_passes(build=True)
    assert kept["setting"].startswith("glibc keeps up to 256 MiB"), kept
    assert kept["faults"] < PAGES // 20, kept  # the passes reuse the heap: (almost) no page comes back
    # the same passes without the setting: glibc gives the 96 MiB back and faults them in again, so the
    # check above measures the setting, not the loop
    plain = run_passes(build=True, keep_mb="0")
    assert plain["setting"].startswith("the C library's own thresholds (SPARSEINFER_HEAP_KEEP_MB=0)"), plain
    assert plain["faults"] > PAGES // 4, plain
    # nothing changes before a CPU layer is built
    untouched = run_passes(build=False)
    assert untouched["setting"].startswith("not set yet"), untouched
    assert untouched["faults"] > PAGES // 4, untouched


@pytest.mark.parametrize("value", ["abc", "-1", "2048", "1.5"])
def test_a_bad_keep_value_names_the_variable(monkeypatch, value):
    monkeypatch.setattr(cpu_heap, "_state", None)  # as in a process that has not built a CPU layer yet
    monkeypatch.setenv("SPARSEINFER_HEAP_KEEP_MB", value)
    for ask in (cpu_heap.setting, cpu_heap.keep_freed_memory):
        with pytest.raises(ValueError, match=r"SPARSEINFER_HEAP_KEEP_MB=.*from 0 to 2047"):
            ask()


def test_settings_of_the_users_own_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert cpu_heap._describe(256) == "the C library's own thresholds (the environment sets them (MALLOC_TRIM_THRESHOLD_))"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert cpu_heap._describe(256) == "the C library's own thresholds (LD_PRELOAD replaces malloc)"


@pytest.mark.skipif(_native._C is None, reason="requires the C++ extension sparseinfer._C")
def test_explain_says_what_the_allocator_does():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    net = si.compress(model, "int8", backend="cpu", progress=False)
    text = str(si.explain(net))
    assert f"cpu allocator: {cpu_heap.setting()}" in text.splitlines()
