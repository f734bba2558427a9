"""Round-to-nearest quantization: ``pack`` itself computes scales, so RTN has nothing to add."""

from __future__ import annotations

from .base import Target, register_method


@register_method("rtn", stage="quantize")
def round_to_nearest(targets: list[Target], calib, model) -> None:
    """Scales come from each group's range inside ``pack`` (see formats/base.py)."""
