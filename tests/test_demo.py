"""The MiniLM demo in a tiny configuration: the table, the numbers behind it, and save -> load."""

from __future__ import annotations

import time

import pytest
import torch

from sparseinfer.cli import main


@pytest.mark.slow
def test_demo_quick(capsys):
    assert main(["demo", "--quick", "--sentences", "6", "--batch-size", "3", "--recipes", "int8", "2:4",
                 "--save-load", "int8", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("recipe"))
    rows = {line.split()[0]: line.split() for line in lines[head + 2:head + 5]}
    assert set(rows) == {"dense", "int8", "2:4"}
    # int8 weights keep the embeddings almost identical; the linear layers shrink ~4x
    assert float(rows["int8"][4]) > 0.99 and rows["int8"][3].startswith("3.9")
    assert "on 6 sentences" in out and "batch of 6" in out  # latency batch capped by the sentences
    assert "save -> load (int8)" in out and "-> matches" in out


@pytest.mark.slow
def test_demo_int8_activations(capsys):
    assert main(["demo", "--sentences", "4", "--batch-size", "4", "--recipes", "int4", "--save-load", "int4",
                 "--repeat", "1", "--act", "int8"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("int4 "))
    assert float(row[4]) > 0.9  # int4 weights with int8 activations: embeddings still close
    assert "activations: int8" in out and "save -> load (int4)" in out and "-> matches" in out


def test_demo_table_format():
    from sparseinfer.apps.demo import Row, format_table

    dense = Row("dense fp32", 100, 100, 1.0, 1.0, 10.0, 10.0, "torch")
    table = format_table([Row("int8", 50, 100, 0.99, 0.98, 5.0, 10.0, "reference", 4.0)], dense)
    assert "2.00x" in table and "4.00x" in table and "0.9900" in table and table.count("\n") == 3


def test_each_recipe_is_timed_call_by_call_against_dense():
    """paired_latency_ms alternates the two models (after one warm-up each) and returns each one's median."""
    from sparseinfer.apps.demo import paired_latency_ms

    order = []

    class Recorder(torch.nn.Module):
        def __init__(self, name, seconds):
            super().__init__()
            self.name, self.seconds = name, seconds

        def forward(self, **batch):
            order.append(self.name)
            time.sleep(self.seconds)

    fast, slow = Recorder("packed", 0.001), Recorder("dense", 0.004)
    steps = []
    ms, dense_ms = paired_latency_ms(fast, slow, {"input_ids": None}, 3, step=lambda: steps.append(1))
    assert order == ["packed", "dense"] * 4 and len(steps) == 3
    assert 1.0 <= ms < dense_ms and dense_ms >= 4.0
