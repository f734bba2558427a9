"""Shared pytest fixtures: reproducible randomness and small numeric helpers.

* every test starts from the same global seeds (torch, random, numpy): ``seed_everything``;
* ``rng`` is a torch.Generator seeded from the test's id, so each parametrization draws its own
  reproducible stream (re-run one case and it sees the same numbers);
* ``rel_err(out, ref)`` is the normwise error ||out - ref|| / ||ref|| in float64.

The header line says which native ISAs were built, so a failure report shows what ran.
"""

from __future__ import annotations

import os
import random
import tempfile
import zlib

import pytest
import torch

SEED = 0

# Dispatch in tests is deterministic: the CPU backend follows its built-in tables (no first-use
# timing, which could pick another path from run to run), and nothing reads or writes the user's
# ~/.cache/sparseinfer. Set here, before sparseinfer is imported, so subprocesses inherit it; the
# tests of the measuring itself (test_cpu_routes.py) turn it back on with injected timings.
os.environ["SPARSEINFER_MEASURE"] = "0"
os.environ["SPARSEINFER_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparseinfer-test-cache-")


def _native_summary() -> str:
    try:
        from sparseinfer import _native
    except ImportError as err:  # the package itself does not import: the tests will say why
        return f"sparseinfer not importable ({err})"
    if _native._C is None:
        return f"sparseinfer._C not built ({_native._C_ERROR})"
    C = _native._C
    try:
        active = C.active_isa()
    except ValueError as err:
        active = f"<error: {err}>"
    return f"sparseinfer._C: available ISAs {C.available_isas()}, active {active}"


def pytest_report_header(config):
    return [_native_summary(), f"torch {torch.__version__}, {torch.get_num_threads()} threads"]


@pytest.fixture(autouse=True)
def seed_everything():
    """Same global seeds before every test, whatever ran before it."""
    random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(SEED)
    yield


@pytest.fixture
def rng(request) -> torch.Generator:
    """A CPU generator seeded from this test's node id (stable across runs and machines)."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf if out has NaN/Inf where ref does not)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


@pytest.fixture
def rel_err():
    return relative_error
