"""The format registry: every canonical packed format is one ``PackedWeight`` subclass, registered
with ``@register_format``, that owns its name grammar (``parse_name``), its recipe grammar
(``from_recipe``), its defaults and how they fit a shape (``fit_params``), ``from_dense`` /
``from_parts`` (packing and validation: the tensor schema) and, in its module docstring, its layout
(the one description; README and docs link to it).

Everything else asks here instead of reading format names: ``format_of(name)`` gives a ``Format``
(the class plus the parameters the name fixes) with what passes need to know (``nm``,
``value_bits``, ``takes_scales``). Backends key their per-format implementations on the class
(``sparseinfer.backends.base.FormatTable``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .base import PackedWeight, RecipePart

FORMATS: list[type[PackedWeight]] = []  # in registration order: names are tried in this order


def register_format(cls: type[PackedWeight]) -> type[PackedWeight]:
    """Class decorator: make ``cls`` a format that ``pack``, ``from_parts``, recipes and load know."""
    if any(c.kind == cls.kind for c in FORMATS if c is not cls):
        raise ValueError(f"a format of kind {cls.kind!r} is registered already")
    if cls not in FORMATS:
        FORMATS.append(cls)
    _lookup.cache_clear()
    return cls


def unregister_format(cls: type[PackedWeight]) -> None:
    """Forget a format registered with ``register_format`` (a plugin's or a test's)."""
    FORMATS.remove(cls)
    _lookup.cache_clear()


@dataclass(frozen=True)
class Format:
    """One format name resolved: its class and the parameters the name fixes."""

    name: str  # canonical (stripped, lower case), e.g. "2:4+int8"
    cls: type[PackedWeight]
    fixed: tuple[tuple[str, Any], ...]  # e.g. (("m", 4), ("n", 2), ("values", "int8"))

    @property
    def params_fixed(self) -> dict[str, Any]:
        return dict(self.fixed)

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def nm(self) -> tuple[int, int] | None:
        """(n, m) when the format keeps at most n of every m weights along K (pruning must respect it)."""
        return self.cls.sparsity_pattern(self.params_fixed)

    @property
    def value_bits(self) -> int | None:
        """Bits of the quantized values (8, 4), None for float values."""
        return self.cls.value_bits(self.params_fixed)

    @property
    def takes_scales(self) -> bool:
        """Whether ``pack`` takes quantization parameters from a pass (``scale=``, ``zero=``, e.g. GPTQ)."""
        return self.cls.takes_scales

    def fit_params(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        """``params`` fitted to a weight with K columns (e.g. a group larger than what it groups
        becomes per-channel): what ``compress`` packs with."""
        return self.cls.fit_params(self.params_fixed, dict(params), k)

    def pack(self, weight: torch.Tensor, **params) -> PackedWeight:
        try:
            return self.cls.from_dense(weight, fmt=self.name, **self.params_fixed, **params)
        except TypeError as err:  # an unknown keyword argument
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise ValueError(f"pack({self.name!r}): bad parameters {sorted(params)} for weight shape {shape}: "
                             f"{err}") from None

    def from_parts(self, tensors: dict[str, torch.Tensor], shape, params: dict[str, Any]) -> PackedWeight:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"{self.name}: bad shape {shape}")
        return self.cls.from_parts(tensors, shape, params, self.name)

    def as_dict(self) -> dict[str, Any]:
        """{"kind": family, **fixed parameters} (``parse_format``'s answer)."""
        return {"kind": self.kind, **self.params_fixed}


@functools.lru_cache(maxsize=256)
def _lookup(name: str) -> Format:
    for cls in FORMATS:
        fixed = cls.parse_name(name)
        if fixed is not None:
            return Format(name, cls, tuple(sorted(fixed.items())))
    raise ValueError(f"unknown format {name!r}; expected one of {', '.join(c.grammar for c in FORMATS)}")


def format_of(fmt: str) -> Format:
    """The registered format a name belongs to; ValueError naming the known grammars if none."""
    if not isinstance(fmt, str):
        raise ValueError(f"format must be a string, got {type(fmt).__name__}")
    try:
        return _lookup(fmt.strip().lower())
    except ValueError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(c.grammar for c in FORMATS)}") from None


def parse_format(fmt: str) -> dict[str, Any]:
    """Split a format name into its family and fixed parameters; ValueError if unknown."""
    return format_of(fmt).as_dict()


def parse_recipe_part(token: str, text: str) -> RecipePart:
    """What a recipe's format part ("int4-g64", "2:4+int8", "sparse90-global") asks for: each
    registered format reads its own; ValueError naming the grammars when none does."""
    for cls in FORMATS:
        part = cls.from_recipe(token, text)
        if part is not None:
            return part
    grammars = ", ".join(c.recipe_grammar for c in FORMATS if c.recipe_grammar)
    raise ValueError(f"recipe {text!r}: cannot read {token!r}; expected one of {grammars} or 'dense'")


def pack(weight: torch.Tensor, fmt: str, **params) -> PackedWeight:
    """Pack a dense weight [out_features, in_features] into format ``fmt``.

    Parameters by format (see each format's ``from_dense``): int8 ``group_size`` (None =
    per-channel); int4 ``group_size`` (128, or per-channel on rows shorter than that), ``symmetric``
    (True); N:M+int8/int4 the same for their values; ``scale``/``zero`` tensors may be given to
    quantize with precomputed (e.g. GPTQ) parameters. Raises ValueError naming the parameter and
    the weight shape when an argument is invalid.
    """
    return format_of(fmt).pack(weight, **params)


def from_parts(fmt: str, tensors: dict[str, torch.Tensor], shape, params: dict[str, Any]) -> PackedWeight:
    """Rebuild a packed weight from its named tensors, true shape and pack parameters, validating
    every tensor's dtype and shape (used by load and by the custom ops)."""
    return format_of(fmt).from_parts(tensors, shape, params)
