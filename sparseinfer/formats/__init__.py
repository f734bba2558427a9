"""Canonical packed weight formats, their registry and the ``pack`` entry point.

Each format is one registered ``PackedWeight`` subclass in its own module, whose docstring is the
one description of its layout:

    int8.py  "int8"                  Int8Weight
    int4.py  "int4"                  Int4Weight
    nm.py    "N:M", "N:M+int8|int4"  NMWeight (e.g. "2:4"; quantized values group kept values)
    csr.py   "csr", "csr+int8"       CSRWeight

``registry.py`` resolves names (``format_of``) and holds ``pack`` / ``from_parts``; see
docs/architecture.md to add a format.
"""

from __future__ import annotations

from .base import DEFAULT, PackedWeight, RecipePart
# registration order = the order names are tried and listed in messages
from .int8 import Int8Weight  # isort: skip
from .int4 import Int4Weight  # isort: skip
from .nm import NMWeight  # isort: skip
from .csr import CSRWeight  # isort: skip
from .registry import (FORMATS, Format, format_of, from_parts, pack, parse_format, parse_recipe_part, register_format,
                       unregister_format)

__all__ = ["PackedWeight", "Int8Weight", "Int4Weight", "NMWeight", "CSRWeight", "pack", "parse_format",
           "from_parts", "format_of", "Format", "FORMATS", "register_format", "unregister_format", "parse_recipe_part",
           "RecipePart", "DEFAULT"]
