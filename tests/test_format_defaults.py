"""A format's defaults work on every shape it accepts, the same way for every format (issue 14):
``pack(w, fmt)`` with no parameters packs any 2-D weight, a default group longer than the values it
groups becomes one group per row, and explicit parameters that cannot fit still fail loudly."""

from __future__ import annotations

import pytest
import torch

import sparseinfer as si
from sparseinfer.formats.int4 import DEFAULT_GROUP_SIZE
from sparseinfer.recipe import parse_layer_recipe

FORMATS = ["int8", "int4", "2:4", "1:3", "2:4+int8", "2:4+int4", "4:8+int4", "csr", "csr+int8"]
SHAPES = [(1, 1), (3, 7), (37, 100), (37, 200), (40, 136), (5, 257), (2, 300)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_defaults_pack_every_shape(fmt, shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(*shape, generator=g)
    packed = si.pack(w, fmt)
    assert packed.shape == shape
    assert si.pack(packed.to_dense(), packed.fmt, **packed.params()).equal(packed)  # canonical
    x = torch.randn(3, shape[1], generator=g)
    ref = x @ packed.to_dense().T
    out = si.linear(x, packed, backend="reference", act="fp32")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_int4_default_group_is_one_definition():
    """pack's default and the recipe's "int4" are the same constant; short rows get one group."""
    assert parse_layer_recipe("int4").params["group_size"] == DEFAULT_GROUP_SIZE
    assert si.pack(torch.randn(4, 2 * DEFAULT_GROUP_SIZE), "int4").params()["group_size"] == DEFAULT_GROUP_SIZE
    assert si.pack(torch.randn(4, DEFAULT_GROUP_SIZE - 1), "int4").params()["group_size"] is None
    # N:M values: the group counts kept values (2:4 keeps K/2)
    assert si.pack(torch.randn(4, 2 * DEFAULT_GROUP_SIZE), "2:4+int4").params()["group_size"] == DEFAULT_GROUP_SIZE
    assert si.pack(torch.randn(37, 200), "2:4+int4").params()["group_size"] is None


@pytest.mark.parametrize("fmt,k", [("int4", 100), ("int8", 100), ("2:4+int4", 200)])
def test_explicit_group_larger_than_the_row_still_fails(fmt, k):
    with pytest.raises(ValueError, match="group_size=128"):
        si.pack(torch.randn(4, k), fmt, group_size=128)


def test_compress_and_pack_agree_on_short_rows():
    """compress("int4") on a layer shorter than the default group packs what pack(w, "int4") packs."""
    model = torch.nn.Sequential(torch.nn.Linear(100, 37))
    compressed = si.compress(model, "int4")
    assert compressed[0].packed.equal(si.pack(model[0].weight.detach(), "int4"))
