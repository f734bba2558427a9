"""The package's import graph, read with ``ast`` (nothing is imported): layers point downwards, no
import cycle, no private name borrowed from another package, and function-level imports only for
optional dependencies. docs/architecture.md draws the same layers.

Every import statement counts, at module level or inside a function (a late import hides a cycle
from Python, not from the design), except those under ``if TYPE_CHECKING:`` (never executed).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sparseinfer"
# Lowest first. A module may import its own layer and the layers below. A module belongs to the
# longest entry that names it or a package above it; "sparseinfer" itself is the public API.
LAYERS = (
    ("sparseinfer._version", "sparseinfer._native", "sparseinfer.act", "sparseinfer.runtime.errors"),
    ("sparseinfer.formats",),  # packed layouts: know nothing of kernels, passes or models
    ("sparseinfer.kernels", "sparseinfer.backends"),  # kernels and their dispatch, per format
    ("sparseinfer.runtime",),  # linear, modules, custom op, explain, save / load
    ("sparseinfer.passes",),  # pruning and quantization methods (produce pack arguments)
    ("sparseinfer.recipe",),  # recipes name formats and methods
    ("sparseinfer.passes.pipeline",),  # apply a recipe: passes, pack, swap modules
    ("sparseinfer.eval",),  # quality, latency, sweeps, recipe search
    ("sparseinfer.api",),  # compress (recipe or target), explain
    ("sparseinfer.training", "sparseinfer.llm", "sparseinfer.lean_llama"),  # distill, ..., causal LM decoding
    ("sparseinfer",),  # the public API (__init__)
    ("sparseinfer.apps", "sparseinfer.commands", "sparseinfer.cli"),  # apps: demo, models, benchmarking
)
# Function-level imports of package modules are allowed only into these (they need an optional
# dependency: Triton).
OPTIONAL = ("sparseinfer.kernels",)


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package __init__)} for the package and the Triton kernels
    (the top-level kernels/ folder, installed as sparseinfer.kernels)."""
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    for path in (ROOT / "kernels").glob("*.py"):
        found[f"{PACKAGE}.kernels.{path.stem}"] = (path, False)
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(import node, at module level?) for every import outside ``if TYPE_CHECKING:``."""
    def walk(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, top
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)
    yield from walk(tree, True)


def _edges():
    """(importer, imported module, imported private name or None, at module level?, line)."""
    out = []
    for mod, (path, is_pkg) in MODULES.items():
        for node, top in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        out.append((mod, alias.name, None, top, node.lineno))
                continue
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from pkg import module`
                    out.append((mod, sub, None, top, node.lineno))
                else:
                    private = alias.name if alias.name.startswith("_") and not alias.name.startswith("__") else None
                    out.append((mod, target, private, top, node.lineno))
    return out


EDGES = _edges()


def _layer(mod: str) -> int:
    best, layer = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if mod == name or (name != PACKAGE and mod.startswith(name + ".")):
                if len(name) > best:
                    best, layer = len(name), i
    assert layer is not None, f"{mod} is in no layer: add it to LAYERS in {__file__} (and docs/architecture.md)"
    return layer


def _package(mod: str) -> str:
    return mod if MODULES[mod][1] else mod.rpartition(".")[0]


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = [f"{a}:{line} imports {b} (layer {_layer(b)} is above {_layer(a)})"
              for a, b, _, _, line in EDGES if b in MODULES and _layer(b) > _layer(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _, _ in EDGES:
        if b in MODULES and a != b:
            graph[a].add(b)
    # Tarjan's strongly connected components, iteratively
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def connect(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        scc.append(w)
                        if w == node:
                            break
                    if len(scc) > 1:
                        cycles.append(sorted(scc))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_from_another_package():
    borrowed = [f"{a}:{line} imports {name} from {b}" for a, b, name, _, line in EDGES
                if name and b in MODULES and _package(b) != _package(a)]
    assert not borrowed, "private names used across packages (make them public where they live, or move them):\n" \
        + "\n".join(borrowed)


def test_function_level_imports_only_for_optional_dependencies():
    late = [f"{a}:{line} imports {b} inside a function" for a, b, _, top, line in EDGES
            if not top and not any(b == o or b.startswith(o + ".") for o in OPTIONAL)]
    assert not late, "function-level imports of package modules (import at the top; a cycle is a design bug):\n" \
        + "\n".join(late)


def test_import_survives_a_bad_thread_count_and_the_call_names_it():
    """Environment variables are read at use: a bad SPARSEINFER_NUM_THREADS fails the CPU call, not the import."""
    code = ("import torch, sparseinfer as si\n"
            "w = si.pack(torch.randn(8, 64), 'int8')\n"
            "print('imported')\n"
            "si.linear(torch.randn(2, 64), w, backend='cpu')\n")
    env = {**os.environ, "SPARSEINFER_NUM_THREADS": "many"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.stdout.strip() == "imported", run.stderr
    assert "SPARSEINFER_NUM_THREADS must be a positive integer, got 'many'" in run.stderr
