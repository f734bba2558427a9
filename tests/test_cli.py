"""CLI smoke tests: compress / inspect / run (and demo argument errors) through
``sparseinfer.cli.main``, plus one real subprocess. Bad input gives a message and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparseinfer as si
from sparseinfer.cli import main


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 8)

    def forward(self, x, ids):
        return self.fc2(torch.relu(self.fc1(x))) + ids.float().mean(-1, keepdim=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A generic (non-encoder) artifact with an exported program, and one without."""
    torch.manual_seed(0)
    model = si.compress(Net(), "int8", progress=False)
    root = tmp_path_factory.mktemp("cli")
    x, ids = torch.randn(3, 24), torch.randint(5, 9, (3, 4))
    si.save(model, root / "net.sinf", (x, ids), metadata={"note": "test"})
    si.save(model, root / "bare.sinf", export=False)
    return root


def test_inspect(tiny, capsys):
    assert main(["inspect", str(tiny / "net.sinf"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "int8" in out and "48x24" in out and "verify: OK" in out
    assert "inputs (float32[*, 24], int64[*, *])" in out
    assert main(["inspect", str(tiny / "bare.sinf"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["program"] is None and data["layers"]["fc2"]["fmt"] == "int8"


def test_inspect_refuses_a_corrupt_artifact(tiny, tmp_path, capsys):
    import shutil

    art = tmp_path / "bad.sinf"
    shutil.copytree(tiny / "net.sinf", art)
    f = art / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["inspect", str(art)]) == 0  # the summary needs only the manifest
    capsys.readouterr()
    assert main(["inspect", str(art), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "checksum" in err and "Traceback" not in err
    (art / "sparseinfer.json").unlink()
    assert main(["inspect", str(art)]) == 2
    assert "no sparseinfer.json" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_generic_artifact(tiny, capsys):
    assert main(["run", str(tiny / "net.sinf"), "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "inputs (random, example shapes): [3, 24] torch.float32, [3, 4] torch.int64" in out
    assert "output: torch.float32 [3, 8]" in out and "latency:" in out


def test_run_errors(tiny, capsys):
    assert main(["run", str(tiny / "bare.sinf")]) == 2
    assert "export=False" in capsys.readouterr().err
    assert main(["run", str(tiny / "net.sinf"), "--text", "hello"]) == 2
    assert "sentence-encoder" in capsys.readouterr().err


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["compress", "minilm", "int3", "-o", str(tmp_path / "x")]) == 2
    assert "recipe" in capsys.readouterr().err
    assert main(["compress", str(tmp_path), "int8", "-o", str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["demo", "--sentences", "0"]) == 2
    assert "--sentences" in capsys.readouterr().err
    assert main(["demo", "--recipes", "int3"]) == 2
    assert "recipe" in capsys.readouterr().err


def test_real_subprocess(tiny):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "sparseinfer.cli", "inspect", str(tiny / "net.sinf"), "--verify"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "verify: OK" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sparseinfer.cli", "inspect", str(tiny / "nope")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_compress_inspect_run_minilm(tmp_path, capsys):
    out = tmp_path / "minilm.sinf"
    assert main(["compress", "minilm", "2:4+int8", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in text and "2:4+int8" in text and "wrote" in text
    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "input_ids=int64[*, *]" in text and "verify: OK" in text
    assert main(["run", str(out), "--text", "A cat sits on the mat.", "--text", "A dog lies on the rug.",
                 "--repeat", "1"]) == 0
    text = capsys.readouterr().out
    assert "embeddings: [2, 384]" in text and "cosine(text 1, text 2)" in text
