"""The architecture as a torch.export program: export and serialize it (without weights) on save;
on load, deserialize program.json with the artifact's tensors and swap each packed call for a
real ``CompressedLinear`` submodule."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from . import attention, ops  # noqa: F401  (ops registers torch.ops.sparseinfer.packed_linear for the deserializer)
from .errors import ArtifactError, ExportError
from .fused import fuse_shared_inputs
from .layers import set_submodule
from .manifest import CONSTANT_PREFIX, PROGRAM, check_file, dtype_name, parse_json
from .modules import CompressedLinear, _buffer_name
from .program_check import check_graph, check_program

# Output containers of exported programs are pytree types; a loaded program needs them
# registered. Modules under these prefixes may be imported to do that (HF ModelOutput).
ALLOWED_OUTPUT_MODULES = ("transformers.",)


def normalize_inputs(example_inputs, example_kwargs) -> tuple[tuple, dict]:
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


def default_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    from torch.utils._pytree import tree_map

    if not kwargs:
        return tuple(tree_map(_default_dim_spec, a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: tree_map(_default_dim_spec, value) for name, value in bound.items()}


_SKELETON_HINT = ("save the tensors only with save(model, path, export=False) and load them into a model you build "
                  "yourself with load(path, model=skeleton)")


def export_program(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, strict: bool):
    hint = _SKELETON_HINT
    if not args and not kwargs:
        raise ValueError(f"save: example_inputs are needed to export {type(model).__name__}'s architecture "
                         f"(e.g. example_inputs=(x,) or example_inputs={{'input_ids': ids}}); or {hint}")
    if dynamic_shapes is None:
        dynamic_shapes = default_dynamic_shapes(model, args, kwargs)
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


def serialize_loadable(ep, model_name: str):
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


def describe_inputs(ep, args: tuple, kwargs: dict) -> dict:
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
        d = {"dtype": dtype_name(x.dtype), "shape": list(x.shape), "dynamic": {}}
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
            raise ArtifactError(f"tensor {key!r} is {dtype_name(t.dtype)} {list(t.shape)}, but the exported program "
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


def load_program(path: Path, manifest: dict, tensors: dict, layers: dict, device: torch.device,
                  backend: str | None, verify_files: bool) -> nn.Module:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    name = PROGRAM
    if not isinstance(manifest["program"], dict) or manifest["program"].get("file", PROGRAM) != PROGRAM or PROGRAM not in manifest["files"]:
        raise ArtifactError(f"{path}: the manifest does not list {PROGRAM} as the program")
    check_file(path, name, manifest["files"][name], hash_it=verify_files)
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
        swap_packed_calls(gm, layers, backend)
        fuse_shared_inputs(gm)  # q / k / v, gate / up: one call each, as in the model that was saved
        attention.use_in_program(gm)  # its attention on sparseinfer's kernel, as the model's that was saved
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


class LayerCall:
    """A loaded program's call of one of its CompressedLinear submodules, bound at load. A
    ``call_module`` node looks its target up by the dotted path on every call: four
    ``Module.__getattr__`` hops for ``encoder.layer.0.attention.self.query``, a few microseconds each
    inside a model (cold caches between layers), which put a MiniLM loaded from its artifact 4-7 %
    behind the same model compressed in memory for one sentence. The module stays registered at
    ``path`` (state_dict, named_modules, ``si.explain``, ``.to``); a deep copy of the program is
    rebound to its own modules (``bind_all``, torch.fx's deepcopy hook); replacing a module in the tree later does not rewire
    the graph (build the model yourself and ``load(path, model=skeleton)`` for that)."""

    def __init__(self, layer: CompressedLinear, path: str):
        self.layer, self.path = layer, path
        self.__name__ = "compressed_linear"  # the name torch.fx's code generator gives the global

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # through Module.__call__: hooks still run

    @staticmethod
    def bind_all(gm) -> None:
        """Point every LayerCall in ``gm``'s graph at ``gm``'s own module at its path."""
        for node in gm.graph.nodes:
            if isinstance(node.target, LayerCall):
                node.target = LayerCall(gm.get_submodule(node.target.path), node.target.path)
        gm.recompile()


def swap_packed_calls(gm, layers: dict, backend: str | None) -> None:
    """Replace each ``sparseinfer.packed_linear`` call by a call to a CompressedLinear submodule,
    placed where the exported layer lived (its buffers' prefix), made through a ``LayerCall``."""
    by_prefix = {}
    for name, (packed, bias, e) in layers.items():
        by_prefix[f"{name}.linear" if e["module"] == "CompressedConv2d" else name] = (name, packed, bias, e["bias"])
    graph, built = gm.graph, {}
    bound = hasattr(gm, "_register_deepcopy_hook")  # torch.fx rebinds a deep copy through it (below)
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
            set_submodule(gm, prefix, built[prefix])
        with graph.inserting_before(node):
            call = (graph.call_function(LayerCall(built[prefix], prefix), (x,)) if bound
                    else graph.call_module(prefix, (x,)))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    if bound:  # torch.fx copies a graph's nodes with their targets: a deep copy would call these layers
        gm._register_deepcopy_hook(LayerCall.bind_all)
