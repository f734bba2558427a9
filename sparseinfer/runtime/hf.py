"""Hugging Face causal LMs in artifacts: the architecture as a class name + config, built by the
installed transformers at load, so that ``generate()`` (with its KV cache) works on the loaded model.

torch.export cannot capture a causal LM's generation loop (it returns a DynamicCache, and ``generate``
is Python around ``forward``), so for these models the artifact records instead::

    "architecture": {"library": "transformers", "class": "LlamaForCausalLM",
                     "transformers_version": "...", "config": {...config.to_dict()...},
                     "generation_config": {...} | null}

and the tokenizer's files, when given, under ``tokenizer/`` (listed in the manifest's ``files``
with their SHA-256). Load trusts none of it: the class must be one of ``ARCHITECTURES`` and is
taken from the installed ``transformers`` package (never code from the artifact); the config is
read by that class's own config class (``auto_map`` -- remote code -- is refused); the model is
first built on the meta device, where any size costs nothing, and every parameter's shape checked
against the artifact before anything is allocated; the real skeleton then has its parameters on
meta (filled from the artifact's tensors) and only its non-persistent buffers (rotary frequencies)
computed by transformers. Tokenizer files are a fixed list of names, JSON / text / sentencepiece
files that transformers reads without unpickling.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import ArtifactError

# Decoder-only LM classes a manifest may name (transformers' own, built from a config alone: none
# loads other weights or code in __init__). Extend with care: a class listed here is instantiated
# from an untrusted config.
ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Phi3ForCausalLM", "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel",
    "GPTNeoXForCausalLM", "OPTForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "GraniteForCausalLM",
    "StableLmForCausalLM", "SmolLM3ForCausalLM",
})
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
# Config keys refused at load: code to fetch and run, or loaders that would reach outside the artifact.
REFUSED_CONFIG_KEYS = ("auto_map", "quantization_config")
# Non-persistent buffers are computed at load (not stored); a config must not make them huge.
MAX_COMPUTED_BUFFER_BYTES = 256 << 20


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ArtifactError("this artifact holds a transformers model: install transformers to load it") from None
    return transformers


def is_tokenizer_file(name: str) -> bool:
    """True for the manifest file names under which tokenizer files travel."""
    folder, _, file = name.partition("/")
    return folder == TOKENIZER_DIR and file in TOKENIZER_FILES


# -- save --------------------------------------------------------------------------------------

def architecture_of(model: nn.Module) -> dict | None:
    """The manifest's ``architecture`` entry for a transformers model of an allow-listed class, None
    for any other model. Raises ValueError for a transformers LM that cannot be recorded this way."""
    if "transformers" not in sys.modules:  # a model of that library implies it is imported
        return None
    transformers = sys.modules["transformers"]
    if not isinstance(model, transformers.PreTrainedModel):
        return None
    name = type(model).__name__
    if name not in ARCHITECTURES or getattr(transformers, name, None) is not type(model):
        if model.can_generate():
            raise ValueError(f"save: {name} is not one of the transformers LM classes an artifact may name "
                             f"({sorted(ARCHITECTURES)}); save the tensors with export=False and load them into "
                             f"a model you build with load(path, model=skeleton)")
        return None
    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in REFUSED_CONFIG_KEYS:
        if config.get(key) is not None:
            raise ValueError(f"save: the model's config has {key!r}, which load refuses (remote code / a "
                             f"quantizer); remove it from model.config first")
    config.pop("_name_or_path", None)  # a local path of the writer's machine
    gen = getattr(model, "generation_config", None)
    return {"library": "transformers", "class": name, "transformers_version": transformers.__version__,
            "config": config, "generation_config": json.loads(gen.to_json_string()) if gen is not None else None}


def write_tokenizer(tokenizer, folder: Path) -> list[str]:
    """Write ``tokenizer`` (a transformers tokenizer, or a directory holding one's files) into
    ``folder/tokenizer``; return the manifest names of the files kept (``TOKENIZER_FILES`` only)."""
    out = folder / TOKENIZER_DIR
    out.mkdir()
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        if not src.is_dir():
            raise ValueError(f"save: tokenizer={str(src)!r} is not a directory of tokenizer files")
    elif hasattr(tokenizer, "save_pretrained"):
        src = folder / ".tokenizer-scratch"
        tokenizer.save_pretrained(str(src))
    else:
        raise ValueError(f"save: tokenizer must be a transformers tokenizer or a directory, got "
                         f"{type(tokenizer).__name__}")
    kept = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not kept:
        raise ValueError(f"save: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {str(src)!r}")
    for f in kept:
        shutil.copyfile(src / f, out / f)
    if src == folder / ".tokenizer-scratch":
        shutil.rmtree(src)
    return [f"{TOKENIZER_DIR}/{f}" for f in kept]


# -- load --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with every parameter on the meta device but real buffers (computed by the
    model's own __init__); the parameters are then assigned from the artifact."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _model_class_and_config(arch: dict, where: str):
    transformers = _transformers()
    name = arch.get("class")
    if name not in ARCHITECTURES:
        raise ArtifactError(f"{where}: architecture class {name!r} is not one sparseinfer builds "
                            f"({sorted(ARCHITECTURES)})")
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and cls.__module__.startswith("transformers.models.")):
        raise ArtifactError(f"{where}: the installed transformers {transformers.__version__} has no model class "
                            f"{name!r} (saved with {arch.get('transformers_version')})")
    config = arch.get("config")
    if not isinstance(config, dict):
        raise ArtifactError(f"{where}: architecture.config must be an object")
    for key in REFUSED_CONFIG_KEYS:
        if config.get(key) is not None:
            raise ArtifactError(f"{where}: architecture.config holds {key!r}, which sparseinfer refuses")
    want = getattr(cls.config_class, "model_type", None)
    if config.get("model_type") != want:
        raise ArtifactError(f"{where}: architecture.config.model_type is {config.get('model_type')!r}, "
                            f"{name} needs {want!r}")
    try:
        cfg = cls.config_class.from_dict(dict(config))
    except Exception as err:  # config classes validate in their own ways
        raise ArtifactError(f"{where}: architecture.config is not a valid {cls.config_class.__name__}: "
                            f"{type(err).__name__}: {err}") from None
    cfg._attn_implementation = "sdpa"
    return cls, cfg


def _expected_shapes(manifest: dict, tensors: dict) -> dict[str, tuple]:
    """The shape of every dense tensor the model must have, as the artifact provides it."""
    shapes = {k: tuple(t.shape) for k, t in tensors.items() if not k.startswith("__constant__.")}
    for name, e in manifest["layers"].items():
        shapes[f"{name}.weight" if name else "weight"] = tuple(e["shape"])
    for emb, head in (manifest.get("embeddings") or {}).items():
        if head in manifest["layers"]:
            shapes[f"{emb}.weight"] = tuple(manifest["layers"][head]["shape"])
    return shapes


def build_skeleton(manifest: dict, tensors: dict, where: str) -> nn.Module:
    """The manifest's transformers model with its parameters on the meta device (to be filled from
    the artifact) and its non-persistent buffers computed, after checking sizes on meta."""
    arch = manifest["architecture"]
    cls, config = _model_class_and_config(arch, where)
    try:
        with torch.device("meta"):
            probe = cls(config)
    except Exception as err:
        raise ArtifactError(f"{where}: transformers could not build {cls.__name__} from the config: "
                            f"{type(err).__name__}: {err}") from None
    expected = _expected_shapes(manifest, tensors)
    state = probe.state_dict()
    for key, t in state.items():
        if key in expected and expected[key] != tuple(t.shape):
            raise ArtifactError(f"{where}: the config makes {key!r} {list(t.shape)}, the artifact holds "
                                f"{list(expected[key])}")
    computed = sum(b.numel() * b.element_size() for n, b in probe.named_buffers() if n not in state)
    if computed > MAX_COMPUTED_BUFFER_BYTES:
        raise ArtifactError(f"{where}: the config asks for {computed / 2**20:.0f} MiB of computed buffers "
                            f"(limit {MAX_COMPUTED_BUFFER_BYTES >> 20} MiB)")
    del probe
    with _parameters_on_meta():
        model = cls(config)
    if arch.get("generation_config") is not None:
        try:
            model.generation_config = _transformers().GenerationConfig.from_dict(dict(arch["generation_config"]))
        except Exception as err:
            raise ArtifactError(f"{where}: architecture.generation_config is not valid: {err}") from None
    return model


def check_filled(model: nn.Module, where: str) -> None:
    """After filling: nothing may be left on the meta device."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ArtifactError(f"{where}: the artifact does not provide {left[:5]}")


def read_tokenizer(folder: Path):
    """The tokenizer in ``folder`` (files already checked by the caller), remote code refused."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise ArtifactError(f"{folder}: transformers could not read the tokenizer: {type(err).__name__}: {err}") from None
