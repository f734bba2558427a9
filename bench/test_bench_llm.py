"""Causal LM decode / prefill (bench/llm_decode.py): the smoke scope runs a tiny random Llama through
every path (dense, recipes with an int8 LM head, both thread settings, the native, lean and
transformers decoders); wider scopes run SmolLM2
(skipped with the reason when its GGUF is not installed). Figures: bench/README.md."""

from __future__ import annotations

import math

import pytest

import llm_decode

pytest.importorskip("transformers")


def test_llm_decode(smoke):
    if smoke:
        report = llm_decode.run("tiny", ("dense", "int8", "int4-g128", "2:4+int4"), threads=2, new_tokens=4,
                                prompt_tokens=8, rounds=1, log=lambda s: None)
    else:
        try:
            llm_decode.smollm2_source()
        except SystemExit as err:
            pytest.skip(str(err))
        report = llm_decode.run("smollm2", new_tokens=32, prompt_tokens=128, rounds=2, log=print)
    print(llm_decode.markdown(report))
    rows = {(r["variant"], r["threads"], r["decoder"]): r for r in report["rows"]}
    assert len(rows) == len(report["rows"]) and {t for _, t, _ in rows} == {"torch", "decode"}
    assert {d for _, _, d in rows} == {"native", "lean", "transformers"}
    for (v, t, d), r in rows.items():
        if d == "lean":  # the tiny model in fp32: the same greedy tokens through either forward
            assert v != "dense" or r["same_tokens_as_transformers"] == report["new_tokens"], r
    for r in report["rows"]:
        assert math.isfinite(r["decode_tok_s"]) and r["decode_tok_s"] > 0, r
        assert math.isfinite(r["prefill_tok_s"]) and r["prefill_tok_s"] > 0, r
    mb = {v: r["bytes_per_token"] for (v, _, _), r in rows.items()}
    assert mb["int4-g128"] < mb["int8"] < mb["dense"]
