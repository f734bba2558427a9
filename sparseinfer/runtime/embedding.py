"""CompressedEmbedding: an input embedding that reads its rows from a compressed LM head.

A causal LM whose head is tied to its input embedding (``tie_word_embeddings``) stores one
[vocab, hidden] matrix. When the recipe quantizes the head, the embedding looks up its rows in the
head's packed weight (dequantizing only the rows asked for), so the matrix is still stored once and
nothing dense of vocab x hidden stays in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import PackedWeight
from .modules import CompressedLinear


def gathers_rows(packed: PackedWeight) -> bool:
    """True if every packed tensor holds one entry per output row along dim 0 (int8, int4, N:M):
    rows can then be picked by index. CSR cannot."""
    n = packed.shape[0]
    return packed.kind != "csr" and all(t.dim() >= 1 and t.shape[0] == n for t in packed.tensors().values())


class CompressedEmbedding(nn.Module):
    """nn.Embedding whose weight is the packed weight of ``head`` (a CompressedLinear of shape
    [num_embeddings, embedding_dim]). It holds no tensor of its own: the head owns them (state_dict,
    save, ``.to``), so it is stored once; ``head`` is kept out of the module tree for that reason."""

    def __init__(self, head: CompressedLinear, padding_idx: int | None = None):
        super().__init__()
        if not isinstance(head, CompressedLinear):
            raise TypeError(f"CompressedEmbedding: head must be a CompressedLinear, got {type(head).__name__}")
        if not gathers_rows(head.packed):
            raise ValueError(f"CompressedEmbedding: a {head.packed.fmt} weight cannot be read row by row")
        self.__dict__["head"] = head  # not a submodule: its tensors belong to the head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.head.packed
        flat = ids.reshape(-1)
        if not flat.numel():
            return torch.empty(*ids.shape, w.shape[1], device=w.device)
        picked = {name: t.index_select(0, flat) for name, t in w.tensors().items()}  # range-checked by torch
        # the weight's own class, not the name registry: its lru_cache lookup breaks torch.compile tracing
        out = type(w).from_parts(picked, (flat.numel(), w.shape[1]), w.params(), w.fmt).to_dense()
        return out.reshape(*ids.shape, w.shape[1])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, reads the packed {self.head.packed.fmt} head"
