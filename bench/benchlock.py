"""The bench lock shared by the standalone bench scripts (``--lock PATH``): an exclusive flock held
around the measured runs only, so that building, loading and compiling run outside it."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def locked(path: str | None):
    """Hold an exclusive flock on ``path`` (created if missing) for the block; no lock when None."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
