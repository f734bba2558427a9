"""An artifact is untrusted input (issue 15): tampered artifacts whose checksums are consistent -- the
attacker recomputed them -- must still be refused, with an ArtifactError naming what is wrong.

* program.json may call only side-effect-free operators (sparseinfer/runtime/program_check.py): file
  access, storage and in-place writes, unknown operators and Python hidden in symbolic expressions
  are refused by ``load`` and by ``sparseinfer inspect --verify``, and guard code is never run;
* a model whose forward writes intermediates in place is saved in functional form (it loads back);
  one that writes its buffers is refused at save;
* manifest fields of the wrong JSON type, a missing ``bias`` key, deep nesting; CSR duplicate columns;
* a save killed half-way leaves a temporary folder that is never loaded and is removed by the next save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparseinfer as si
from sparseinfer.cli import main
from sparseinfer.runtime import serialization
from sparseinfer.runtime.program_check import allowed_targets, check_expression
from sparseinfer.runtime.serialization import ArtifactError, ExportError


class Net(nn.Module):
    """Defined here only: a fresh process could not import it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _model():
    torch.manual_seed(0)
    return si.compress(Net(), {"default": "int8", "layers": {"fc2": "sparse50"}}, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "net.sinf"
    model = _model()
    si.save(model, path, (torch.randn(2, 32),))
    return model, path


@pytest.fixture
def artifact(saved, tmp_path):
    dst = tmp_path / "copy.sinf"
    shutil.copytree(saved[1], dst)
    return dst


def _consistent(path: Path) -> None:
    """Recompute the file sizes and SHA-256 in the manifest, as an attacker would."""
    m = json.loads((path / "sparseinfer.json").read_text())
    for name in m["files"]:
        data = (path / name).read_bytes()
        m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "sparseinfer.json").write_text(json.dumps(m))


def _edit_program(path: Path, edit) -> None:
    program = json.loads((path / "program.json").read_text())
    edit(program)
    (path / "program.json").write_text(json.dumps(program))
    _consistent(path)


def _graph(program: dict) -> dict:
    return program["graph_module"]["graph"]


def _meta(dtype: int, size: int) -> dict:  # a tensor_values entry (dtype: torch's serialized ScalarType)
    return {"dtype": dtype, "sizes": [{"as_int": size}], "requires_grad": False,
            "device": {"type": "cpu", "index": None}, "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0},
            "layout": 7}


def _node(target: str, name: str, inputs: list, kinds=None) -> dict:
    args = [{"name": n, "arg": a, "kind": 1} for n, a in inputs]
    return {"target": target, "inputs": args, "outputs": [{"as_tensor": {"name": name}}], "metadata": {},
            "is_hop_single_tensor_return": None, "name": name}


def _refused_everywhere(path: Path, match: str, capsys) -> None:
    """By load, by verify, and by `sparseinfer inspect --verify` (exit 2, the reason on stderr)."""
    with pytest.raises(ArtifactError, match=match):
        si.load(path)
    assert any(re.search(match, p) for p in serialization.verify(path)), serialization.verify(path)
    capsys.readouterr()
    assert main(["inspect", str(path), "--verify"]) == 2
    assert re.search(match, capsys.readouterr().err)


# -- program.json: operators ----------------------------------------------------------------------------

def test_file_writing_program_is_refused(artifact, tmp_path, capsys):
    """The issue's attack: map a victim file (aten.from_file, shared) and overwrite it (aten.fill_)."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"A" * 16)

    def inject(program):
        g = _graph(program)
        g["tensor_values"]["evil"] = g["tensor_values"]["evil2"] = _meta(1, 16)  # uint8[16]
        g["nodes"][:0] = [
            _node("torch.ops.aten.from_file.default", "evil",
                  [("filename", {"as_string": str(victim)}), ("shared", {"as_bool": True}), ("size", {"as_int": 16})]),
            _node("torch.ops.aten.fill_.Scalar", "evil2", [("self", {"as_tensor": {"name": "evil"}}),
                                                          ("value", {"as_int": 66})]),
        ]

    _edit_program(artifact, inject)
    assert serialization.verify(artifact) != []
    _refused_everywhere(artifact, r"node 'evil' calls 'torch\.ops\.aten\.from_file\.default'.*not on the allow-list",
                        capsys)
    assert victim.read_bytes() == b"A" * 16


def test_file_reading_program_is_refused(artifact, tmp_path, capsys):
    """A secret read into the model's output."""
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(range(16)))

    def inject(program):
        g = _graph(program)
        g["tensor_values"]["leak"] = _meta(1, 16)
        g["nodes"].insert(0, _node("torch.ops.aten.from_file.default", "leak",
                                   [("filename", {"as_string": str(secret)}), ("size", {"as_int": 16})]))
        g["outputs"] = [{"as_tensor": {"name": "leak"}}]

    _edit_program(artifact, inject)
    _refused_everywhere(artifact, r"node 'leak' calls 'torch\.ops\.aten\.from_file", capsys)


@pytest.mark.parametrize("target,why", [
    ("torch.ops.aten.add_.Tensor", "in place on an input"),
    ("torch.ops.aten.add.out", "an out= overload writes its argument"),
    ("torch.ops.aten.set_.source_Tensor", "rebinds storage"),
    ("torch.ops.aten.resize_.default", "memory-format / storage mutation"),
    ("torch.ops.aten.as_strided.default", "arbitrary strides over a storage"),
    ("torch.ops.aten.empty.memory_format", "uninitialised memory"),
    ("torch.save", "not an operator at all"),
    ("builtins.eval", "not an operator at all"),
    ("#myns:evil", "an extension operator"),
    ("_operator.pow", "unbounded integers"),
])
def test_operators_off_the_allow_list_are_refused(artifact, target, why, capsys):
    def inject(program):
        g = _graph(program)
        name = next(iter(g["tensor_values"]))  # any tensor of the graph
        g["tensor_values"]["bad"] = g["tensor_values"][name]
        g["nodes"].insert(0, _node(target, "bad", [("self", {"as_tensor": {"name": name}}),
                                                   ("other", {"as_tensor": {"name": name}})]))

    _edit_program(artifact, inject)
    _refused_everywhere(artifact, rf"node 'bad' calls {re.escape(repr(target))}, which is not on the allow-list",
                        capsys)


def test_operator_arguments_and_nested_graphs_are_checked(artifact, capsys):
    """An operator named as an argument (as_operator), anywhere in the JSON, is checked too."""
    def inject(program):
        node = next(n for n in _graph(program)["nodes"] if n["target"].endswith("packed_linear.default"))
        node["inputs"].append({"name": "fn", "arg": {"as_operator": "torch.ops.aten.from_file.default"}, "kind": 2})

    _edit_program(artifact, inject)
    _refused_everywhere(artifact, r"names the operator 'torch\.ops\.aten\.from_file\.default'", capsys)


def test_writing_an_input_through_the_signature_is_refused(artifact, capsys):
    def inject(program):
        sig = program["graph_module"]["signature"]
        buffer = next(s["buffer"] for s in sig["input_specs"] if "buffer" in s)
        out = sig["output_specs"][0]["user_output"]["arg"]
        sig["output_specs"].append({"buffer_mutation": {"arg": out, "buffer_name": buffer["buffer_name"]}})

    _edit_program(artifact, inject)
    _refused_everywhere(artifact, r"an output of kind 'buffer_mutation' writes the model's state", capsys)


# -- program.json: expressions and guards ------------------------------------------------------------------

def test_python_in_a_shape_expression_never_runs(artifact, tmp_path, capsys):
    """torch hands expression strings to sympy.sympify, which evaluates Python: this one would create a file."""
    marker = tmp_path / "pwned"

    def inject(program):
        values = _graph(program)["tensor_values"]
        dim = next(s for v in values.values() for s in v["sizes"] if "as_expr" in s)
        dim["as_expr"]["expr_str"] = f"Symbol(str(__import__('os').system('touch {marker}')))"

    _edit_program(artifact, inject)
    _refused_everywhere(artifact, r"the expression .* holds something other than arithmetic", capsys)
    assert not marker.exists()


def test_guard_code_is_never_run(artifact, tmp_path):
    """torch can exec() the program's guards_code: load drops it (and the program still loads)."""
    marker = tmp_path / "pwned"
    guard = f"__import__('os').system('touch {marker}') or True"
    _edit_program(artifact, lambda p: p.__setitem__("guards_code", [guard]))
    model = si.load(artifact)
    model(torch.randn(3, 32))
    assert not marker.exists()


@pytest.mark.parametrize("expr", [
    "Mul(Integer(384), Symbol('s53', positive=True, integer=True))",  # as torch 2.13 writes them
    "Pow(Symbol('s70', positive=True, integer=True), Integer(2))", "FloorDiv(s0, 2) + 1", "Max(1, s0)", "s0**2",
    "Eq(Mod(s0, 2), 0)", "-oo", "Float('1.5', precision=53)",
])
def test_shape_arithmetic_passes(expr):
    check_expression(expr)


@pytest.mark.parametrize("expr,match", [
    ("__import__('os')", "calls '__import__'"), ("s0.__class__", "other than arithmetic"),
    ("Symbol('s0', evil=1)", "keyword 'evil'"), ("eval", "neither a shape symbol"), ("s0[0]", "other than arithmetic"),
    ("Pow(Integer(10), Integer(10000000000))", "power"), ("Pow(2, s0)", "power"),
    ("Integer(99999999999999999999)", "int64"),
    ("Mul('os.system', 2)", "other than arithmetic"), ("(" * 100 + "s0" + ")" * 100, "deeper"),
])
def test_other_expressions_are_refused(expr, match):
    with pytest.raises(ArtifactError, match=match):
        check_expression(expr)


def test_allow_list_holds_no_writer():
    """Every allowed aten overload writes none of its arguments (schema alias info), and nothing that
    touches files or raw storage is on it."""
    for name, op in allowed_targets().items():
        schema = getattr(op, "_schema", None)
        if schema is not None:
            assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments), name
    aten = [name.split(".")[-2:] for name in allowed_targets() if name.startswith("torch.ops.aten.")]
    assert not {"from_file", "set_", "resize_", "as_strided", "as_strided_", "empty", "copy_", "fill_",
                "batch_norm"} & {packet for packet, _ in aten}
    assert not [o for _, o in aten if o == "out" or o.endswith("_out")]


# -- what torch.export emits, and what save does with it ---------------------------------------------------

def test_tiny_llama_round_trip():
    """A causal-LM architecture (rotary embeddings, SDPA, RMSNorm, SiLU) exports only allowed operators."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = si.compress(LlamaForCausalLM(cfg).eval(), "int4-g32", progress=False)
    ids = torch.randint(0, 100, (2, 7))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        si.save(model, Path(tmp) / "llama", {"input_ids": ids, "use_cache": False})
        assert serialization.verify(Path(tmp) / "llama") == []
        loaded = si.load(Path(tmp) / "llama")
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids, use_cache=False)["logits"],
                                       model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)


def test_in_place_forward_is_saved_functional_and_buffer_writes_are_refused(tmp_path):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, x):
            h = self.fc(x)
            h.add_(1.0)
            h[:, 0] = 0.0
            return h.relu_()

    class Counter(InPlace):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.fc(x) * self.calls

    model = si.compress(InPlace(), "int8", progress=False)
    si.save(model, tmp_path / "inplace", torch.randn(2, 16))
    nodes = json.loads((tmp_path / "inplace" / "program.json").read_text())["graph_module"]["graph"]["nodes"]
    assert "torch.ops.aten.add.Tensor" in {n["target"] for n in nodes} and not any("_." in n["target"] for n in nodes)
    x = torch.randn(3, 16)
    torch.testing.assert_close(si.load(tmp_path / "inplace")(x), model(x), rtol=0, atol=0)
    with pytest.raises(ExportError, match=r"buffer_mutation.*export=False"):
        si.save(si.compress(Counter(), "int8", progress=False), tmp_path / "counter", torch.randn(2, 16))
    assert not (tmp_path / "counter").exists()


# -- the manifest --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda m: m["layers"]["fc1"].__setitem__("params", [1]),
     r"layers\['fc1'\]\.params must be an object, got an array"),
    (lambda m: m["layers"]["fc1"].__setitem__("params", "x"), r"params must be an object, got a string"),
    (lambda m: m["layers"]["fc1"].pop("bias"), r"layers\['fc1'\] lacks the key 'bias'"),
    (lambda m: m["layers"]["fc1"].__setitem__("tensors", ["a"]), r"tensors must be an object"),
    (lambda m: m["layers"]["fc1"].__setitem__("shape", "48x32"), r"shape must be 2 integers"),
    (lambda m: m["layers"]["fc1"].__setitem__("module", "Evil"), r"module must be one of"),
    (lambda m: m["layers"]["fc1"]["params"].__setitem__("evil", 1), r"params .* are not those of the format"),
    (lambda m: m["layers"]["fc1"]["params"].__setitem__("group_size", "32"), r"group_size must be an int"),
    (lambda m: m["files"].__setitem__("model.safetensors", "x"), r"files\['model.safetensors'\] must be an object"),
    (lambda m: m["aliases"].__setitem__("x", 3), r"aliases\['x'\] must be a string"),
    (lambda m: m.__setitem__("model", "x"), r"model must be an object"),
    (lambda m: m.__setitem__("program", [1]), r"program must be an object"),
    (lambda m: m["tensors"]["fc1.bias"].__setitem__("shape", None), r"tensors\['fc1.bias'\]\.shape"),
    (lambda m: m["model"].__setitem__("metadata", json.loads("[" * 200 + "]" * 200)), r"nested deeper than 64"),
])
def test_manifest_fields_of_the_wrong_type_are_refused(artifact, edit, match, capsys):
    mpath = artifact / "sparseinfer.json"
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))
    _refused_everywhere(artifact, match, capsys)


def test_deeply_nested_manifest_is_refused(artifact, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    (artifact / "sparseinfer.json").write_text('{"format": "sparseinfer-artifact", "x": ' + deep + "}")
    _refused_everywhere(artifact, "nested too deeply", capsys)


def test_save_refuses_metadata_it_could_not_load(tmp_path):
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="save: metadata: JSON nested deeper than"):
        si.save(_model(), tmp_path / "m", export=False, metadata={"deep": deep})
    assert not (tmp_path / "m").exists()


def test_csr_duplicate_columns_with_consistent_checksums_are_refused(artifact, capsys):
    """The cpu kernels would sum a repeated column, the reference keep one: the answer would depend on
    the batch size. The loader refuses it (formats/csr.py: columns strictly increase within a row)."""
    tensors = load_file(str(artifact / "model.safetensors"))
    col, crow = tensors["fc2.packed_col"].clone(), tensors["fc2.packed_crow"]
    row = next(r for r in range(len(crow) - 1) if crow[r + 1] - crow[r] >= 2)
    col[int(crow[row]) + 1] = col[int(crow[row])]
    tensors["fc2.packed_col"] = col
    save_file(tensors, str(artifact / "model.safetensors"))
    m = json.loads((artifact / "sparseinfer.json").read_text())
    m["tensors"]["fc2.packed_col"]["sha256"] = hashlib.sha256(col.numpy().tobytes()).hexdigest()
    (artifact / "sparseinfer.json").write_text(json.dumps(m))
    _consistent(artifact)
    _refused_everywhere(artifact, rf"layer 'fc2'.*column indices of row {row} must be strictly increasing", capsys)


# -- interrupted saves -----------------------------------------------------------------------------------

KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    import sparseinfer as si
    from sparseinfer.runtime import serialization
    real = serialization.write_bytes
    def die_before_the_manifest(path, data):
        if path.name == "sparseinfer.json":
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    serialization.write_bytes = die_before_the_manifest
    model = si.compress(torch.nn.Sequential(torch.nn.Linear(16, 8)), "int8", progress=False)
    si.save(model, sys.argv[1], export=False)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or os.name != "posix", reason="needs POSIX signals and flock")
def test_killed_save_leaves_a_folder_that_is_never_loaded_and_is_cleaned_up(tmp_path):
    target = tmp_path / "m.sinf"
    model = si.compress(nn.Sequential(nn.Linear(16, 8)), "int8", progress=False)
    si.save(model, target, export=False)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".m.sinf.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    shutil.copy(target / "sparseinfer.json", leftovers[0])  # even with a manifest in it, it is not an artifact
    with pytest.raises(ArtifactError, match="temporary folder of a save that did not finish"):
        si.load(leftovers[0], model=nn.Sequential(nn.Linear(16, 8)))
    assert main(["inspect", str(leftovers[0])]) == 2
    x = torch.randn(2, 16)
    torch.testing.assert_close(si.load(target, model=nn.Sequential(nn.Linear(16, 8)))(x), model(x))  # old one intact
    (tmp_path / ".other.sinf.tmp-0123abcd").mkdir()  # another target's: not this save's business
    si.save(model, target, export=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.sinf.tmp-0123abcd", "m.sinf"]
