"""sparseinfer.evaluate and its statistics on hand-made outputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparseinfer as si
from sparseinfer.eval import collect, expected_calibration_error, wilson_interval
from sparseinfer.eval.metrics import paired_difference_interval


class Lookup(nn.Module):
    """Returns fixed rows of ``table`` for integer sample indices: outputs we choose exactly."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))

    def forward(self, idx):
        return self.table[idx]


LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
GROUPS = ["a", "a", "a", "b", "b", "b"]
ORIG = [[.8, .1, .1], [.1, .7, .2], [.2, .2, .6], [.5, .3, .2], [.6, .3, .1], [.1, .1, .8]]  # 5/6 right
COMP = [[.7, .2, .1], [.5, .4, .1], [.3, .1, .6], [.3, .6, .1], [.7, .2, .1], [.1, .1, .8]]  # 3/6 right


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-5) and hi == pytest.approx(0.94331, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    lo, hi = wilson_interval(50, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 0.0962, abs=1e-4)
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="outside"):
        wilson_interval(11, 10)


def test_expected_calibration_error_by_hand():
    probs = torch.tensor([[.9, .1], [.9, .1], [.6, .4], [.2, .8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    # bins: {0.9 right, 0.9 wrong}: |0.5-0.9|*2/4; {0.6 right}: 0.4/4; {0.8 right}: 0.2/4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2 + 0.1 + 0.05, abs=1e-12)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == 0.0


def test_paired_difference_interval():
    a = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    diff, (lo, hi) = paired_difference_interval(a, b)
    # discordant 2 / 0 of 6 -> 2.5 / 0.5 of 8 after adding 0.5 per cell (Agresti-Min)
    half = 1.959963984540054 * math.sqrt(3 - 2 ** 2 / 8) / 8
    assert diff == pytest.approx(1 / 3) and lo == pytest.approx(0.25 - half) and hi == pytest.approx(0.25 + half)
    same = torch.ones(200, dtype=torch.bool)
    diff, (lo, hi) = paired_difference_interval(same, same)  # no discordant pair: still a width
    assert diff == 0 and hi == pytest.approx(1.959963984540054 / 202) and lo == pytest.approx(-hi)


def test_classification_metrics_exact():
    idx = torch.arange(6)
    ev = si.evaluate(Lookup(ORIG), Lookup(COMP), (idx, LABELS, GROUPS))
    assert ev["task"] == "classification" and ev["n"] == 6 and ev["quality_name"] == "accuracy"
    assert ev["accuracy_original"] == pytest.approx(5 / 6) and ev["accuracy"] == pytest.approx(0.5)
    assert ev["accuracy_ci"] == pytest.approx(wilson_interval(3, 6)) and ev.quality == pytest.approx(0.5)
    assert ev["accuracy_drop"] == pytest.approx(1 / 3) and ev.drop == pytest.approx(1 / 3)
    assert ev["agreement"] == pytest.approx(4 / 6)
    assert ev["confidence_diff"] == pytest.approx(0.5 / 6, abs=1e-6)  # |.1 .2 0 .1 .1 0| / 6
    # compressed: conf .7 (right) .7 (wrong) | .5 wrong | .6 right, .6 wrong | .8 right
    assert ev["ece"] == pytest.approx((0.2 * 2 + 0.5 + 0.1 * 2 + 0.2) / 6, abs=1e-6)
    assert ev["critical_failures"] == 2  # samples 1 and 3; sample 4 was wrong in the original too
    assert [f["index"] for f in ev["failures"]] == [1, 3]  # gaps 0.7-0.4 then 0.5-0.3
    assert ev["failures"][0]["gap"] == pytest.approx(0.3, abs=1e-6) and ev["failures"][1]["group"] == "b"
    assert ev["failures"][0]["compressed_pred"] == 0 and ev["failures"][0]["original_pred"] == 1
    assert ev["groups"]["a"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "accuracy_original": 1.0}
    assert ev["groups"]["b"]["accuracy"] == pytest.approx(1 / 3)
    assert ev["disparate_impact"] == pytest.approx(0.5) and ev["disparate_impact_original"] == pytest.approx(2 / 3)
    text = str(ev)
    assert "accuracy drop" in text and "disparate impact 0.5000" in text and "group b" in text


def test_logits_are_softmaxed_and_unlabelled_gives_agreement():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    flipped = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, -1.0]])
    ev = si.evaluate(Lookup(logits), Lookup(flipped), torch.arange(3), task="classification")
    assert ev["quality_name"] == "agreement" and ev.quality == pytest.approx(2 / 3) and "accuracy" not in ev
    expected = (torch.softmax(logits, 1).max(1).values - torch.softmax(flipped, 1).max(1).values).abs().mean()
    assert ev["confidence_diff"] == pytest.approx(expected.item(), abs=1e-6)  # same top-1 conf: 0


def test_dataloader_batches_and_groups_argument():
    ds = TensorDataset(torch.arange(6), LABELS)
    ev = si.evaluate(Lookup(ORIG), Lookup(COMP), DataLoader(ds, batch_size=4), groups=GROUPS)
    assert ev["accuracy"] == pytest.approx(0.5) and ev["disparate_impact"] == pytest.approx(0.5)
    reference = collect(Lookup(ORIG), DataLoader(ds, batch_size=4))  # reused for several candidates
    again = si.evaluate(reference, Lookup(COMP), DataLoader(ds, batch_size=4), groups=GROUPS)
    assert again == ev


def test_embedding_cosine_and_masked_pooling():
    orig = Lookup([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    comp = Lookup([[1.0, 1.0], [0.0, 3.0], [3.0, 3.0]])
    ev = si.evaluate(orig, comp, torch.arange(3), task="embedding")
    assert ev["cosine_mean"] == pytest.approx((1 / math.sqrt(2) + 2) / 3, abs=1e-7)
    assert ev["cosine_min"] == pytest.approx(1 / math.sqrt(2), abs=1e-7) and ev.drop == pytest.approx(1 - ev.quality)

    class Encoder(nn.Module):  # HF-style: dict in, .last_hidden_state out; noise only on padding
        def __init__(self, noise):
            super().__init__()
            self.noise = noise

        def forward(self, input_ids, attention_mask):
            h = input_ids.float()[..., None].repeat(1, 1, 4) + torch.arange(4.0)
            return {"last_hidden_state": h + self.noise * (1 - attention_mask.float())[..., None]}

    batch = {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    ev = si.evaluate(Encoder(0.0), Encoder(100.0), [batch])
    assert ev["task"] == "embedding" and ev["cosine_min"] == pytest.approx(1.0, abs=1e-12)


class TinyCausalLM(nn.Module):
    def __init__(self, vocab=11, dim=16, uniform=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.fc, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Linear(dim, vocab)
        self.uniform = uniform

    def forward(self, input_ids):
        logits = self.head(torch.tanh(self.fc(self.embed(input_ids))))
        return {"logits": torch.zeros_like(logits) if self.uniform else logits}


def test_perplexity_of_a_tiny_causal_lm():
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    uniform = TinyCausalLM(uniform=True)
    lm = TinyCausalLM()
    ev = si.evaluate(uniform, lm, ids)
    assert ev["task"] == "lm" and ev["n_tokens"] == 3 * 8
    assert ev["perplexity_original"] == pytest.approx(11.0, rel=1e-9)  # uniform over 11 tokens
    logits = lm(ids)["logits"].detach()
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11).double(), ids[:, 1:].reshape(-1))
    assert ev["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-6)
    c = si.compress(lm, "int8", progress=False)
    ev = si.evaluate(lm, c, [ids[:2], ids[2:]])
    assert 0.98 < ev["perplexity_ratio"] < 1.02 and ev["token_agreement"] > 0.9 and abs(ev.drop) < 0.02
    masked = {"input_ids": ids, "attention_mask": torch.ones_like(ids).index_fill_(1, torch.tensor([7, 8]), 0)}

    class Kw(TinyCausalLM):
        def forward(self, input_ids, attention_mask):
            return super().forward(input_ids)

    assert si.evaluate(Kw(), Kw(), [masked])["n_tokens"] == 3 * 6  # targets at masked positions skipped


@pytest.mark.parametrize("data,match", [
    ([], "no batches"),
    (None, "got None"),
    ((torch.arange(4), torch.tensor([0, 1, 2])), "4 inputs but labels of shape"),
    ((torch.arange(4), torch.tensor([0.0, 1.0, 0.0, 1.0])), "integer"),
    ((torch.arange(3), torch.tensor([0, 1, 2]), ["a", "b"]), "2 group labels"),
    ([torch.arange(2), (torch.arange(2), torch.tensor([0, 1]))], "some batches have labels"),
    ([torch.zeros(0, 3)], "empty"),
    ([(1, 2, 3, 4)], "tuple of length 4"),
    (5, "neither a batch"),
])
def test_bad_data_is_refused_clearly(data, match):
    with pytest.raises(ValueError, match=match):
        si.evaluate(Lookup(ORIG), Lookup(COMP), data)


def test_shape_mismatches_are_refused():
    with pytest.raises(ValueError, match="label 5 but the model outputs only 3 classes"):
        si.evaluate(Lookup(ORIG), Lookup(COMP), (torch.arange(2), torch.tensor([5, 0])))
    with pytest.raises(ValueError, match="differ in shape"):
        si.evaluate(Lookup(ORIG), Lookup([[.5, .5]] * 6), (torch.arange(6), LABELS % 2))
    with pytest.raises(ValueError, match="3 samples but the model output"):
        si.evaluate(nn.Identity(), nn.Flatten(0), torch.zeros(3, 2), task="embedding")
    with pytest.raises(ValueError, match="original outputs hold 6 samples"):
        si.evaluate(collect(Lookup(ORIG), (torch.arange(6), LABELS)), Lookup(COMP), (torch.arange(2), LABELS[:2]))
    with pytest.raises(ValueError, match="task must be one of"):
        si.evaluate(Lookup(ORIG), Lookup(COMP), torch.arange(2), task="regression")
    with pytest.raises(ValueError, match="groups: 2 group labels for 6 samples"):
        si.evaluate(Lookup(ORIG), Lookup(COMP), (torch.arange(6), LABELS), groups=["a", "b"])
