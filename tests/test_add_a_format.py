"""docs/architecture.md's recipes, walked: a format and a backend defined here, in the test module,
run through compress -> save -> load -> linear without touching a library file.

The toy format "sign8" stores sign(w) as int8 and one float32 scale per row (the mean |w|): crude,
but a complete format -- name and recipe grammar, defaults, pack / from_parts with validation, a
layout docstring. The toy backend runs it with torch (and only it), when named.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import sparseinfer as si
from sparseinfer.backends import Backend, register, unregister
from sparseinfer.backends.base import FormatTable
from sparseinfer.formats import PackedWeight, RecipePart, register_format, unregister_format
from sparseinfer.formats.base import check_tensor, check_weight


# -- 1. the format: one PackedWeight subclass -------------------------------------------------------

class SignWeight(PackedWeight):
    """sign8: W[n, k] ~= sign[n, k] * scale[n].

    Layout (N = out_features, K = in_features)::

        sign   int8    [N, K]   -1, 0 or 1
        scale  float32 [N]      mean |W[n, :]|
    """

    kind = "sign"
    grammar = "'sign8'"
    recipe_grammar = "sign8"

    def __init__(self, sign: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.sign, self.scale = sign.contiguous(), scale.contiguous()
        self.shape = tuple(sign.shape)
        self.fmt = "sign8"

    @classmethod
    def parse_name(cls, name):
        return {} if name == "sign8" else None

    @classmethod
    def from_recipe(cls, token, text):
        return RecipePart("sign8") if token == "sign8" else None

    @classmethod
    def from_dense(cls, weight, fmt="sign8"):
        check_weight(weight, fmt)
        w = weight.float()
        return cls(torch.sign(w).to(torch.int8), w.abs().mean(dim=1))

    def to_dense(self, dtype=None):
        return (self.sign.float() * self.scale[:, None]).to(dtype or torch.float32)

    def tensors(self):
        return {"sign": self.sign, "scale": self.scale}

    def params(self):
        return {}

    @classmethod
    def from_parts(cls, tensors, shape, params, fmt="sign8"):
        n, k = shape
        sign = check_tensor(tensors, "sign", torch.int8, (n, k), fmt)
        if sign.numel() and int(sign.abs().max()) > 1:
            raise ValueError(f"{fmt}: tensor 'sign' holds values other than -1, 0, 1")
        return cls(sign, check_tensor(tensors, "scale", torch.float32, (n,), fmt))


# -- 2. the backend: a Backend with a FormatTable of per-format implementations ---------------------

TOY_FORMATS = FormatTable()


@TOY_FORMATS.register(SignWeight)
class _ToySign:
    def prepack(self, w):
        return w.sign.float()  # the layout this backend wants: signs as float, made once per weight

    def linear(self, x, w, signs, bias):
        y = (x.float() @ signs.T) * w.scale
        return (y if bias is None else y + bias.float()).to(x.dtype)

    def kernel_name(self, w):
        return "toy:sign_matmul"


class ToyBackend(Backend):
    name = "toy"
    priority = 1
    auto_devices = frozenset()  # only when named: never picked for other formats' calls

    def availability(self):
        return True, "torch; for the architecture test"

    def supports(self, w, x):
        return TOY_FORMATS.get(w) is not None and not (x.requires_grad and torch.is_grad_enabled())

    def prepack(self, w, act=None):
        return w.prepacked("toy", TOY_FORMATS.get(w).prepack)

    def linear(self, x, w, bias, act=None):
        return TOY_FORMATS.get(w).linear(x, w, self.prepack(w, act), bias)

    def kernel_name(self, w, batch, act=None):
        return TOY_FORMATS.get(w).kernel_name(w)


@pytest.fixture
def toy():
    register_format(SignWeight)
    register(ToyBackend())
    try:
        yield
    finally:
        unregister("toy")
        unregister_format(SignWeight)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(40, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_toy_format_compress_save_load_linear(toy, tmp_path):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(5, 40)
    compressed = si.compress(model, "sign8")
    assert isinstance(compressed.fc1.packed, SignWeight)
    with torch.no_grad():
        want = compressed(x)
    dense_fc1 = compressed.fc1.packed.to_dense()
    torch.testing.assert_close(si.linear(x, compressed.fc1.packed, model.fc1.bias.detach(), backend="reference"),
                               x @ dense_fc1.T + model.fc1.bias.detach())

    si.save(compressed, tmp_path / "toy.sinf", example_inputs=(x,))
    loaded = si.load(tmp_path / "toy.sinf", backend="toy")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    rows = si.explain(loaded)
    assert {r["format"] for r in rows} == {"sign8"} and {r["kernel"] for r in rows} == {"toy:sign_matmul"}
    assert "toy" in loaded.get_submodule(rows[0]["layer"]).packed._prepacked  # prepacked at load


def test_toy_format_is_validated_and_named_in_errors(toy):
    w = si.pack(torch.randn(6, 10), "sign8")
    bad = {**w.tensors(), "sign": w.sign * 3}
    with pytest.raises(ValueError, match="other than -1, 0, 1"):
        si.formats.from_parts("sign8", bad, w.shape, {})
    with pytest.raises(ValueError, match=re.escape("'sign8'")):
        si.pack(torch.randn(2, 2), "nosuch")  # the known names include the new one
    with pytest.raises(Exception, match="no kernel for format 'sign8'"):
        si.linear(torch.randn(1, 10), w, backend="cpu")


def test_unregistered_again_after_the_test():
    with pytest.raises(ValueError, match="unknown format 'sign8'"):
        si.pack(torch.randn(2, 2), "sign8")
