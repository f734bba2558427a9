"""sparseinfer: sparse and quantized inference for PyTorch models.

    import sparseinfer as si
    w = si.pack(weight, "int4", group_size=128)
    y = si.linear(x, w, bias)
    model = si.compress(model, "2:4+int8")
    si.save(model, "model.sinf"); model = si.load("model.sinf")

Importing never initialises a GPU or requires the optional pieces (the C++ extension, Triton):
those report what is missing when used (``si.backends()``).
"""

from ._version import __version__
from .api import compress, explain
from .backends import backends
from .backends.cpu import set_threads
from .eval import choose_recipe, evaluate, knee_point, pareto_front, sweep
from .formats import CSRWeight, Int4Weight, Int8Weight, NMWeight, PackedWeight, pack
from .recipe import Recipe, parse_layer_recipe
from .runtime.embedding import CompressedEmbedding
from .runtime.linear import linear
from .runtime.modules import CompressedConv2d, CompressedLinear, set_act
from .runtime.serialization import ArtifactError, load, load_tokenizer, save
from .training.distill import distill, finish_qat, prepare_qat
from .training.movement import GradualPruner, iterative_prune
from .training.recover import recover
from .training.staged import prune, run_stages
from .training.structured import prune_structured

__all__ = ["__version__", "pack", "linear", "compress", "explain", "save", "load", "backends", "set_threads",
           "ArtifactError", "PackedWeight", "Int8Weight", "Int4Weight", "NMWeight", "CSRWeight", "CompressedLinear",
           "CompressedConv2d", "CompressedEmbedding", "set_act", "Recipe", "parse_layer_recipe", "load_tokenizer"]
__all__ += ["evaluate", "sweep", "pareto_front", "knee_point", "choose_recipe"]
__all__ += ["prune", "prune_structured", "distill", "prepare_qat", "finish_qat", "GradualPruner", "iterative_prune",
            "run_stages", "recover"]
