"""`sparseinfer sweep` end to end on the digits classifier (--quick), and MiniLM evaluation."""

from __future__ import annotations

import json

import pytest

from sparseinfer.cli import main


def test_sweep_quick_digits(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "digits", "--quick", "--samples", "200", "--tune", "0.02", "--minimize", "size",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| `int8` |" in printed and "Pareto frontier:" in printed and "auto recipe:" in printed
    report = json.loads((out / "sweep.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["dense", "int8", "int4-g32", "2:4", "auto<=0.02"]
    assert report["info"]["samples"] == 200 and report["info"]["quality_name"] == "accuracy"
    assert report["rows"][-1]["drop"] <= 0.02
    assert (out / "sweep.png").stat().st_size > 10_000 and (out / "sweep.html").exists()


def test_sweep_bad_arguments(capsys):
    assert main(["sweep", "--model", "digits", "--repeat", "0"]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--model", "resnet"])


@pytest.mark.slow
def test_minilm_embeddings_survive_int8():
    import sparseinfer as si
    from sparseinfer.eval.data import minilm, minilm_batches, sentences

    model, tokenizer = minilm()
    batches = minilm_batches(tokenizer, sentences(8), batch_size=4)
    ev = si.evaluate(model, si.compress(model, "int8", progress=False), batches)
    assert ev["task"] == "embedding" and ev["n"] == 8 and ev["cosine_min"] > 0.99
