"""One process-wide count of the changes that can make a memoised choice stale: a backend registered
or removed, the CPU routes reset (calibration), the CPU kernels' thread count set. The backend
routes memoised on a weight and each layer's last plan (runtime/modules.py) key on it, so a call
compares one integer instead of asking every source."""

count = 0


def bump() -> None:
    """Make every choice memoised before now stale."""
    global count
    count += 1
