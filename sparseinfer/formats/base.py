"""PackedWeight: the common shape of every canonical packed format, plus shared validation
and quantization helpers.

A packed weight stands for a dense matrix W of shape (N, K) = (out_features, in_features).
Each concrete format documents its tensors; all of them can:

* ``to_dense()``   -- rebuild the exact dequantized W (float32 unless asked otherwise);
* ``nbytes``       -- the true size of the packed tensors;
* ``tensors()`` / ``params()`` -- named tensors and the JSON-able keyword arguments of ``pack``;
  with ``shape`` that is all that is written to disk, and ``from_parts(tensors, shape, params)``
  validates and rebuilds from it.

Packing is canonical: ``pack(w.to_dense(), w.fmt, **w.params())`` reproduces ``w`` exactly,
tensor for tensor. The quantizers below are built so that this holds by construction.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


# A pack parameter left to the format: its default, fitted to the weight's shape (a default must
# work on every shape the format accepts; an explicit value that cannot is an error).
DEFAULT: Any = _Default()


@dataclass(frozen=True)
class RecipePart:
    """What the format part of a recipe string asks for (see ``PackedWeight.from_recipe``)."""

    fmt: str  # the format name to pack with
    params: dict[str, Any] = field(default_factory=dict)  # pack parameters the recipe sets
    sparsity: float | None = None  # unstructured pruning before packing
    scope: str = "layer"  # "layer" or "global" pruning threshold


class PackedWeight:
    """Base class of the canonical packed formats (see the subclasses for layouts).

    A format is a subclass registered with ``formats.registry.register_format``; the class methods
    below are what the registry asks it (the rest of the library never reads a format name).
    """

    fmt: str  # the format name, e.g. "int4" or "2:4+int8"
    kind: ClassVar[str]  # the family: "int8", "int4", "nm", "csr"
    shape: tuple[int, int]  # true (N, K) of the dense weight

    # -- the format as a type: grammar, defaults, traits (class level) -----------------------
    grammar: ClassVar[str] = ""  # its names, for messages ("'int8'")
    recipe_grammar: ClassVar[str] = ""  # its recipe strings, for messages ("int8[-gN|-pc]"); "" = none
    takes_scales: ClassVar[bool] = False  # pack() takes quantization parameters from a pass (scale=, zero=)

    @classmethod
    def parse_name(cls, name: str) -> dict[str, Any] | None:
        """The parameters a (lower-case) format name fixes -- {} for "int8", {"n": 2, "m": 4,
        "values": "int8"} for "2:4+int8" -- or None when the name is not this format's."""
        raise NotImplementedError

    @classmethod
    def from_recipe(cls, token: str, text: str) -> RecipePart | None:
        """Read the format part of a recipe string ("int4-g64-asym"), None if it is not this
        format's; ValueError naming ``text`` when it is but is malformed. Default: no recipe syntax."""
        return None

    @classmethod
    def fit_params(cls, fixed: dict[str, Any], params: dict[str, Any], k: int) -> dict[str, Any]:
        """Pack parameters fitted to a weight with ``k`` columns (what ``compress`` packs with)."""
        return params

    @classmethod
    def sparsity_pattern(cls, fixed: dict[str, Any]) -> tuple[int, int] | None:
        """(n, m) when at most n of every m weights along K are kept: pruning passes respect it."""
        return None

    @classmethod
    def value_bits(cls, fixed: dict[str, Any]) -> int | None:
        """Bits of the quantized values (quantization passes target them); None: float values."""
        return None

    def __init__(self) -> None:
        # Backend-specific repacked layouts, built once on first use (see ``prepacked``).
        self._prepacked: dict[str, Any] = {}
        # Which backend ran which kind of call (``sparseinfer.backends.resolve``'s memo).
        self._routes: dict[tuple, Any] = {}

    def __getstate__(self):
        """What a copy (deepcopy, pickle) takes: its own tensors; the per-backend caches stay behind (a
        native prepacked layout cannot be copied, and the copy rebuilds its own on first use), and so
        does ``_sources`` (the copy's tensors may be inference tensors where the originals were not)."""
        state = {n: v for n, v in self.__dict__.items() if n != "_sources"}
        state.update(_prepacked={}, _routes={})
        return state

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__getstate__().items():
            setattr(new, name, copy.deepcopy(value, memo))
        return new

    # -- interface every format implements --------------------------------------------------
    dense_dtype: torch.dtype = torch.float32  # what to_dense() returns by default

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The exact dense weight [N, K] this packed weight stands for."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], shape, params: dict[str, Any], fmt: str) -> "PackedWeight":
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> "PackedWeight":
        """Output rows start:stop as a packed weight of the same format, sharing this one's storage
        (the dense-fallback path dequantizes a weight tile by tile). Here: every tensor holds one
        entry per output row along dim 0, as int8, int4 and N:M do; CSR overrides it."""
        n, k = self.shape
        if not 0 <= start < stop <= n:
            raise ValueError(f"rows: need 0 <= start < stop <= {n}, got {start}:{stop}")
        return type(self).from_parts({name: t[start:stop] for name, t in self.tensors().items()},
                                     (stop - start, k), self.params(), self.fmt)

    @classmethod
    def concat_rows(cls, weights: list["PackedWeight"]) -> "PackedWeight":
        """One weight of ``weights``' rows in order, the inverse of ``rows`` (the caller checks that they
        match: format, parameters, K, tensor dtypes and device). Here: every tensor holds one entry per
        output row along dim 0; CSR overrides it."""
        first = weights[0]
        joint = {name: torch.cat([w.tensors()[name] for w in weights]) for name in first.tensors()}
        return cls.from_parts(joint, (sum(w.shape[0] for w in weights), first.shape[1]), first.params(), first.fmt)

    # -- shared behaviour ------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dense_nbytes(self) -> int:
        """Size of the same weight stored dense in float32."""
        return self.shape[0] * self.shape[1] * 4

    @functools.cached_property
    def device(self) -> torch.device:
        # Cached: packed tensors never move in place (``to`` builds a new PackedWeight), and
        # ``linear`` asks on every call.
        return next(iter(self.tensors().values())).device

    def to(self, device: torch.device | str) -> "PackedWeight":
        if torch.device(device) == self.device:
            return self
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return type(self).from_parts(moved, self.shape, self.params(), self.fmt)

    def prepacked(self, key: str, build, *, self_checking: bool = False):
        """Memoise a backend's repacked layout of this weight, ``build(self)``, built once (e.g. at load).

        A layout is derived from the tensors' memory and contents, so it is built again when one of
        them changed since: another ``data_ptr()`` (its storage moved: ``share_memory()``, ``set_``)
        or ``_version`` (written in place: ``load_state_dict``, ``copy_``). ``self_checking``: the layout
        makes that check itself on every use (a ``_C.Weight``), so the memo skips it.
        """
        entry = self._prepacked.get(key)
        stamp = None if self_checking else self._stamp()
        if entry is None or entry[0] != stamp:
            entry = self._prepacked[key] = (stamp, build(self))
        return entry[1]

    @functools.cached_property
    def _sources(self) -> tuple:
        """(tensor, whether it counts its in-place writes) for each of ``tensors()``: those objects never
        change after packing (as ``device`` assumes), and an inference tensor has no version counter:
        reading its ``_version`` raises, which cost ~9 us per tensor on every dense-routed call of a
        model loaded under ``torch.inference_mode`` (0.72x dense for one sentence)."""
        return tuple((t, not t.is_inference()) for t in self.tensors().values())

    def _stamp(self) -> tuple:
        """Where each tensor's data is and how often it was written in place (for an inference tensor
        only its moves are seen)."""
        return tuple([(t.data_ptr(), t._version if counted else None) for t, counted in self._sources])

    def equal(self, other: "PackedWeight") -> bool:
        """Exact equality of format, parameters and every tensor (bit for bit)."""
        if type(self) is not type(other) or self.shape != other.shape or self.params() != other.params():
            return False
        a, b = self.tensors(), other.tensors()
        return a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
        )

    def __repr__(self) -> str:
        n, k = self.shape
        return f"{type(self).__name__}(fmt={self.fmt!r}, shape=({n}, {k}), nbytes={self.nbytes})"


# -- validation ------------------------------------------------------------------------------

def check_weight(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Validate a dense weight for packing; returns it unchanged."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"pack({fmt!r}): weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"pack({fmt!r}): weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"pack({fmt!r}): weight dtype {weight.dtype} is not supported (shape {tuple(weight.shape)}); "
            f"use float32, float16 or bfloat16"
        )
    if weight.numel() == 0:
        raise ValueError(f"pack({fmt!r}): weight of shape {tuple(weight.shape)} is empty")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"pack({fmt!r}): weight of shape {tuple(weight.shape)} has {bad} NaN/Inf entries")
    return weight


def fit_group_size(group_size: int | None, k: int) -> int | None:
    """A group longer than the K values it groups becomes one group per row (None)."""
    return None if isinstance(group_size, int) and group_size > k else group_size


_QUANT_RECIPE = re.compile(r"^(int\d+)(?:-(g\d+|pc))?(?:-(asym|sym))?$")


def read_quant_recipe(token: str, name: str) -> tuple[str | None, str | None] | None:
    """(group option "gN" / "pc" / None, symmetry "asym" / "sym" / None) of a recipe token
    "<name>[-gN|-pc][-asym|-sym]", None if the token is not one."""
    match = _QUANT_RECIPE.match(token)
    return match.group(2, 3) if match and match.group(1) == name else None


def fit_group_params(params: dict[str, Any], k: int) -> dict[str, Any]:
    """``params`` with a ``group_size`` larger than ``k`` replaced by one group per row (None)."""
    g = params.get("group_size")
    return params if fit_group_size(g, k) == g else {**params, "group_size": None}


def check_group_size(group_size: int | None, k: int, fmt: str, shape) -> int:
    """Resolve ``group_size`` (None = one group per row) to an int; reject bad values."""
    if group_size is None or group_size == -1:
        return k
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"pack({fmt!r}): group_size must be an int or None, got {group_size!r}")
    if group_size <= 0 or group_size & (group_size - 1):
        raise ValueError(f"pack({fmt!r}): group_size={group_size} is not a power of two (weight shape {tuple(shape)})")
    if group_size > k:
        raise ValueError(f"pack({fmt!r}): group_size={group_size} is larger than K={k} (weight shape {tuple(shape)})")
    return group_size


def check_tensor(tensors: dict, name: str, dtype: torch.dtype, shape: tuple, fmt: str) -> torch.Tensor:
    """Used by ``from_parts`` to validate tensors read back from disk or handed in by a user."""
    if name not in tensors:
        raise ValueError(f"{fmt}: missing tensor {name!r}")
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fmt}: tensor {name!r} should be {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    return t.contiguous()


def pad_k(w: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim up to a multiple of ``multiple``."""
    k = w.shape[-1]
    kp = math.ceil(k / multiple) * multiple
    return w if kp == k else torch.nn.functional.pad(w, (0, kp - k))


# -- quantizers ------------------------------------------------------------------------------
#
# Symmetric codes use the "signed absmax" rule: in each group the entry of largest magnitude,
# with its sign, maps to the most negative code (-128 or -8), so scale = m / qmin is exact
# (a power-of-two division) and all 2^b codes are used. Re-quantizing the dequantized group
# finds the same entry (the only one with |code| = 2^(b-1)) and hence the same scale:
# packing is idempotent by construction.

def symmetric_quantize(groups: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
    """groups: float32 [..., g] -> (codes int32 in [-2^(b-1), 2^(b-1)-1], scale float32 [...])."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if scale is None:
        idx = groups.abs().argmax(dim=-1, keepdim=True)
        m = groups.gather(-1, idx).squeeze(-1)
        scale = torch.where(m == 0, torch.ones_like(m), m / qmin)
    codes = torch.round(groups / scale.unsqueeze(-1)).clamp_(qmin, qmax).to(torch.int32)
    return codes, scale.to(torch.float32)


def _round_down_mantissa(x: torch.Tensor, keep_bits: int) -> torch.Tensor:
    """Truncate positive float32 values to ``keep_bits`` significant bits, so that products with
    small integers (and their differences) are exact in float32."""
    drop = 24 - keep_bits
    bits = x.contiguous().view(torch.int32) & ~((1 << drop) - 1)
    return bits.view(torch.float32)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero: odd-symmetric, so round(-r) == -round(r)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def asymmetric_quantize(groups: torch.Tensor, bits: int, scale=None, zero=None):
    """groups float32 [..., g] -> (codes int32 in [0, 2^b-1], scale float32 [...], zero int32 [...]).

    Dequantization is ``(code - zero) * scale``. The range [lo, hi] is widened to include 0 so
    that 0 is exact. The scale is span / (2^b - 1) truncated to 19 significant bits, so that
    span / scale >= 2^b - 1; with ties rounded away from zero the group minimum then lands on
    code 0 and the maximum on code 2^b - 1 (clamped), and the products of scale with codes are
    exact. Re-packing the dequantized group therefore finds the same span, scale and zero:
    packing is idempotent by construction.
    """
    levels = (1 << bits) - 1
    if scale is None:
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        span = hi - lo
        scale = _round_down_mantissa(span / levels, 19)
        scale = torch.where(scale > 0, scale, torch.where(span > 0, span / levels, torch.ones_like(span)))
        zero = _round_half_away(-lo / scale).clamp_(0, levels).to(torch.int32)
    zero = zero.to(torch.int32)
    codes = (_round_half_away(groups / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, levels)
    return codes.to(torch.int32), scale.to(torch.float32), zero
