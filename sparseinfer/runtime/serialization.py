"""save / load of compressed models: one safe, self-describing artifact directory.

Layout::

    model.sinf/
      sparseinfer.json    the manifest (below), written last
      model.safetensors   every tensor: the canonical packed buffers of each compressed layer,
                          the untouched dense parameters / buffers, and the exported program's
                          constants (under ``__constant__.<name>``)
      program.json        the architecture: a torch.export program serialized WITHOUT weights
                          (graph, signatures, input / output tree specs); absent for export=False
                          and for transformers causal LMs (the manifest's "architecture", hf.py)
      tokenizer/          optional: the tokenizer's files (hf.TOKENIZER_FILES), listed in "files"

Manifest (``format_version`` 1)::

    {"format": "sparseinfer-artifact", "format_version": 1,
     "library_version": "0.1.0", "torch_version": "2.13.0+cpu",
     "model": {"class": "transformers....BertModel", "metadata": {...user / CLI data...}},
     "recipe": <what compress() was given, JSON>,
     "layers": {"<module name>": {"module": "CompressedLinear" | "CompressedConv2d",
                "fmt": "int8", "shape": [N, K], "params": {...pack kwargs...},
                "tensors": {"qweight": "<state_dict key>", ...}, "bias": "<key>" | null,
                "nbytes": 123, "dense_nbytes": 456,
                "conv": {"kernel_size": [3, 3], "stride": ..., "padding": ..., "dilation": ...}}},
     "tensors": {"<key>": {"dtype": "int8", "shape": [...], "sha256": "..."}},
     "aliases": {"<tied key>": "<stored key>"},
     "embeddings": {"<embedding name>": "<compressed head it reads>"},   # optional (tied, quantized head)
     "architecture": {"library": "transformers", "class", "config", ...},  # optional, see hf.py
     "program": null | {"file": "program.json", "strict": false,
                        "inputs": {"args": [<input>], "kwargs": {"<name>": <input>}}},
                        # <input> = {"dtype", "shape" (example), "dynamic": {"<dim>": [min, max|null]},
                        #            "min", "max" (integer inputs)} or {"type": "<python type>"}
     "files": {"model.safetensors": {"bytes": n, "sha256": "..."}, "program.json": {...}}}

Nothing is unpickled on load: tensors come from ``safetensors.torch.load_file`` and the program
from torch's JSON schema, deserialized with those tensors handed in as dicts. Everything read is
untrusted: manifest.py checks the manifest's field types and JSON depth, and program_check.py checks
every operator and symbolic expression of program.json against an allow-list before torch reads it
(torch's deserializer would resolve any operator name and hand expressions to sympy's eval). Every call site of a
compressed layer is exported as one ``sparseinfer::packed_linear`` op (see ``ops.py``); ``load``
replaces each by a real ``CompressedLinear`` submodule, so ``explain`` works on the loaded model
and the backend prepacks each weight once, at load.

This module is the public home of save / load / verify; the parts live beside it: manifest.py (format
constants, reading and checking the manifest, checksums), atomic.py (crash-safe writes, the directory
lock), program.py (the torch.export program) and layers.py (layer entries, filling a skeleton model).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..act import check_act
from . import attention, hf
from .atomic import directory_lock, fsync_dir, remove_interrupted_saves, replace_directory, umask, write_bytes
from .errors import ArtifactError, ExportError  # noqa: F401  (public: callers catch them from here)
from .fused import fuse_shared_inputs
from .layers import embedding_entries, fill_skeleton, layer_entries, packed_layers, prepack
from .manifest import (
    CONSTANT_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_DEPTH,
    PROGRAM,
    WEIGHTS,
    check_file,
    dtype_name,
    file_digest,
    parse_json,
    read_manifest,
    tensor_sha256,
)
from .modules import set_act
from .program import (
    ALLOWED_OUTPUT_MODULES,  # noqa: F401  (kept public here)
    describe_inputs,
    export_program,
    load_program,
    normalize_inputs,
    serialize_loadable,
)
from .program_check import check_program

RECIPE_ATTR = "_sparseinfer_recipe"  # = api.RECIPE_ATTR (set by compress(); runtime must not import api)
MANIFEST_ATTR = "_sparseinfer_manifest"  # set on loaded models (read by `sparseinfer run`)


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors stores no shared storage: tied tensors (same view) are stored once and the
    other names recorded as aliases; other overlapping views are copied."""
    out, aliases, seen, storages = {}, {}, {}, set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ptr is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if ptr is not None:
            seen[key] = name
            if ptr in storages:
                t = t.clone()
            storages.add(ptr)
        out[name] = t.contiguous()
    return out, aliases


def _check_target(path: Path) -> None:
    if path.is_file() or path.is_symlink():
        raise ValueError(f"save: {str(path)!r} exists and is not an artifact directory; remove it first")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise ValueError(f"save: refusing to replace {str(path)!r}: it is a non-empty directory that does not "
                         f"hold a sparseinfer artifact")


def save(model: nn.Module, path, example_inputs=None, *, example_kwargs: dict | None = None, dynamic_shapes=None,
         export: bool = True, strict: bool = False, metadata: dict | None = None, tokenizer=None) -> Path:
    """Write ``model`` (compressed by ``compress`` or not) to the artifact directory ``path``.

    example_inputs: what the model is called with, for ``torch.export`` -- a tensor, a tuple of
    positional arguments, or a dict of keyword arguments (``example_kwargs`` adds keyword
    arguments to positional ones). dynamic_shapes: as for ``torch.export.export``; by default the
    batch dim of every tensor input is dynamic, and every dim of integer inputs (token ids and
    masks: batch and sequence length), where the model allows it. Use a batch of at least 2 in
    the example: a dim of size 1 is specialised. ``"static"`` exports exact shapes.
    export=False: tensors and manifest only; load them with ``load(path, model=skeleton)``.
    strict: torch.export's strict (TorchDynamo) mode. metadata: JSON-able dict kept in the
    manifest. The model is exported in eval mode.
    A transformers causal LM (``hf.ARCHITECTURES``: Llama, Mistral, Qwen2, ...) needs no example
    inputs: its class name and config are recorded instead of a program, and ``load`` rebuilds it
    with the installed transformers (``generate()`` works). tokenizer: a transformers tokenizer or a
    directory of its files, stored under ``tokenizer/`` (``load_tokenizer(path)`` reads it back).

    The artifact is written into a temporary directory next to ``path``, synced, and moved into
    place at the end: an interrupted save never leaves a half artifact at ``path``.
    Raises ExportError (with what to do instead) when torch.export cannot capture the model.
    """
    from safetensors.torch import save_file

    path = Path(path)
    _check_target(path)
    try:
        text = json.dumps(metadata)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"save: metadata must be JSON-serialisable: {err}") from None
    parse_json(text, "save: metadata", MAX_DEPTH - 2)  # what load would refuse (it sits 2 levels down)
    state = dict(model.state_dict())
    cls = type(model)
    program_bytes, program = None, None
    architecture = hf.architecture_of(model) if export else None
    if export and architecture is None:
        args, kwargs = normalize_inputs(example_inputs, example_kwargs)
        ep = export_program(model, args, kwargs, dynamic_shapes, strict)
        ep, program_bytes = serialize_loadable(ep, cls.__name__)
        program = {"file": PROGRAM, "strict": strict, "inputs": describe_inputs(ep, args, kwargs)}
        for name, t in ep.state_dict.items():  # normally all in state_dict already
            state.setdefault(name, t)
        state.update({CONSTANT_PREFIX + name: t for name, t in ep.constants.items()})
    tensors, aliases = _dedupe(state)
    recipe = getattr(model, RECIPE_ATTR, None)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
        "torch_version": torch.__version__,
        "model": {"class": f"{cls.__module__}.{cls.__qualname__}", "metadata": metadata or {}},
        "recipe": recipe,
        "layers": layer_entries(model),
        "tensors": {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t)}
                    for n, t in tensors.items()},
        "aliases": aliases,
        "program": program,
    }
    if architecture is not None:
        manifest["architecture"] = architecture
    embeddings = embedding_entries(model)
    if embeddings:
        manifest["embeddings"] = embeddings
    path.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(path.parent) as locked:
        if locked:  # no other save is writing here: a temporary folder of this target is an interrupted save's
            remove_interrupted_saves(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": f"sparseinfer {__version__}"})
            files = {WEIGHTS: file_digest(tmp / WEIGHTS, fsync=True)}
            if program_bytes is not None:
                write_bytes(tmp / PROGRAM, program_bytes)
                files[PROGRAM] = file_digest(tmp / PROGRAM)
            if tokenizer is not None:
                files.update({name: file_digest(tmp / name) for name in hf.write_tokenizer(tokenizer, tmp)})
            manifest["files"] = files
            write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            for f in tmp.rglob("*"):  # safetensors creates its file 0600; give every file the usual mode
                os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask())
            fsync_dir(tmp)
            replace_directory(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def _read_tensors(path: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_file(path, WEIGHTS, manifest["files"][WEIGHTS], hash_it=False)
    try:
        tensors = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{path / WEIGHTS}: cannot be read as safetensors ({err})") from None
    expected = manifest["tensors"]
    if tensors.keys() != expected.keys():
        extra, missing = sorted(tensors.keys() - expected.keys()), sorted(expected.keys() - tensors.keys())
        raise ArtifactError(f"{path}: the tensors in {WEIGHTS} do not match the manifest (missing {missing[:5]}, "
                            f"unexpected {extra[:5]})")
    for name, t in tensors.items():
        e = expected[name]
        if not isinstance(e, dict) or dtype_name(t.dtype) != e.get("dtype") or list(t.shape) != e.get("shape"):
            raise ArtifactError(f"{path}: tensor {name!r} is {dtype_name(t.dtype)} {list(t.shape)} but the manifest "
                                f"says {e.get('dtype') if isinstance(e, dict) else e} "
                                f"{e.get('shape') if isinstance(e, dict) else ''}")
    if verify:
        if file_digest(path / WEIGHTS)["sha256"] != manifest["files"][WEIGHTS].get("sha256"):
            bad = [n for n, t in tensors.items() if tensor_sha256(t) != expected[n].get("sha256")]
            where = f"tensor(s) {bad[:5]} differ" if bad else "the header differs"
            raise ArtifactError(f"{path / WEIGHTS}: checksum mismatch ({where} from the recorded SHA-256): the "
                                f"file was modified or corrupted")
    for alias, target in manifest["aliases"].items():
        if target not in tensors:
            raise ArtifactError(f"{path}: alias {alias!r} points to unknown tensor {target!r}")
        tensors[alias] = tensors[target]
    return tensors


def load_tokenizer(path):
    """The tokenizer saved with the artifact at ``path`` (``save(..., tokenizer=...)``), each of its
    files checked against the manifest's size and SHA-256 first (and no file the manifest does not
    list); read by transformers with remote code refused."""
    path = Path(path)
    manifest = read_manifest(path)
    names = [n for n in manifest["files"] if hf.is_tokenizer_file(n)]
    if not names:
        raise ArtifactError(f"{str(path)!r} holds no tokenizer (save it with save(model, path, tokenizer=...))")
    for name in names:
        check_file(path, name, manifest["files"][name], hash_it=True)
    folder = path / hf.TOKENIZER_DIR
    if {p.name for p in folder.iterdir()} != {n.partition("/")[2] for n in names}:
        raise ArtifactError(f"{folder}: holds files the manifest does not list")
    return hf.read_tokenizer(folder)


def verify(path) -> list[str]:
    """Check everything (file sizes and checksums, every tensor's checksum, every layer rebuilt and
    validated, the program's operators and expressions against the allow-list: program_check.py);
    return a list of problems, empty when the artifact is sound."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except ArtifactError as err:
        return [str(err)]
    problems = []
    for name, expected in manifest["files"].items():
        if name not in (WEIGHTS, PROGRAM) and not hf.is_tokenizer_file(name):
            problems.append(f"the manifest lists an unknown file {name!r}")
            continue
        try:
            check_file(path, name, expected, hash_it=True)
        except ArtifactError as err:
            problems.append(str(err))
    if PROGRAM in manifest["files"] and (path / PROGRAM).is_file():
        try:
            check_program(parse_json((path / PROGRAM).read_bytes(), str(path / PROGRAM)))
        except ArtifactError as err:
            problems.append(str(err))
    try:
        tensors = _read_tensors(path, manifest, verify=False)
    except ArtifactError as err:
        return problems + [str(err)]
    for name, t in tensors.items():
        if name not in manifest["aliases"] and tensor_sha256(t) != manifest["tensors"][name].get("sha256"):
            problems.append(f"tensor {name!r}: checksum mismatch")
    try:
        packed_layers(manifest, tensors)
    except ArtifactError as err:
        problems.append(str(err))
    return problems


def load(path, device="cpu", model: nn.Module | None = None, *, backend: str | None = None,
         act: str | None = None, verify: bool = True) -> nn.Module:
    """Load the artifact at ``path`` as a ready nn.Module on ``device``.

    Without ``model`` the architecture comes from the artifact's exported program (no model code
    needed; the result is a torch.fx GraphModule whose compressed layers are CompressedLinear
    submodules, called with the same arguments as the original model). A transformers causal LM's artifact
    names its class and config instead: the installed transformers builds it (parameters on the
    meta device, filled from the artifact), and ``generate()`` works on it (see ``hf.py``). With ``model`` (a dense
    or compressed skeleton of the same class, e.g. built on the meta device) the artifact's
    layers replace the skeleton's and every other tensor is loaded strictly.
    backend pins every compressed layer to one backend; act sets the activation precision the kernels
    may use ("auto", "fp32" exact, "int8"; None: the process default; see ``set_act``). verify checks
    the SHA-256 of the files.
    Each weight is prepacked once for the backend that will run it.
    Raises ArtifactError on a missing, truncated, tampered or incompatible artifact.
    """
    path, device = Path(path), torch.device(device)
    check_act(act, "load")
    manifest = read_manifest(path)
    tensors = _read_tensors(path, manifest, verify)
    if device.type != "cpu":
        moved = {}
        tensors = {k: moved.setdefault(id(v), v.to(device)) for k, v in tensors.items()}
    layers = packed_layers(manifest, tensors)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"load: model must be an nn.Module skeleton, got {type(model).__name__}")
        module = fill_skeleton(model, manifest, tensors, layers, backend).to(device)
    elif manifest.get("architecture") is not None:
        module = fill_skeleton(hf.build_skeleton(manifest, tensors, str(path)), manifest, tensors, layers, backend)
        hf.check_filled(module, str(path))
        module = module.to(device)
        fuse_shared_inputs(module)  # q/k/v and gate/up: one call each per token
        attention.install(module)
    elif not manifest.get("program"):
        raise ArtifactError(f"{str(path)!r} was saved with export=False and holds no architecture: build the model "
                            f"and pass it, load(path, model=skeleton)")
    else:
        module = load_program(path, manifest, tensors, layers, device, backend, verify)
    module.eval()
    set_act(module, act)
    prepack(module)
    setattr(module, RECIPE_ATTR, manifest.get("recipe"))
    setattr(module, MANIFEST_ATTR, manifest)
    return module
