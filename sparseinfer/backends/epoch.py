"""One process-wide count of the changes that can make a layer's last plan stale: a backend registered
or removed, the CPU routes reset (calibration), the CPU kernels' thread count set. Each layer keeps its
last call's plan while this count is the one the plan was made under (runtime/modules.py), so a call
compares one integer instead of asking every source; a change sends each layer once through its plan
memo, keyed on what the plan depends on (``backends.generation()``, the thread count)."""

count = 0


def bump() -> None:
    """Make every layer's last plan stale."""
    global count
    count += 1
