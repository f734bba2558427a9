"""`sparseinfer inspect ARTIFACT [--verify]`: what an artifact holds, and whether it is intact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sparseinfer.runtime.serialization import read_manifest, verify


def register(sub):
    p = sub.add_parser("inspect", help="summarise an artifact; --verify checks every checksum",
                       description="Print an artifact's manifest summary and per-layer formats and sizes. Exits 2 "
                                   "with a message when the artifact is missing, corrupt or from a newer version.")
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact directory (from save / sparseinfer compress)")
    p.add_argument("--verify", action="store_true",
                   help="check file and per-tensor SHA-256 checksums and rebuild every layer")
    p.add_argument("--json", action="store_true", help="print the manifest (without per-tensor entries) as JSON")
    p.set_defaults(func=_run)


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), *(line(r) for r in rows)])


def _dims(spec: dict) -> str:
    if "dtype" not in spec:
        return spec.get("type", "?")
    shape = [("*" if str(i) in spec.get("dynamic", {}) else str(s)) for i, s in enumerate(spec["shape"])]
    return f"{spec['dtype']}[{', '.join(shape)}]"


def _run(args) -> int:
    path = Path(args.artifact)
    manifest = read_manifest(path)  # ArtifactError (a ValueError) -> message, exit 2
    if args.json:
        print(json.dumps({k: v for k, v in manifest.items() if k != "tensors"}, indent=1))
    else:
        _summary(path, manifest)
    if args.verify:
        problems = verify(path)
        if problems:
            print(f"sparseinfer inspect: error: {path} is corrupt:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 2
        print(f"verify: OK ({len(manifest['tensors'])} tensor checksums, {len(manifest['files'])} file checksums, "
              f"{len(manifest['layers'])} layers rebuilt)")
    return 0


def _summary(path, manifest: dict) -> None:
    files = manifest["files"]
    total = sum(f.get("bytes", 0) for f in files.values())
    print(f"artifact   {path}  ({total / 1e6:.2f} MB: " + ", ".join(f"{n} {f.get('bytes', 0) / 1e6:.2f} MB"
                                                          for n, f in files.items()) + ")")
    print(f"format     {manifest['format']} v{manifest['format_version']}, "
          f"sparseinfer {manifest.get('library_version')}, torch {manifest.get('torch_version')}")
    model = manifest.get("model", {})
    print(f"model      {model.get('class')}" + (f"  {json.dumps(model['metadata'])}" if model.get("metadata") else ""))
    print(f"recipe     {json.dumps(manifest.get('recipe'))}")
    program = manifest.get("program")
    if program:
        ins = program.get("inputs", {})
        sig = [_dims(s) for s in ins.get("args", [])] + [f"{k}={_dims(s)}" for k, s in ins.get("kwargs", {}).items()]
        print(f"program    {program.get('file')} (torch.export); inputs ({', '.join(sig)})  * = dynamic")
    elif manifest.get("architecture"):
        arch = manifest["architecture"]
        print(f"architecture transformers {arch.get('class')} from its config (transformers "
              f"{arch.get('transformers_version')}); load() builds it, `sparseinfer generate` runs it")
    else:
        print("program    none (saved with export=False: load with load(path, model=skeleton))")
    rows, packed, dense = [], 0, 0
    for name, e in manifest["layers"].items():
        packed += e.get("nbytes", 0)
        dense += e.get("dense_nbytes", 0)
        params = ",".join(f"{k}={v}" for k, v in sorted(e.get("params", {}).items()))
        ratio = e.get("dense_nbytes", 0) / e["nbytes"] if e.get("nbytes") else 0
        rows.append([name, e.get("module", "?").removeprefix("Compressed"), e.get("fmt", "?"),
                     "x".join(str(s) for s in e.get("shape", [])), params or "-", str(e.get("nbytes")),
                     f"{ratio:.2f}x"])
    print(_table(rows, ["layer", "kind", "format", "shape", "params", "bytes", "vs fp32"]))
    layer_keys = {k for e in manifest["layers"].values() for k in e.get("tensors", {}).values()}
    other = sum(_nbytes(t) for k, t in manifest["tensors"].items() if k not in layer_keys)
    print(f"total: {len(manifest['layers'])} compressed layers, {packed / 1e6:.2f} MB packed vs {dense / 1e6:.2f} MB "
          f"fp32; {other / 1e6:.2f} MB of other tensors; {len(manifest['tensors'])} tensors "
          f"({len(manifest.get('aliases', {}))} tied)")


_SIZES = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2}


def _nbytes(t: dict) -> int:
    n = 1
    for s in t.get("shape", []):
        n *= s
    return n * _SIZES.get(t.get("dtype"), 1)
