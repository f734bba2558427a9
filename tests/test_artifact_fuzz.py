"""A bounded fuzz test of the artifact loader (issue 15): a few hundred seeded mutations of a small
real artifact, each of which must end in one of two ways:

* ``load`` raises ArtifactError, or
* ``load`` succeeds and the model's outputs are the reference backend's on the same loaded weights
  (so a mutation that keeps the artifact valid -- another code, another operator from the allow-list --
  may change the answer, but never make the kernels disagree with the reference, crash, or raise
  anything else; where the reference is not finite only that is compared).

Mutations: manifest JSON (values of other types, deleted or added keys, deep nesting), program.json
(the same, with the file hash updated so the checksums stay consistent), tensor contents and shapes
(with every checksum updated: only the structural checks stand in the way), and raw byte flips or
truncation of any file (checksums left stale). The program path costs ~50 ms a load, so most cases
use a weights-only artifact loaded into a skeleton; the whole test takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparseinfer as si
from sparseinfer.runtime.serialization import ArtifactError

SEED = 15
CASES = {"manifest": 90, "tensors": 90, "bytes": 60, "program": 60}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm = nn.Linear(32, 48), nn.LayerNorm(48)
        self.fc2, self.fc3 = nn.Linear(48, 24), nn.Linear(24, 16)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.norm(self.fc1(x)))))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    model = si.compress(Net(), {"default": "int4-g16-asym", "layers": {"fc2": "2:4+int8", "fc3": "sparse50+int8"}},
                        progress=False)
    root = tmp_path_factory.mktemp("fuzz")
    si.save(model, root / "program", (torch.randn(2, 32),))
    si.save(model, root / "weights", export=False)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _random_value(rng: random.Random):
    deep = []
    for _ in range(rng.choice([3, 70, 900])):
        deep = [deep]
    return rng.choice([None, True, False, 0, -1, 7, 2**70, -2**63, 1.5, float("nan"), "", "int8", "x" * 300,
                       [], [1, 2], [None], {}, {"a": 1}, {"file": "../../etc/passwd"}, deep])


def _mutate_json(doc, rng: random.Random):
    """One random edit somewhere in the tree: replace a value, delete a key / element, or add a key."""
    containers, stack = [], [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict) and item:
            containers.append(item)
            stack.extend(item.values())
        elif isinstance(item, list) and item:
            containers.append(item)
            stack.extend(item)
    target = rng.choice(containers)
    key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
    op = rng.random()
    if op < 0.7:
        target[key] = _random_value(rng)
    elif op < 0.85:
        del target[key]
    elif isinstance(target, dict):
        target[rng.choice(["extra", "bias", "tensors", "params", "target", "expr_str"])] = _random_value(rng)
    else:
        target.append(_random_value(rng))
    return doc


def _write_consistent(path: Path, manifest: dict) -> None:
    """Record the current files' sizes and hashes, so a mutation meets the checks past the checksums."""
    for name in list(manifest.get("files", {})):
        if (path / name).is_file():
            data = (path / name).read_bytes()
            manifest["files"][name] = {"bytes": len(data), "sha256": _sha(data)}
    (path / "sparseinfer.json").write_text(json.dumps(manifest))


def _mutate_tensors(path: Path, rng: random.Random) -> None:
    manifest = json.loads((path / "sparseinfer.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    name = rng.choice(sorted(tensors))
    t = tensors[name].clone()
    op = rng.random()
    if op < 0.6 and t.numel():  # new values in the tensor's dtype, at a few places
        flat = t.reshape(-1)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(flat.numel())
            if t.is_floating_point():
                flat[i] = rng.choice([0.0, -1e30, 1e30, float("nan"), float("inf"), rng.uniform(-3, 3)])
            else:
                info = torch.iinfo(t.dtype)
                flat[i] = rng.choice([info.min, info.max, 0, 1, rng.randint(max(info.min, -300), min(info.max, 300))])
    elif op < 0.8 and t.numel():  # one element fewer
        t = t.reshape(-1)[:-1].clone() if t.dim() == 1 else t[:-1].clone()
    else:  # another dtype
        t = t.to(rng.choice([torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32]))
    tensors[name] = t.contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    manifest["tensors"][name].update(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), sha256=_sha(data))
    _write_consistent(path, manifest)


def _mutate_bytes(path: Path, rng: random.Random) -> None:
    f = path / rng.choice(sorted(p.name for p in path.iterdir()))
    data = bytearray(f.read_bytes())
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data))]
    else:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


def _mutate(kind: str, path: Path, rng: random.Random) -> None:
    if kind == "manifest" and rng.random() < 0.05:  # nested past what json (or any recursive reader) takes
        depth = rng.choice([1000, 100_000])
        deep = "[" * depth + "]" * depth
        (path / "sparseinfer.json").write_text('{"format": "sparseinfer-artifact", "layers": ' + deep + "}")
    elif kind == "manifest":
        manifest = _mutate_json(json.loads((path / "sparseinfer.json").read_text()), rng)
        (path / "sparseinfer.json").write_text(json.dumps(manifest))
    elif kind == "program":
        program = _mutate_json(json.loads((path / "program.json").read_text()), rng)
        (path / "program.json").write_text(json.dumps(program))
        _write_consistent(path, json.loads((path / "sparseinfer.json").read_text()))
    elif kind == "tensors":
        _mutate_tensors(path, rng)
    else:
        _mutate_bytes(path, rng)


def _outcome(path: Path, program: bool, x: torch.Tensor) -> str:
    try:
        model = si.load(path, act="fp32") if program else si.load(path, model=Net(), act="fp32")
    except ArtifactError:
        return "refused"
    with torch.no_grad():
        y = model(x)
        for m in model.modules():
            if isinstance(m, si.CompressedLinear):
                m.backend = "reference"
        ref = model(x)
    # Where the reference is not finite (an inf met a pruned weight: the dense product makes 0 * inf = NaN,
    # a sparse kernel skips the zero) any value goes; elsewhere the two agree to fp32 summation order.
    finite = torch.isfinite(ref)
    scale = ref[finite].abs().max().item() if finite.any() else 1.0
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-4, atol=1e-4 * scale)
    return "loaded"


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread (on a busy machine, waking a team per op costs 20x the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loader_fuzz(artifacts, tmp_path, one_thread):
    rng = random.Random(SEED)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(SEED))
    seen = {"refused": 0, "loaded": 0}
    for kind, count in CASES.items():
        for i in range(count):
            program = kind == "program" or (kind in ("bytes", "tensors") and i % 4 == 0)
            case = tmp_path / f"{kind}-{i}"
            shutil.copytree(artifacts / ("program" if program else "weights"), case)
            _mutate(kind, case, rng)
            try:
                seen[_outcome(case, program, x)] += 1
            except Exception as err:  # anything but ArtifactError at load, or a load that disagrees
                raise AssertionError(f"{kind} mutation {i} (seed {SEED}, kept at {case}): "
                                     f"{type(err).__name__}: {str(err)[:500]}") from err
            shutil.rmtree(case)
    assert seen["refused"] > 100 and seen["loaded"] > 10, seen  # both outcomes are exercised
