"""Reading an artifact's JSON as untrusted input: parsing with a depth limit, and the types of every
manifest field that ``load``, ``verify`` and ``sparseinfer inspect`` read, checked once so that none of
them meets a list where it expects an object (the manifest's layout is in serialization.py).

Unknown keys are ignored (a newer writer of the same format version may add some); known keys of the
wrong JSON type, missing required keys and JSON nested deeper than ``MAX_DEPTH`` are ``ArtifactError``.

Also the format's constants (file names, version), ``read_manifest`` and the size / SHA-256 checks of
files and tensors against what the manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from .atomic import IN_FLIGHT
from .errors import ArtifactError

MAX_DEPTH = 64  # saved manifests nest 8 levels, exported programs 11, their pytree specs 5
LAYER_MODULES = ("CompressedLinear", "CompressedConv2d")
CONV_FIELDS = ("kernel_size", "stride", "padding", "dilation")


def parse_json(data: str | bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for untrusted text: any failure, or nesting deeper than ``max_depth``, is an
    ArtifactError naming ``where``."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise ArtifactError(f"{where}: JSON nested too deeply to read") from None
    stack = [(value, 1)]
    while stack:  # iterative: the check itself must not recurse
        item, depth = stack.pop()
        if depth > max_depth:
            raise ArtifactError(f"{where}: JSON nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


# -- the manifest's field types ---------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_name(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, want: str, value) -> None:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        got = "null (or nothing)" if value is None else f"{_type_name(value)} {shown}"
        raise ArtifactError(f"{self.where}: {path} must be {want}, got {got}")

    def obj(self, v, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(path, "an object", v)
        return v

    def string(self, v, path: str, optional: bool = False) -> None:
        if not (isinstance(v, str) or (optional and v is None)):
            self.fail(path, "a string" + (" or null" if optional else ""), v)

    def ints(self, v, path: str, length: int | None = None, minimum: int = 0) -> None:
        if not (isinstance(v, list) and all(_is_int(x) and x >= minimum for x in v)
                and (length is None or len(v) == length)):
            want = f"{length} integers" if length is not None else "an array of integers"
            self.fail(path, f"{want} >= {minimum}", v)

    def str_map(self, v, path: str) -> None:
        for k, x in self.obj(v, path).items():
            self.string(x, f"{path}[{k!r}]")


def check_manifest(m: dict, where: str) -> None:
    """Raise ArtifactError at the first manifest field of the wrong JSON type (see the module docstring)."""
    c = _Checker(where)
    for key in ("library_version", "torch_version"):
        if key in m:
            c.string(m[key], key, optional=True)
    if m.get("model") is not None:
        model = c.obj(m["model"], "model")
        c.string(model.get("class"), "model.class", optional=True)
        if model.get("metadata") is not None:
            c.obj(model["metadata"], "model.metadata")
    for name, e in c.obj(m["layers"], "layers").items():
        _check_layer(c, e, f"layers[{name!r}]")
    for name, t in c.obj(m["tensors"], "tensors").items():
        path = f"tensors[{name!r}]"
        c.obj(t, path)
        c.string(t.get("dtype"), f"{path}.dtype")
        c.ints(t.get("shape"), f"{path}.shape")
        c.string(t.get("sha256"), f"{path}.sha256")
    c.str_map(m["aliases"], "aliases")
    for name, f in c.obj(m["files"], "files").items():
        c.obj(f, f"files[{name!r}]")
        if not (_is_int(f.get("bytes")) and f["bytes"] >= 0):
            c.fail(f"files[{name!r}].bytes", "an integer >= 0", f.get("bytes"))
        c.string(f.get("sha256"), f"files[{name!r}].sha256")
    if m.get("program") is not None:
        _check_program_entry(c, c.obj(m["program"], "program"))
    if m.get("embeddings") is not None:
        c.str_map(m["embeddings"], "embeddings")
    if m.get("architecture") is not None:
        arch = c.obj(m["architecture"], "architecture")
        c.string(arch.get("class"), "architecture.class")
        c.obj(arch.get("config"), "architecture.config")
        if arch.get("generation_config") is not None:
            c.obj(arch["generation_config"], "architecture.generation_config")


def _check_layer(c: _Checker, e, path: str) -> None:
    c.obj(e, path)
    if e.get("module") not in LAYER_MODULES:
        c.fail(f"{path}.module", f"one of {list(LAYER_MODULES)}", e.get("module"))
    c.string(e.get("fmt"), f"{path}.fmt")
    c.ints(e.get("shape"), f"{path}.shape", length=2, minimum=1)
    for k, v in c.obj(e.get("params"), f"{path}.params").items():
        if not (v is None or isinstance(v, (bool, int, float, str))):
            c.fail(f"{path}.params[{k!r}]", "a number, string, boolean or null", v)
    c.str_map(e.get("tensors"), f"{path}.tensors")
    if "bias" not in e:
        raise ArtifactError(f"{c.where}: {path} lacks the key 'bias' (the bias tensor's name, or null)")
    c.string(e["bias"], f"{path}.bias", optional=True)
    for key in ("nbytes", "dense_nbytes"):
        if key in e and not (_is_int(e[key]) and e[key] >= 0):
            c.fail(f"{path}.{key}", "an integer >= 0", e[key])
    if e["module"] == "CompressedConv2d":
        conv = c.obj(e.get("conv"), f"{path}.conv")
        for key in CONV_FIELDS:
            c.ints(conv.get(key), f"{path}.conv.{key}", length=2, minimum=0 if key == "padding" else 1)


def _check_program_entry(c: _Checker, p: dict) -> None:
    c.string(p.get("file"), "program.file")
    if "strict" in p and not isinstance(p["strict"], bool):
        c.fail("program.strict", "a boolean", p["strict"])
    inputs = c.obj(p.get("inputs", {"args": [], "kwargs": {}}), "program.inputs")
    args = inputs.get("args", [])
    if not isinstance(args, list):
        c.fail("program.inputs.args", "an array", args)
    described = [(f"program.inputs.args[{i}]", a) for i, a in enumerate(args)]
    described += [(f"program.inputs.kwargs[{k!r}]", a) for k, a in c.obj(inputs.get("kwargs", {}),
                                                                           "program.inputs.kwargs").items()]
    for path, spec in described:
        c.obj(spec, path)
        if "dtype" not in spec:
            c.string(spec.get("type"), f"{path}.type")
            continue
        c.string(spec["dtype"], f"{path}.dtype")
        c.ints(spec.get("shape"), f"{path}.shape")
        for dim, bounds in c.obj(spec.get("dynamic", {}), f"{path}.dynamic").items():
            if not (dim.isdigit() and isinstance(bounds, list) and len(bounds) == 2
                    and all(b is None or _is_int(b) for b in bounds)):
                c.fail(f"{path}.dynamic[{dim!r}]", "[min, max] (integers or null) under a dim index", bounds)
        for key in ("min", "max"):
            if key in spec and not _is_int(spec[key]):
                c.fail(f"{path}.{key}", "an integer", spec[key])


FORMAT = "sparseinfer-artifact"
FORMAT_VERSION = 1
MANIFEST, WEIGHTS, PROGRAM = "sparseinfer.json", "model.safetensors", "program.json"
CONSTANT_PREFIX = "__constant__."
_CHUNK = 1 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"").hexdigest()


def file_digest(path: Path, fsync: bool = False) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"bytes": size, "sha256": h.hexdigest()}


def read_manifest(path) -> dict:
    """The manifest of the artifact at ``path``, checked for format and version (no tensors read)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no artifact at {str(path)!r}: the path does not exist")
    if not path.is_dir():
        raise ArtifactError(f"{str(path)!r} is not an artifact directory (expected {MANIFEST} and {WEIGHTS} in it)")
    match = IN_FLIGHT.fullmatch(path.name)
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


def check_file(path: Path, name: str, expected: dict, hash_it: bool) -> None:
    f = path / name
    if not f.is_file():
        raise ArtifactError(f"{str(path)!r}: {name} is missing")
    if not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int):
        raise ArtifactError(f"{path / MANIFEST}: the entry for {name} is malformed ({expected!r})")
    size = f.stat().st_size
    if size != expected["bytes"]:
        what = "truncated" if size < expected["bytes"] else "longer than recorded"
        raise ArtifactError(f"{f}: {what} ({size} bytes, the manifest records {expected.get('bytes')})")
    if hash_it and file_digest(f)["sha256"] != expected.get("sha256"):
        raise ArtifactError(f"{f}: checksum mismatch (SHA-256 differs from the manifest): the file was modified "
                            f"or corrupted")
