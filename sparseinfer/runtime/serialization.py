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
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import sys
import types
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..backends import resolve
from ..formats import from_parts
from . import hf, ops  # noqa: F401  (ops registers torch.ops.sparseinfer.packed_linear for the deserializer)
from ..act import check_act, resolve_act
from .errors import ArtifactError, ExportError
from .manifest import MAX_DEPTH, check_manifest, parse_json
from .embedding import CompressedEmbedding
from .modules import CompressedConv2d, CompressedLinear, _buffer_name, set_act
from .program_check import check_graph, check_program

FORMAT = "sparseinfer-artifact"
FORMAT_VERSION = 1
MANIFEST, WEIGHTS, PROGRAM = "sparseinfer.json", "model.safetensors", "program.json"
CONSTANT_PREFIX = "__constant__."
RECIPE_ATTR = "_sparseinfer_recipe"  # = api.RECIPE_ATTR (set by compress(); runtime must not import api)
MANIFEST_ATTR = "_sparseinfer_manifest"  # set on loaded models (read by `sparseinfer run`)
# Output containers of exported programs are pytree types; a loaded program needs them
# registered. Modules under these prefixes may be imported to do that (HF ModelOutput).
ALLOWED_OUTPUT_MODULES = ("transformers.",)
_CHUNK = 1 << 20


# -- small helpers -----------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"").hexdigest()


def _file_digest(path: Path, fsync: bool = False) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"bytes": size, "sha256": h.hexdigest()}


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # reading it without setting it (os.umask would race with other threads)
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _conv_config(conv) -> dict[str, list[int]]:
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]  # noqa: E731
    return {k: pair(getattr(conv, k)) for k in ("kernel_size", "stride", "padding", "dilation")}


# -- save ----------------------------------------------------------------------------------------

def _layer_entries(model: nn.Module) -> dict[str, dict]:
    """Manifest entries of the compressed layers: CompressedConv2d at its own name (its inner
    CompressedLinear is implied), CompressedLinear elsewhere."""
    entries: dict[str, dict] = {}
    inner = set()
    for name, module in model.named_modules():
        if isinstance(module, CompressedConv2d):
            inner.add(id(module.linear))
            entries[name] = _linear_entry(module.linear, f"{name}.linear" if name else "linear", "CompressedConv2d")
            entries[name]["conv"] = _conv_config(module)
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear) and id(module) not in inner:
            entries[name] = _linear_entry(module, name, "CompressedLinear")
    return entries


def _embedding_entries(model: nn.Module) -> dict[str, str]:
    """{CompressedEmbedding name: name of the compressed head whose packed rows it reads}."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedEmbedding):
            if id(m.head) not in names:
                raise ValueError(f"save: embedding {name!r} reads a compressed head that is not part of the model")
            out[name] = names[id(m.head)]
    return out


def _linear_entry(layer: CompressedLinear, prefix: str, kind: str) -> dict:
    w = layer.packed
    key = lambda n: f"{prefix}.{n}" if prefix else n  # noqa: E731
    return {"module": kind, "fmt": w.fmt, "shape": list(w.shape), "params": w.params(),
            "tensors": {n: key(_buffer_name(n)) for n in w.tensors()},
            "bias": key("bias") if layer.bias is not None else None,
            "nbytes": w.nbytes, "dense_nbytes": w.dense_nbytes}


def _normalize_inputs(example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **(example_kwargs or {})}
    if isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif example_inputs is None:
        args = ()
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise ValueError(f"save: example_inputs must be a tensor, a tuple of positional arguments or a dict of "
                         f"keyword arguments, got {type(example_inputs).__name__}")
    return args, dict(example_kwargs or {})


def _default_dim_spec(x):
    """Batch (dim 0) of every tensor is dynamic; integer / bool tensors (token ids, masks) are
    dynamic in every dim (sequence length). Dim.AUTO lets export keep a dim static when the
    model needs it to be -- and a dim of size 1 in the example is always specialised."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    dims = [0] if x.is_floating_point() or x.is_complex() else range(x.dim())
    return {d: torch.export.Dim.AUTO for d in dims}


def _default_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    from torch.utils._pytree import tree_map

    if not kwargs:
        return tuple(tree_map(_default_dim_spec, a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: tree_map(_default_dim_spec, value) for name, value in bound.items()}


_SKELETON_HINT = ("save the tensors only with save(model, path, export=False) and load them into a model you build "
                  "yourself with load(path, model=skeleton)")


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, strict: bool):
    hint = _SKELETON_HINT
    if not args and not kwargs:
        raise ValueError(f"save: example_inputs are needed to export {type(model).__name__}'s architecture "
                         f"(e.g. example_inputs=(x,) or example_inputs={{'input_ids': ids}}); or {hint}")
    if dynamic_shapes is None:
        dynamic_shapes = _default_dynamic_shapes(model, args, kwargs)
    elif dynamic_shapes is False or dynamic_shapes == "static":
        dynamic_shapes = None
    was_training = model.training
    model.eval()  # export the inference graph (dropout off, batch-norm running stats)
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as err:  # export fails in many ways; keep the reason and say what to do
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"save: torch.export could not capture {type(model).__name__} "
                          f"({type(err).__name__}: {first}); {hint}") from err
    finally:
        model.train(was_training)
    bad = [n for n, c in ep.constants.items() if not isinstance(c, torch.Tensor)]
    if bad:
        raise ExportError(f"save: the exported program holds non-tensor constants {bad} (custom classes) that "
                          f"cannot be stored without pickle; {hint}")
    return ep


def _serialize_loadable(ep, model_name: str):
    """(program, its JSON) in a form load accepts (program_check.py). torch.export's default IR keeps
    in-place ops on intermediates (``h.add_(1)`` in forward), which the allow-list refuses; their
    functional form (run_decompositions with no decompositions) computes the same values."""
    from torch._export.serde.serialize import serialize

    def dump(ep) -> bytes:
        return serialize(ep, serialize_state_dict=False, serialize_constants=False,
                         serialize_example_inputs=False).exported_program

    data = dump(ep)
    try:
        check_program(json.loads(data))
        return ep, data
    except ArtifactError:
        with warnings.catch_warnings():  # torch's own pytree deprecation inside run_decompositions
            warnings.simplefilter("ignore", FutureWarning)
            ep = ep.run_decompositions({})
    data = dump(ep)
    try:
        check_program(json.loads(data))
    except ArtifactError as err:
        raise ExportError(f"save: {model_name}'s exported program could not be loaded back ({err}): a model whose "
                          f"forward writes its buffers or inputs, or calls such operators, cannot travel as a "
                          f"program; {_SKELETON_HINT}") from None
    return ep, data


def _describe_inputs(ep, args: tuple, kwargs: dict) -> dict:
    """Per top-level input: dtype, example shape, which dims are dynamic (with their range), and
    the value range of integer inputs -- enough for `sparseinfer run` to make a sample input."""
    import torch.utils._pytree as pytree

    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    user = set(ep.graph_signature.user_inputs)
    fakes = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    try:
        fake_args, fake_kwargs = pytree.tree_unflatten(fakes, ep.call_spec.in_spec)
    except Exception:  # an unusual input structure: describe without dynamic dims
        fake_args, fake_kwargs = [None] * len(args), {}

    def one(x, fake):
        if not isinstance(x, torch.Tensor):
            return {"type": type(x).__name__}
        d = {"dtype": _dtype_name(x.dtype), "shape": list(x.shape), "dynamic": {}}
        for i, s in enumerate(getattr(fake, "shape", ())):
            if isinstance(s, torch.SymInt):
                r = ranges.get(str(s.node.expr))
                lo, hi = (_finite(r.lower), _finite(r.upper)) if r is not None else (None, None)
                d["dynamic"][str(i)] = [lo, hi]
        if not (x.is_floating_point() or x.is_complex()) and x.numel():
            d["min"], d["max"] = int(x.min()), int(x.max())
        return d

    return {"args": [one(a, f) for a, f in zip(args, list(fake_args) + [None] * len(args))],
            "kwargs": {k: one(v, fake_kwargs.get(k)) for k, v in kwargs.items()}}


def _finite(v) -> int | None:
    """A sympy range bound as an int, None for +-infinity (sympy's oo or torch's int_oo)."""
    try:
        return int(v) if bool(v.is_number) and abs(float(v)) != float("inf") else None
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is
    not available (other systems, old libc, file systems without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# The temporary folder of a save (`.NAME.tmp-xxxxxxxx`), and the old artifact it is replacing while the
# two swap places without renameat2 (`.NAME.old-xxxxxxxx`): never artifacts to load.
_IN_FLIGHT = re.compile(r"\..+\.(tmp|old)-[0-9a-f]{8}")


@contextlib.contextmanager
def _directory_lock(directory: Path):
    """Saves into one directory take turns (an exclusive flock on it, released when the process ends,
    however it ends); yields False where there is no such lock (not POSIX, or a file system without
    flock): saves then run side by side and leave interrupted saves' folders alone."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # releases the lock


def _remove_interrupted_saves(path: Path) -> None:
    """Temporary folders that saves to ``path`` left behind when they were killed (call with the lock)."""
    for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if _IN_FLIGHT.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _replace(tmp: Path, path: Path) -> None:
    """Move the finished temp directory into place; an existing artifact goes only now. On Linux
    the two directories are swapped atomically; elsewhere the old one is renamed aside first, so
    a crash between the two renames leaves it as ``.<name>.old-*`` next to the target."""
    if path.exists() and _exchange(tmp, path):
        _fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old artifact
        return
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        args, kwargs = _normalize_inputs(example_inputs, example_kwargs)
        ep, program_bytes = _serialize_loadable(_export(model, args, kwargs, dynamic_shapes, strict), cls.__name__)
        program = {"file": PROGRAM, "strict": strict, "inputs": _describe_inputs(ep, args, kwargs)}
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
        "layers": _layer_entries(model),
        "tensors": {n: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _tensor_sha256(t)}
                    for n, t in tensors.items()},
        "aliases": aliases,
        "program": program,
    }
    if architecture is not None:
        manifest["architecture"] = architecture
    embeddings = _embedding_entries(model)
    if embeddings:
        manifest["embeddings"] = embeddings
    path.parent.mkdir(parents=True, exist_ok=True)
    with _directory_lock(path.parent) as locked:
        if locked:  # no other save is writing here: a temporary folder of this target is an interrupted save's
            _remove_interrupted_saves(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": f"sparseinfer {__version__}"})
            files = {WEIGHTS: _file_digest(tmp / WEIGHTS, fsync=True)}
            if program_bytes is not None:
                _write_bytes(tmp / PROGRAM, program_bytes)
                files[PROGRAM] = _file_digest(tmp / PROGRAM)
            if tokenizer is not None:
                files.update({name: _file_digest(tmp / name) for name in hf.write_tokenizer(tokenizer, tmp)})
            manifest["files"] = files
            _write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            for f in tmp.rglob("*"):  # safetensors creates its file 0600; give every file the usual mode
                os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
            _fsync_dir(tmp)
            _replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


# -- reading and checking ----------------------------------------------------------------------

def read_manifest(path) -> dict:
    """The manifest of the artifact at ``path``, checked for format and version (no tensors read)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no artifact at {str(path)!r}: the path does not exist")
    if not path.is_dir():
        raise ArtifactError(f"{str(path)!r} is not an artifact directory (expected {MANIFEST} and {WEIGHTS} in it)")
    match = _IN_FLIGHT.fullmatch(path.name)
    if match:
        what = ("the temporary folder of a save that did not finish (the next save to that place removes it)"
                if match.group(1) == "tmp" else "an artifact a save was replacing when it stopped: rename it to use it")
        raise ArtifactError(f"{str(path)!r} is not an artifact: it is {what}")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{str(path)!r} has no {MANIFEST}: not a sparseinfer artifact, or an incomplete one")
    manifest = parse_json(mpath.read_bytes(), f"{mpath}: the manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{mpath}: not a sparseinfer manifest (format {fmt!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{mpath}: format_version is missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: artifact format version {version} is newer than this sparseinfer "
                            f"{__version__} reads (up to {FORMAT_VERSION}); upgrade sparseinfer")
    if version < 1:
        raise ArtifactError(f"{mpath}: unknown artifact format version {version}")
    for key, kind in (("layers", dict), ("tensors", dict), ("aliases", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{mpath}: the manifest lacks {key!r} (or it is not a {kind.__name__})")
    if WEIGHTS not in manifest["files"]:
        raise ArtifactError(f"{mpath}: the manifest does not list {WEIGHTS}")
    check_manifest(manifest, str(mpath))
    return manifest


def _check_file(path: Path, name: str, expected: dict, hash_it: bool) -> None:
    f = path / name
    if not f.is_file():
        raise ArtifactError(f"{str(path)!r}: {name} is missing")
    if not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int):
        raise ArtifactError(f"{path / MANIFEST}: the entry for {name} is malformed ({expected!r})")
    size = f.stat().st_size
    if size != expected["bytes"]:
        what = "truncated" if size < expected["bytes"] else "longer than recorded"
        raise ArtifactError(f"{f}: {what} ({size} bytes, the manifest records {expected.get('bytes')})")
    if hash_it and _file_digest(f)["sha256"] != expected.get("sha256"):
        raise ArtifactError(f"{f}: checksum mismatch (SHA-256 differs from the manifest): the file was modified "
                            f"or corrupted")


def _read_tensors(path: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_file(path, WEIGHTS, manifest["files"][WEIGHTS], hash_it=False)
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
        if not isinstance(e, dict) or _dtype_name(t.dtype) != e.get("dtype") or list(t.shape) != e.get("shape"):
            raise ArtifactError(f"{path}: tensor {name!r} is {_dtype_name(t.dtype)} {list(t.shape)} but the manifest "
                                f"says {e.get('dtype') if isinstance(e, dict) else e} "
                                f"{e.get('shape') if isinstance(e, dict) else ''}")
    if verify:
        if _file_digest(path / WEIGHTS)["sha256"] != manifest["files"][WEIGHTS].get("sha256"):
            bad = [n for n, t in tensors.items() if _tensor_sha256(t) != expected[n].get("sha256")]
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
        _check_file(path, name, manifest["files"][name], hash_it=True)
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
            _check_file(path, name, expected, hash_it=True)
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
        if name not in manifest["aliases"] and _tensor_sha256(t) != manifest["tensors"][name].get("sha256"):
            problems.append(f"tensor {name!r}: checksum mismatch")
    try:
        _packed_layers(manifest, tensors)
    except ArtifactError as err:
        problems.append(str(err))
    return problems


def _packed_layers(manifest: dict, tensors: dict) -> dict[str, tuple]:
    """{layer name: (PackedWeight, bias or None, entry)}, each validated by ``from_parts``."""
    out = {}
    for name, e in manifest["layers"].items():
        try:
            parts = {n: tensors[k] for n, k in e["tensors"].items()}
            packed = from_parts(e["fmt"], parts, e["shape"], e["params"])
            if packed.params() != e["params"]:  # an unknown or mistyped parameter would be read as a default
                raise ValueError(f"params {e['params']} are not those of the format ({packed.params()})")
            bias = tensors[e["bias"]] if e["bias"] is not None else None
            if bias is not None and tuple(bias.shape) != (packed.shape[0],):
                raise ValueError(f"bias of shape {tuple(bias.shape)} for {packed.shape[0]} outputs")
            if e["module"] == "CompressedConv2d" and not isinstance(e.get("conv"), dict):
                raise ValueError("a CompressedConv2d entry needs its conv parameters")
        except KeyError as err:
            raise ArtifactError(f"layer {name!r}: the manifest names tensor or field {err} that is missing") from None
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"layer {name!r}: the manifest does not match the tensors: {err}") from None
        out[name] = (packed, bias, e)
    return out


# -- load --------------------------------------------------------------------------------------

def _prepare_out_specs(program: dict) -> None:
    """Make every pytree type named in the program's input / output specs resolvable: import it
    from an allow-listed module (HF ModelOutput), else read a mapping-like container as a plain
    dict. Edits ``program`` in place."""
    import torch.utils._pytree as pytree

    def fix(node):
        t = node.get("type")
        if t and t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            module = t.rpartition(".")[0]
            if module.startswith(ALLOWED_OUTPUT_MODULES) and re.fullmatch(r"[\w.]+", module):
                try:
                    importlib.import_module(module)
                except ImportError:
                    pass
            if t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                try:
                    keys = json.loads(node.get("context") or "null")
                except json.JSONDecodeError:
                    keys = None
                if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                    raise ArtifactError(f"the program's inputs / outputs use the container type {t!r}, which is "
                                        f"not available here; import the module that defines it before load()")
                node["type"] = "builtins.dict"  # a ModelOutput-like mapping comes back as a dict
        for child in node.get("children_spec") or []:
            fix(child)

    for entry in program["graph_module"].get("module_call_graph", []):
        sig = entry.get("signature") or {}
        for key in ("in_spec", "out_spec"):
            if sig.get(key):
                version, root = json.loads(sig[key])
                fix(root)
                sig[key] = json.dumps([version, root])


def _program_state(program: dict, tensors: dict) -> tuple[dict, dict]:
    """The state_dict (parameters as nn.Parameter, tied ones shared) and constants the program's
    signature asks for, each of the dtype and shape the program was traced with."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    values = program["graph_module"]["graph"]["tensor_values"]

    def need(key: str, spec: dict) -> torch.Tensor:
        if key not in tensors:
            raise ArtifactError(f"the exported program needs tensor {key!r}, which the artifact does not hold")
        t, meta = tensors[key], values.get(spec["arg"]["name"])
        if not isinstance(meta, dict):
            raise ArtifactError(f"the exported program does not describe its input {spec['arg']['name']!r}")
        sizes = [s.get("as_int") if isinstance(s, dict) else None for s in meta.get("sizes", [])]
        if _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype")) != t.dtype or len(sizes) != t.dim() or any(
                want is not None and want != got for want, got in zip(sizes, t.shape)):  # None: a symbolic size
            raise ArtifactError(f"tensor {key!r} is {_dtype_name(t.dtype)} {list(t.shape)}, but the exported program "
                                f"uses it as {_SERIALIZE_TO_TORCH_DTYPE.get(meta.get('dtype'))} {sizes}")
        return t

    state, constants, params = {}, {}, {}
    for spec in program["graph_module"]["signature"]["input_specs"]:
        if "parameter" in spec:
            name = spec["parameter"]["parameter_name"]
            t = need(name, spec["parameter"])
            if id(t) not in params:
                params[id(t)] = nn.Parameter(t, requires_grad=False)
            state[name] = params[id(t)]
        elif "buffer" in spec and spec["buffer"].get("persistent", True):
            name = spec["buffer"]["buffer_name"]
            state[name] = need(name, spec["buffer"])
        elif "buffer" in spec:  # non-persistent buffers travel with the constants
            name = spec["buffer"]["buffer_name"]
            constants[name] = need(CONSTANT_PREFIX + name, spec["buffer"])
        elif "tensor_constant" in spec:
            name = spec["tensor_constant"]["tensor_constant_name"]
            constants[name] = need(CONSTANT_PREFIX + name, spec["tensor_constant"])
        elif "custom_obj" in spec:
            raise ArtifactError("the program needs a custom class object, which artifacts cannot hold")
    return state, constants


def _load_program(path: Path, manifest: dict, tensors: dict, layers: dict, device: torch.device,
                  backend: str | None, verify_files: bool) -> nn.Module:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    name = PROGRAM
    if not isinstance(manifest["program"], dict) or manifest["program"].get("file", PROGRAM) != PROGRAM or PROGRAM not in manifest["files"]:
        raise ArtifactError(f"{path}: the manifest does not list {PROGRAM} as the program")
    _check_file(path, name, manifest["files"][name], hash_it=verify_files)
    program = parse_json((path / name).read_bytes(), str(path / name))
    check_program(program)  # before torch reads any of it: its deserializer trusts the names and expressions
    # Python source that torch can exec() to check inputs: never run (the inputs' shapes are checked anyway)
    program["guards_code"] = []
    try:
        _prepare_out_specs(program)
        state, constants = _program_state(program, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"{path / name}: not an exported program this torch can read ({err!r})") from None
    try:
        ep = deserialize(SerializedArtifact(json.dumps(program).encode(), state, constants, b""))
        check_graph(ep.graph_module)  # the operators torch resolved the checked names to
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            ep = move_to_device_pass(ep, device)
        gm = ep.module()
    except ArtifactError:
        raise
    except Exception as err:  # the serde layer raises many types; name the versions involved
        raise ArtifactError(f"{path / name}: could not rebuild the exported program (saved with torch "
                            f"{manifest.get('torch_version')}, running {torch.__version__}): {type(err).__name__}: "
                            f"{err}; load the tensors into a model you build with load(path, model=skeleton)") from None
    try:
        _swap_packed_calls(gm, layers, backend)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"{path / name}: a compressed layer call in the program is malformed ({err!r})") from None
    for p in gm.parameters():
        p.requires_grad_(False)
    for m in gm.modules():
        m.training = False
    # torch makes an exported module refuse eval() / train(); it holds the eval-mode graph, so
    # eval() is a harmless no-op (and common in user code) while train() stays refused.
    gm.train, gm.eval = types.MethodType(_train_refused, gm), types.MethodType(lambda self: self, gm)
    return gm


def _train_refused(self, mode: bool = True):
    if mode:
        raise RuntimeError("a model loaded from its exported program runs the inference (eval-mode) graph only; "
                           "train() is not supported")
    return self


def _swap_packed_calls(gm, layers: dict, backend: str | None) -> None:
    """Replace each ``sparseinfer.packed_linear`` call by a call to a CompressedLinear submodule,
    placed where the exported layer lived (its buffers' prefix)."""
    by_prefix = {}
    for name, (packed, bias, e) in layers.items():
        by_prefix[f"{name}.linear" if e["module"] == "CompressedConv2d" else name] = (name, packed, bias, e["bias"])
    graph, built = gm.graph, {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.sparseinfer.packed_linear.default:
            continue
        x, parts, s = node.args[0], node.args[1], parse_json(node.args[2], "program.json: a compressed layer's spec")
        first = parts[0].target if parts and getattr(parts[0], "op", None) == "get_attr" else ""
        buf = _buffer_name(s["names"][0])
        prefix = "" if first == buf else first[: -len(buf) - 1] if first.endswith("." + buf) else None
        if prefix not in by_prefix:
            raise ArtifactError(f"the exported program calls a compressed layer (tensor {first!r}) that the "
                                f"manifest does not list")
        if not prefix:
            raise ArtifactError("a model that is itself one CompressedLinear cannot be loaded from its program; "
                                "use load(path, model=skeleton)")
        name, packed, bias, bias_key = by_prefix[prefix]
        if (s["fmt"], list(s["shape"]), s["params"]) != (packed.fmt, list(packed.shape), packed.params()):
            raise ArtifactError(f"layer {name!r}: the program ({s['fmt']} {s['shape']}) and the manifest "
                                f"({packed.fmt} {list(packed.shape)}) disagree")
        program_bias = node.args[3] if len(node.args) > 3 else None
        if (None if program_bias is None else getattr(program_bias, "target", "?")) != bias_key:
            got = getattr(program_bias, "target", None)
            raise ArtifactError(f"layer {name!r}: the program's bias ({got!r}) is not the manifest's ({bias_key!r})")
        if prefix not in built:  # a layer called twice (shared) gets one module
            built[prefix] = CompressedLinear(packed, bias, backend)
            _set_submodule(gm, prefix, built[prefix])
        with graph.inserting_before(node):
            call = graph.call_module(prefix, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()


def _fill_skeleton(model: nn.Module, manifest: dict, tensors: dict, layers: dict, backend: str | None) -> nn.Module:
    """Replace the manifest's layers of a user-built (dense or compressed) model by compressed
    ones built from the artifact, then load every other tensor strictly."""
    for name, (packed, bias, e) in layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"the model has no layer {name!r}, which the artifact compressed "
                                f"(is this the right model class?)") from None
        n, k = packed.shape
        linear = CompressedLinear(packed, bias, backend)
        if e["module"] == "CompressedConv2d":
            conv = e["conv"]
            if isinstance(current, nn.Conv2d):
                got = (current.out_channels, current.in_channels * current.kernel_size[0] * current.kernel_size[1])
                cfg = _conv_config(current)
            elif isinstance(current, CompressedConv2d):
                got, cfg = (current.linear.out_features, current.linear.in_features), _conv_config(current)
            else:
                raise ArtifactError(f"layer {name!r}: the artifact holds a conv layer but the model has "
                                    f"{type(current).__name__}")
            if got != (n, k) or cfg != conv:
                raise ArtifactError(f"layer {name!r}: the model's conv {got} {cfg} does not match the artifact's "
                                    f"{(n, k)} {conv}")
            new = CompressedConv2d(linear, *(tuple(conv[f]) for f in ("kernel_size", "stride", "padding", "dilation")))
        else:
            if isinstance(current, nn.Linear):
                got = (current.out_features, current.in_features)
            elif isinstance(current, CompressedLinear):
                got = (current.out_features, current.in_features)
            else:
                raise ArtifactError(f"layer {name!r}: the artifact holds a linear layer but the model has "
                                    f"{type(current).__name__}")
            if got != (n, k):
                raise ArtifactError(f"layer {name!r}: the model's layer is {got[0]}x{got[1]}, the artifact's {n}x{k}")
            new = linear
        if not name:
            raise ArtifactError("a model that is itself one compressed layer cannot be filled; wrap it in a module")
        _set_submodule(model, name, new)
    for name, head in (manifest.get("embeddings") or {}).items():
        _fill_embedding(model, name, head, layers)
    dense = {k: v for k, v in tensors.items() if not k.startswith(CONSTANT_PREFIX)}
    try:
        result = model.load_state_dict(dense, strict=False, assign=True)
    except RuntimeError as err:
        raise ArtifactError(f"the artifact's tensors do not fit the model: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(f"the artifact does not match the model (is this the right model class?): the model has "
                            f"tensors the artifact lacks {result.missing_keys[:8]}, the artifact has tensors the "
                            f"model lacks {result.unexpected_keys[:8]}")
    for alias, target in manifest["aliases"].items():  # assign=True gave tied names separate tensors: re-tie
        if not alias.startswith(CONSTANT_PREFIX):
            owner, _, attr = alias.rpartition(".")
            t_owner, _, t_attr = target.rpartition(".")
            setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(t_owner), t_attr))
    return model


def _fill_embedding(model: nn.Module, name: str, head: str, layers: dict) -> None:
    """Replace the embedding ``name`` by one reading the rows of the compressed layer ``head``."""
    if head not in layers or layers[head][2]["module"] != "CompressedLinear":
        raise ArtifactError(f"embedding {name!r} reads layer {head!r}, which the artifact does not hold as a "
                            f"compressed linear layer")
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"the model has no embedding {name!r}, which the artifact ties to {head!r}") from None
    linear = model.get_submodule(head)
    if not isinstance(current, (nn.Embedding, CompressedEmbedding)) or (
            current.num_embeddings, current.embedding_dim) != (linear.out_features, linear.in_features):
        raise ArtifactError(f"{name!r} is not an embedding of {linear.out_features}x{linear.in_features} "
                            f"(the shape of {head!r})")
    try:
        _set_submodule(model, name, CompressedEmbedding(linear, current.padding_idx))
    except ValueError as err:
        raise ArtifactError(f"embedding {name!r}: {err}") from None


def _prepack(model: nn.Module) -> None:
    """Each layer's weight in the layout of the backend a one-row call would take, with what its
    activation mode needs (``Backend.prepack``)."""
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            w = m.packed
            row = torch.empty(1, w.shape[1], device=w.device)  # names the device and dtype for resolve
            resolve(w, row, m.backend).prepack(w, resolve_act(m.act))


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
    layers = _packed_layers(manifest, tensors)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"load: model must be an nn.Module skeleton, got {type(model).__name__}")
        module = _fill_skeleton(model, manifest, tensors, layers, backend).to(device)
    elif manifest.get("architecture") is not None:
        module = _fill_skeleton(hf.build_skeleton(manifest, tensors, str(path)), manifest, tensors, layers, backend)
        hf.check_filled(module, str(path))
        module = module.to(device)
    elif not manifest.get("program"):
        raise ArtifactError(f"{str(path)!r} was saved with export=False and holds no architecture: build the model "
                            f"and pass it, load(path, model=skeleton)")
    else:
        module = _load_program(path, manifest, tensors, layers, device, backend, verify)
    module.eval()
    set_act(module, act)
    _prepack(module)
    setattr(module, RECIPE_ATTR, manifest.get("recipe"))
    setattr(module, MANIFEST_ATTR, manifest)
    return module
