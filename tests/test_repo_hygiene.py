"""What a clone must not carry: build outputs, wheels and other binaries (issue 11: a 10.6 MB wheel
once sat at the root), and a top-level name that shadows a third-party package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_TRACKED_BYTES = 512 * 1024  # the largest file we mean to track (a docs chart) is 135 kB


def _git(*args: str) -> list[str]:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs git and a git checkout (not an sdist)")


@needs_git
def test_nothing_tracked_matches_gitignore():
    """A build output or wheel added with `git add -f` (or before its pattern existed) fails here."""
    assert _git("ls-files", "--cached", "--ignored", "--exclude-standard") == []


@needs_git
def test_gitignore_covers_build_outputs():
    probes = ["x.whl", "build/x", "dist/x.tar.gz", "sparseinfer/_C.cpython-311-x86_64-linux-gnu.so", "a/b.o",
              "m.sinf", ".venv/x", "sparseinfer.egg-info/PKG-INFO"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(probes)


@needs_git
def test_no_large_tracked_file():
    big = [(p, (ROOT / p).stat().st_size) for p in _git("ls-files") if (ROOT / p).is_file()
           and (ROOT / p).stat().st_size > MAX_TRACKED_BYTES]
    assert big == [], f"tracked files over {MAX_TRACKED_BYTES} bytes: {big}"


def test_checkout_root_does_not_shadow_third_party_kernels():
    """From the checkout root (on sys.path first, as with `python -m` and pytest), transformers'
    hub-kernels integration must get the PyPI package `kernels`, while our Triton kernels import
    as `sparseinfer.kernels`; both are used."""
    pytest.importorskip("kernels", reason="the PyPI package `kernels` (a transformers dependency) is not installed")
    pytest.importorskip("triton")
    code = r"""
import pathlib, sys, torch
import kernels
assert kernels.__file__ and not pathlib.Path(kernels.__file__).resolve().is_relative_to(pathlib.Path.cwd() / "kernels"), \
    kernels.__path__
import transformers.integrations.hub_kernels as hub
assert hub.is_kernels_available()

@hub.use_kernel_forward_from_hub("RMSNorm")
class Norm(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

assert kernels.Device(type="cpu").type == "cpu"
x = torch.randn(3, 8)
assert torch.allclose(Norm()(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

import sparseinfer as si
from sparseinfer.kernels.int8_linear import int8_linear
w = si.pack(torch.randn(5, 64), "int8")
xs = torch.randn(3, 64)
y = int8_linear(xs, w.qweight, w.scale.t(), None)
ref = si.linear(xs, w, backend="reference")
assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4), (y - ref).abs().max()
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
