"""Canonical formats: exact round trips, layouts, sizes and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseinfer as si
from sparseinfer.formats import from_parts, parse_format
from sparseinfer.formats.int4 import pack_nibbles, unpack_nibbles
from sparseinfer.formats.nm import pack_bits, unpack_bits

# Per-format bound on ||W - dequant(W)|| / ||W|| for Gaussian weights (quantization only; N:M
# and CSR drop weights on purpose and are checked on their kept entries instead).
QUANT_ERROR = {"int8": 0.01, "int4": 0.15}

CASES = [
    ("int8", {}),
    ("int8", {"group_size": 32}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 32, "symmetric": False}),
    ("int4", {"group_size": None}),
    ("int4", {"group_size": None, "symmetric": False}),
    ("2:4", {}),
    ("1:4", {}),
    ("4:8", {}),
    ("2:3", {}),
    ("2:4+int8", {}),
    ("2:4+int8", {"group_size": 16}),
    ("2:4+int4", {"group_size": 16}),
    ("2:4+int4", {"group_size": 16, "symmetric": False}),
    ("csr", {}),
    ("csr+int8", {}),
]
SHAPES = [(1, 33), (7, 100), (3, 37), (33, 129), (16, 64)]


def _weight(shape, fmt, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if fmt.startswith("csr"):
        w = w * (torch.rand(*shape, generator=g) > 0.7)
    return w.to(dtype)


def _fits(fmt, params, k):
    gs = params.get("group_size")
    if gs is None:
        return True
    spec = parse_format(fmt)
    kc = math.ceil(k / spec["m"]) * spec["n"] if spec["kind"] == "nm" else k
    return gs <= kc


@pytest.mark.parametrize("fmt,params", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_exact(fmt, params, shape):
    if not _fits(fmt, params, shape[1]):
        pytest.skip("group larger than K (covered by test_bad_group_size)")
    w = si.pack(_weight(shape, fmt, seed=hash((fmt, shape)) % 1000), fmt, **params)
    dense = w.to_dense()
    assert dense.shape == shape
    again = si.pack(dense, w.fmt, **w.params())
    assert again.equal(w), f"{fmt} {params} {shape}: pack(to_dense(w)) differs from w"
    assert torch.equal(again.to_dense(), dense)
    rebuilt = from_parts(w.fmt, w.tensors(), w.shape, w.params())
    assert rebuilt.equal(w)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantization_error_is_bounded(fmt):
    w = _weight((64, 256), fmt, seed=1)
    err = (si.pack(w, fmt, group_size=64).to_dense() - w).norm() / w.norm()
    assert err < QUANT_ERROR[fmt]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_values_keep_dtype_and_round_trip(dtype):
    for fmt in ("2:4", "csr"):
        w = si.pack(_weight((8, 40), fmt, 3, dtype), fmt)
        assert w.to_dense().dtype == dtype
        assert si.pack(w.to_dense(), fmt).equal(w)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 70),
    fmt=st.sampled_from(["int8", "int4", "int4-asym", "2:4", "2:4+int8", "2:4+int4", "1:3", "csr", "csr+int8"]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-6, 1.0, 3.5, 1e4]),
    integer_valued=st.booleans(),
)
def test_round_trip_property(n, k, fmt, seed, scale, integer_valued):
    """Idempotence on adversarial values: tiny/huge magnitudes, integer-valued ties, zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    if integer_valued:  # many exact ties and half-way cases
        w = torch.round(w * 2) / 2
    w[torch.rand(n, k, generator=g) < 0.2] = 0
    params = {"symmetric": False, "group_size": None} if fmt == "int4-asym" else {}
    fmt = fmt.replace("-asym", "")
    if fmt in ("int4", "2:4+int4") and not params:
        params = {"group_size": None}
    if parse_format(fmt)["kind"] == "nm" and k < parse_format(fmt)["m"]:
        k = parse_format(fmt)["m"]
        w = torch.nn.functional.pad(w, (0, k - w.shape[1]), value=1.0)
    packed = si.pack(w, fmt, **params)
    assert si.pack(packed.to_dense(), packed.fmt, **packed.params()).equal(packed)


def test_int4_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]])
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_nibbles(packed), codes.to(torch.int32))


def test_int4_symmetric_largest_magnitude_maps_to_code_zero():
    w = torch.tensor([[0.5, -2.0, 1.0, 0.25]])
    p = si.pack(w, "int4", group_size=None)
    assert p.scale.item() == 0.25  # -2.0 / -8
    assert p.codes()[0, 1].item() == 0  # -8 + 8
    assert p.zero is None and p.nbytes == 2 + 4


def test_nm_metadata_layout_2_4():
    w = torch.tensor([[0.0, 5.0, 0.0, -7.0, 9.0, 0.0, 1.0, 0.0]])
    p = si.pack(w, "2:4")
    assert p.values.tolist() == [[5.0, -7.0, 9.0, 1.0]]
    # indices 1, 3, 0, 2 at 2 bits each, little-endian: 0b10_00_11_01
    assert p.meta.tolist() == [[0b10001101]]
    assert torch.equal(p.to_dense(), w)


def test_nm_kept_zeros_take_lowest_indices():
    w = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    p = si.pack(w, "2:4")
    assert p.indices().tolist() == [[0, 3]]


@pytest.mark.parametrize("bits,count", [(1, 9), (2, 12), (3, 11), (4, 5)])
def test_bit_stream_round_trip(bits, count):
    fields = torch.randint(0, 2**bits, (3, count), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(fields, bits)
    assert packed.shape == (3, math.ceil(count * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, count), fields)


def test_padding_is_recorded_and_zero():
    w = si.pack(torch.randn(4, 100), "int4", group_size=64)
    assert w.shape == (4, 100) and w.qweight.shape == (4, 64) and w.scale.shape == (4, 2)
    assert (w.codes()[:, 100:] == 8).all()  # padded columns hold the code of 0
    nm = si.pack(torch.randn(4, 10), "2:4")
    assert nm.kp == 12 and nm.kc == 6 and nm.to_dense().shape == (4, 10)


def test_nbytes_counts_packed_tensors():
    n, k = 64, 256
    assert si.pack(torch.randn(n, k), "int8").nbytes == n * k + n * 4
    assert si.pack(torch.randn(n, k), "int4", group_size=128).nbytes == n * k // 2 + n * 2 * 4
    assert si.pack(torch.randn(n, k), "2:4").nbytes == n * k // 2 * 4 + n * k // 4 // 2
    assert si.pack(torch.randn(n, k), "2:4+int4", group_size=64).nbytes == n * k // 4 + n * 2 * 4 + n * k // 8


def test_csr_density():
    w = torch.zeros(10, 10)
    w[0, 3], w[9, 9] = 1.0, -2.0
    p = si.pack(w, "csr")
    assert p.nnz == 2 and p.crow.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2] and p.col.tolist() == [3, 9]


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "weight,fmt,params,match",
    [
        (torch.randn(4), "int8", {}, r"2-D.*\(4,\)"),
        (torch.randn(2, 3, 4), "int4", {}, r"2-D.*\(2, 3, 4\)"),
        (torch.randn(4, 64).to(torch.float64), "int8", {}, r"float64.*\(4, 64\)"),
        (torch.randint(0, 5, (4, 64)), "int8", {}, r"int64"),
        (torch.tensor([[1.0, float("nan")]]), "int8", {}, r"NaN/Inf"),
        (torch.tensor([[1.0, float("inf")]]), "2:4", {}, r"NaN/Inf"),
        (torch.randn(4, 64), "int4", {"group_size": 48}, r"group_size=48 is not a power of two.*\(4, 64\)"),
        (torch.randn(4, 64), "int4", {"group_size": 128}, r"group_size=128 is larger than K=64"),
        (torch.randn(4, 64), "int8", {"group_size": 0}, r"group_size=0"),
        (torch.randn(4, 64), "4:4", {}, r"1 <= n < m.*n=4, m=4"),
        (torch.randn(4, 64), "5:4", {}, r"n=5, m=4"),
        (torch.randn(4, 64), "int3", {}, r"unknown format 'int3'"),
        (torch.randn(4, 64), "int8", {"bogus": 1}, r"bad parameters \['bogus'\]"),
        (torch.randn(4, 64), "2:4+int4", {"group_size": 64}, r"group_size=64 counts kept values.*32"),
        (torch.empty(0, 4), "int8", {}, r"empty"),
    ],
)
def test_bad_input_names_the_problem(weight, fmt, params, match):
    with pytest.raises(ValueError, match=match):
        si.pack(weight, fmt, **params)


def test_from_parts_rejects_corrupt_tensors():
    w = si.pack(torch.randn(8, 64), "int4", group_size=32)
    t = dict(w.tensors())
    t["scale"] = t["scale"][:, :1]
    with pytest.raises(ValueError, match="scale"):
        from_parts("int4", t, w.shape, w.params())
    nm = si.pack(torch.randn(4, 16), "2:4")
    bad = dict(nm.tensors())
    bad["meta"] = torch.full_like(nm.meta, 0xFF)  # indices 3,3: not increasing
    with pytest.raises(ValueError, match="corrupt metadata"):
        from_parts("2:4", bad, nm.shape, nm.params())
    csr = si.pack(torch.randn(4, 16), "csr")
    bad = dict(csr.tensors())
    bad["col"] = torch.full_like(csr.col, 99)
    with pytest.raises(ValueError, match="out of range"):
        from_parts("csr", bad, csr.shape, csr.params())


def test_csr_columns_strictly_increase_within_a_row():
    """A repeated column would be summed by the cpu kernels and kept once by the reference (their
    answers would differ): from_parts refuses it, as it does columns out of order."""
    csr = si.pack(torch.tensor([[1.0, 2.0, 0.0, 3.0], [0.0, 4.0, 5.0, 0.0], [6.0, 0.0, 0.0, 7.0]]), "csr")
    assert csr.col.tolist() == [0, 1, 3, 1, 2, 0, 3]
    for cols, match in [([0, 1, 3, 2, 2, 0, 3], "row 1 must be strictly increasing, got 2 then 2"),
                        ([0, 3, 1, 1, 2, 0, 3], "row 0 must be strictly increasing, got 3 then 1"),
                        ([0, 1, 1, 1, 2, 0, 3], "row 0 must be strictly increasing, got 1 then 1")]:
        bad = {**csr.tensors(), "col": torch.tensor(cols, dtype=torch.int32)}
        with pytest.raises(ValueError, match=match):
            from_parts("csr", bad, csr.shape, {})
    ok = {**csr.tensors(), "col": torch.tensor([0, 1, 3, 0, 3, 0, 1], dtype=torch.int32)}  # a row may restart at 0
    assert from_parts("csr", ok, csr.shape, {}).col.tolist() == [0, 1, 3, 0, 3, 0, 1]


@pytest.mark.parametrize("zero,match", [
    (torch.tensor([[-3], [2], [3], [4]]), r"0\.\.15, got -3\.\.4"),  # a uint8 cast would make it 253
    (torch.tensor([[16], [2], [3], [4]], dtype=torch.uint8), r"0\.\.15, got 2\.\.16"),
    (torch.tensor([[1.5], [2.0], [3.0], [4.0]]), "integers"),
    (torch.zeros(4, 2), r"shape \(4, 1\)"),
])
def test_given_int4_zero_points_are_checked_at_pack(zero, match):
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match=match):
        si.pack(w, "int4", group_size=32, symmetric=False, scale=torch.ones(4, 1), zero=zero)
    with pytest.raises(ValueError, match=match):  # the same through N:M values
        si.pack(torch.randn(4, 64), "2:4+int4", group_size=32, symmetric=False, scale=torch.ones(4, 1), zero=zero)
    good = torch.tensor([[0], [2], [8], [15]], dtype=torch.uint8)
    packed = si.pack(w, "int4", group_size=32, symmetric=False, scale=torch.ones(4, 1), zero=good)
    assert torch.equal(packed.zero, good)
    assert from_parts("int4", packed.tensors(), packed.shape, packed.params()).equal(packed)  # and it loads
    with pytest.raises(ValueError, match="symmetric=True"):
        si.pack(w, "int4", group_size=32, scale=torch.ones(4, 1), zero=good)
