"""nn.Modules that hold one PackedWeight and run it through ``linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import get_num_threads as torch_thread_count
from torch import nn

from ..act import check_act, default_act
from ..backends import epoch, generation, resolve
from ..backends.cpu_native import threads
from ..formats import PackedWeight, from_parts
from ..formats.base import FLOAT_DTYPES
from . import ops
from .linear import check_linear_args, linear


def _buffer_name(tensor_name: str) -> str:
    return "packed_" + tensor_name.replace(".", "__")


class CompressedLinear(nn.Module):
    """Drop-in for nn.Linear with a packed weight. The packed tensors are registered as buffers
    (``packed_<name>``), so state_dict, ``.to(device)`` and export see them."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, backend: str | None = None,
                 act: str | None = None):
        super().__init__()
        self._hot = None  # the last call's kind and plan, checked before _plans (see run)
        self._group = None  # a SharedInput (fused.py) when this layer's input feeds siblings too
        self.in_features, self.out_features = packed.shape[1], packed.shape[0]
        self.backend = backend
        self.act = act
        self._fmt, self._params = packed.fmt, packed.params()
        self._names = list(packed.tensors())
        # the custom op's JSON spec, built once: fmt / shape / params never change after packing
        # (and TorchDynamo, in strict export, cannot trace json.dumps)
        self._spec = ops.make_spec(packed)
        for name, t in packed.tensors().items():
            self.register_buffer(_buffer_name(name), t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.packed = packed
        self._compile_handle = None  # set by prepare_compile (ops.layer_linear)
        self._plans: dict[tuple, object] = {}  # per kind of call: the backend's direct call, or None

    # act and backend are properties so that setting one drops the last call's plan (and the group's):
    # run() then compares nothing of them on each call
    @property
    def act(self) -> str | None:
        """Activation precision the kernels may use (``sparseinfer.act``; None: the process default)."""
        return self._act

    @act.setter
    def act(self, act: str | None) -> None:
        check_act(act, "CompressedLinear")
        self.__dict__["_act"] = act
        self._drop_hot()

    @property
    def backend(self) -> str | None:
        """The backend that runs this layer (None: the first that supports the call, by priority)."""
        return self._backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        self.__dict__["_backend"] = backend
        self._drop_hot()

    def _drop_hot(self) -> None:
        self.__dict__["_hot"] = None
        if self._group is not None:
            self._group._hot = None

    def _rebuild(self) -> None:
        tensors = {n: getattr(self, _buffer_name(n)) for n in self._names}
        if any(t is not self.packed.tensors()[n] for n, t in tensors.items()):
            self.packed = from_parts(self._fmt, tensors, (self.out_features, self.in_features), self._params)

    def _apply(self, fn, recurse=True):
        # A cast (.half(), .to(torch.bfloat16)) reaches the packed tensors only where the format takes
        # the new dtype (float N:M / CSR values); otherwise (float32 scales, integer codes) they keep
        # their dtypes and only move. The bias and a device move reach everything.
        packed = {n: getattr(self, _buffer_name(n)) for n in self._names}
        applied = {n: fn(t) for n, t in packed.items()}
        try:
            from_parts(self._fmt, applied, (self.out_features, self.in_features), self._params)
        except ValueError:  # the format fixes these dtypes: move, do not cast
            for n, t in packed.items():
                if applied[n].dtype != t.dtype:
                    applied[n] = t.to(applied[n].device)
        done = {id(packed[n]): new for n, new in applied.items()}
        out = super()._apply(lambda t: done[id(t)] if id(t) in done else fn(t), recurse)
        self._rebuild()  # the buffers were replaced (device or dtype): rebuild the packed view
        self._forget_plans()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._rebuild()
        self._forget_plans()

    def __getstate__(self):  # copy.deepcopy, pickle
        state = self.__dict__.copy()
        # the plans call this layer's _C handles and the compile handle names this layer: a copy makes
        # its own. A group member's copy takes the group's token instead of the group (which would drag
        # the siblings' copies along with a lone layer's): the copies of one deepcopy call meet on the
        # token's one copy and join again when all have arrived (fused.CopyToken)
        group = self._group
        state.update(_plans={}, _hot=None, _group=None, _compile_handle=None,
                     _copy_token=None if group is None else (group.token, group.index[id(self)]))
        return state

    def __setstate__(self, state):
        token = state.pop("_copy_token", None)
        super().__setstate__(state)
        if token is not None:
            token[0].arrive(self, token[1])

    def _forget_plans(self) -> None:
        # the tensors may no longer be what the plans or a shared-input group point into
        self._plans.clear()
        self._hot = None
        self._group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # torch.compile, and torch.export (which sets it too)
            if self._compile_handle is not None and not torch.compiler.is_exporting():
                if self._group is not None and self._group._compile_handle is not None:
                    return self._group.output(self, x)
                return torch.ops.sparseinfer.layer_linear(x, self._compile_handle, self.out_features)
            if torch.compiler.is_exporting():
                tensors = [getattr(self, _buffer_name(n)) for n in self._names]
                return torch.ops.sparseinfer.packed_linear(x, tensors, self._spec, self.bias)
            return linear(x, self.packed, self.bias, self.backend, self.act)
        if self._group is not None:
            return self._group.output(self, x)
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x, packed, bias, backend, act)``, through the backend's direct call when it has one
        for this kind of call (memoised per layer: a decode step makes ~200 calls of a few microseconds
        of kernel each, where the lookups in ``linear`` cost as much again)."""
        # The last call's plan holds while x is like its input and nothing it was made under changed:
        # the process-wide epoch (backends, routes, configured threads), torch's thread count (which
        # threads() follows when none is configured), this layer's act and backend (their setters drop
        # it). Every Python step here costs several times its tight-loop time inside a model, where
        # caches go cold between layers (bench/README.md). A call that requires grad takes plan().
        hot = self._hot
        if (hot is not None and hot[0] == x.shape and hot[1] is x.dtype and hot[2] is x.is_cpu
                and not x.requires_grad and hot[3] == epoch.count and hot[4] == torch_thread_count()):
            call = hot[5]
        else:
            call = self.plan(x)
        if call is None:
            return linear(x, self.packed, self.bias, self.backend, self.act)
        # self.bias without Module.__getattr__ (0.7 us a call, a Python frame): a bias given at
        # construction is a registered parameter, None a plain attribute, as nn.Module keeps them
        return call(x, self._parameters.get("bias"))

    def plan(self, x: torch.Tensor):
        """The memoised direct call for calls like ``x`` (see ``Backend.direct_call``), or None."""
        act, n_threads = self.act or default_act(), threads()  # (the first threads() may set the count: epoch after)
        now = epoch.count, torch_thread_count()
        key = (x.shape, x.dtype, x.is_cpu, x.requires_grad and torch.is_grad_enabled(), act, self.backend, n_threads,
               generation())
        try:
            call = self._plans[key]
        except KeyError:
            check_linear_args(x, self.packed, self.bias)
            bias = self.bias
            call = None
            if bias is None or (bias.dtype in FLOAT_DTYPES and bias.is_contiguous() and not bias.requires_grad):
                call = resolve(self.packed, x, self.backend).direct_call(self.packed, x, act)
            if len(self._plans) >= 64:  # many distinct row counts (prompt lengths): keep it bounded
                self._plans.clear()
            self._plans[key] = call
        if not x.requires_grad:  # what run() compares (set in __dict__: Module.__setattr__ costs 2 us)
            self.__dict__["_hot"] = (x.shape, x.dtype, x.is_cpu, *now, call)
        return call

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self._fmt!r}, "
                f"params={self._params}, bias={self.bias is not None}" + (f", act={self.act!r}" if self.act else ""))


class CompressedConv2d(nn.Module):
    """nn.Conv2d (groups=1, zero padding) run as a GEMM: unfold the input into patches and
    multiply by the packed weight [out_channels, in_channels * kh * kw]."""

    def __init__(self, linear_layer: CompressedLinear, kernel_size, stride, padding, dilation):
        super().__init__()
        self.linear = linear_layer
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    @staticmethod
    def eligible(conv: nn.Conv2d) -> str | None:
        """None if ``conv`` can be compressed, else why not."""
        if conv.groups != 1:
            return f"groups={conv.groups} (only groups=1 runs as one GEMM)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}"
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r}"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C*kh*kw, L]
        y = self.linear(patches.transpose(1, 2))  # [B, L, O]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return y.transpose(1, 2).reshape(b, -1, oh, ow)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


def prepare_compile(model: nn.Module) -> nn.Module:
    """Before ``torch.compile(model)``: give every compressed layer a handle, so that the compiled
    graph calls each as one ``sparseinfer::layer_linear`` op on the live layer (see ops.py); layers
    joined by ``fuse_shared_inputs`` take one op per group."""
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            m._compile_handle = ops.register_layer(m)
            if m._group is not None and m._group._compile_handle is None:  # q/k/v, gate/up: one op (fused.py)
                m._group._compile_handle = ops.register_layer(m._group)
    return model


def set_act(model: nn.Module, act: str | None) -> nn.Module:
    """Set the activation precision every compressed layer of ``model`` may use: "auto" (int8
    activations where that kernel exists and is faster, else exact), "fp32" (exact), "int8" (the
    explicit permission to quantize x per call, ~0.6 % normwise error) or None (the process default:
    SPARSEINFER_ACT, else "auto"); see ``sparseinfer.act``. Returns ``model``."""
    check_act(act, "set_act")
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            m.act = act
    return model
