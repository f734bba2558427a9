"""Sibling projections that read the same input (an attention's q / k / v, a gated MLP's gate / up)
run as one packed call on their weights concatenated by rows.

A decode step calls each of a Llama layer's seven projections on one row: a few microseconds of
kernel each, as much again of call overhead. ``fuse_shared_inputs(model)`` concatenates each group's
packed tensors once (the members' buffers become row views of the joint ones: no second copy) and
hands the members a ``SharedInput``: the first member called with ``x`` runs the joint weight on
it and keeps the result; a sibling called with the same tensor object takes its rows of it. The
model's own code (transformers' forward) is unchanged. ``compress`` and ``load`` apply it (an
int8 MiniLM at the batch of 16: 1.78-1.79x -> 1.83x dense in memory, 1.72-1.81x -> 1.90-1.91x loaded).

Same outputs as separate calls: each output row of a packed kernel depends only on x and that row's
weights (int8 activations are quantized per row of x, whatever N is), and so does a row of torch's
GEMM on a kept fp32 copy (MKL: checked bit for bit at 1-736 rows on this project's machines), so a
member's rows of the joint call are the numbers its own call gives -- where the joint call takes the
member's path. A group runs jointly at batches where the joint weight has a direct call
(``Backend.direct_call``: the packed kernel, or the dense route on a kept copy), on the joint weight's
route (cpu_routes.py, measured for its N x K); elsewhere each member runs its own call. Where the
joint's route differs from the one a member would take alone, the two differ by that path's rounding
(fp32 sums in another order). CSR joins too (``CSRWeight.concat_rows``): a 50 %-sparse MiniLM runs
its q / k / v as one dense GEMM on the joint copy at one sentence, as dense runs three.
tests/test_llm.py checks equality bit for bit.
"""

from __future__ import annotations

import torch
from torch import get_num_threads as torch_thread_count
from torch import nn

from ..act import default_act
from ..backends import epoch, generation
from ..backends.cpu_native import threads
from ..formats import PackedWeight
from .embedding import gathers_rows
from .modules import CompressedLinear, _buffer_name

# Sibling names whose layers read one input, per parent module (Llama / Mistral / Qwen / Gemma / Phi-3
# style attention and MLP, BERT-style self-attention). A wrong guess never costs correctness (a member
# called with another input than its siblings' takes its rows of a joint call on that input), and its
# speed only until the group parts (PART_AFTER).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def concat_rows(weights: list[PackedWeight]) -> PackedWeight | None:
    """One packed weight holding ``weights``' rows in order (same format, parameters, K, dtype and
    device), or None when they cannot be joined."""
    first = weights[0]
    if first.kind != "csr" and not all(gathers_rows(w) for w in weights):
        return None
    t0 = first.tensors()
    for w in weights[1:]:
        t = w.tensors()
        if (type(w) is not type(first) or w.fmt != first.fmt or w.params() != first.params()
                or w.shape[1] != first.shape[1] or t.keys() != t0.keys()
                or any(t[k].dtype != t0[k].dtype or t[k].device != t0[k].device or t[k].shape[1:] != t0[k].shape[1:]
                       for k in t0)):
            return None
    return type(first).concat_rows(weights)


# Joint calls in a row whose rows not every member took before the next input came: the siblings read
# different inputs (a decoder's cross-attention: q_proj the decoder's states, k_proj / v_proj the
# encoder's, or only q_proj once k / v are cached), where every call computed every member's rows --
# the group parts for good.
PART_AFTER = 2


class CopyToken:
    """What a group member's copy takes instead of the group (CompressedLinear.__getstate__). One
    copy.deepcopy call copies the token once (its memo), so the copies of the members it copies all
    arrive at that one copy, and join again as a group when every member has arrived; a lone layer's
    copy, or some of the members', runs alone. Pickled members meet the same way."""

    def __init__(self, size: int, copied: bool = False):
        self.size, self.copied = size, copied
        self.arrived: dict[int, CompressedLinear] = {}

    def __deepcopy__(self, memo):  # one empty token per copy (deepcopy's memo shares it), never members
        return CopyToken(self.size, copied=True)

    def __reduce__(self):  # likewise per pickle
        return CopyToken, (self.size, True)

    def arrive(self, member: CompressedLinear, index: int) -> None:
        if not self.copied:  # a shallow copy (copy.copy) of a member: it runs alone
            return
        self.arrived[index] = member
        if len(self.arrived) == self.size:
            members, self.arrived = [self.arrived[i] for i in range(self.size)], {}
            join(members)


class SharedInput:
    """The joint call of sibling layers (see the module docstring). Held by each member as ``_group``."""

    def __init__(self, members: list[CompressedLinear], joint: PackedWeight, bias: torch.Tensor | None):
        self.members = members
        self.token = CopyToken(len(members))
        self.joint = CompressedLinear(joint, bias, members[0].backend, members[0].act)
        self.index = {id(m): i for i, m in enumerate(members)}
        self.sizes = [m.out_features for m in members]
        self._plans: dict[tuple, bool] = {}
        self._hot = None  # see runs_jointly
        self._x = self._parts = None  # the last joint call's input, and its output split by member
        self._left = 0  # members yet to take their rows of it
        self._missed = 0  # joint calls in a row that not every member took rows of (PART_AFTER)
        self._compile_handle = None  # set by prepare_compile (ops.layer_linear runs ``run``)

    def part(self) -> None:
        """Leave each member to run its own call from now on."""
        for m in self.members:
            m._group = None
        self._x = self._parts = None

    def output(self, member: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:
            if self._left > 0 and not torch.compiler.is_compiling():  # the last joint call's rows, not all taken
                self._missed += 1
                if self._missed >= PART_AFTER:
                    self.part()
                    return member.run(x)
            if self._compile_handle is not None and torch.compiler.is_compiling():
                # traced by torch.compile: one op for the group, its rows handed out as in eager; the op
                # decides joint or apart at run time (run_all)
                out = torch.ops.sparseinfer.layer_linear(x, self._compile_handle, self.joint.out_features)
            elif not self.runs_jointly(x):
                return member.run(x)
            else:
                out = self.joint.run(x)
            # one split for all members: three narrow()s cost 5-10 us, a quarter of a one-sentence
            # MiniLM q / k / v call's saving
            self._x, self._parts, self._left = x, out.split_with_sizes(self.sizes, -1), len(self.members)
        part = self._parts[self.index[id(member)]]
        self._left -= 1
        if self._left <= 0:  # every member has its rows: keep nothing alive
            self._x = self._parts = None
            self._missed = 0
        return part

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for ``x``, side by side (what ``sparseinfer::layer_linear`` runs for
        the group under torch.compile)."""
        if self.runs_jointly(x):
            return self.joint.run(x)
        return torch.cat([m.run(x) for m in self.members], dim=-1)

    def runs_jointly(self, x: torch.Tensor) -> bool:
        """Whether calls like ``x`` run as the joint call: the members share activation mode and
        backend, and the joint weight has a direct call (``Backend.direct_call``)."""
        hot = self._hot  # the last call's kind and answer, kept as CompressedLinear.run keeps its plan
        if (hot is not None and hot[0] == x.shape and hot[1] is x.dtype and hot[2] is x.is_cpu and not x.requires_grad
                and hot[3] == epoch.count and hot[4] == torch_thread_count()):
            return hot[5]
        settings, n_threads = [(m.act, m.backend) for m in self.members], threads()  # (epoch after threads())
        now = epoch.count, torch_thread_count()
        key = (x.shape, x.dtype, x.is_cpu, x.requires_grad and torch.is_grad_enabled(), *settings, default_act(),
               n_threads, generation())
        found = self._plans.get(key)
        if found is None:
            found = len(set(settings)) == 1
            if found:
                self.joint.act, self.joint.backend = settings[0]
                # (the members' own plans are not made: on the dense route each would keep an fp32
                # copy of its rows beside the joint's, and first use would measure their shapes too)
                found = self.joint.plan(x) is not None
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = found
        elif found and (self.joint.act, self.joint.backend) != settings[0]:
            self.joint.act, self.joint.backend = settings[0]  # set_act changed the members since
        if not x.requires_grad:  # (a member's act or backend setter drops it)
            self._hot = (x.shape, x.dtype, x.is_cpu, *now, found)
        return found


def fuse_shared_inputs(model: nn.Module) -> int:
    """Give each group of sibling compressed layers that read one input (``GROUPS``) a joint call;
    returns how many groups were formed. Idempotent. A member moved or reloaded later (``.to``,
    ``load_state_dict``) leaves its group and runs alone; a deep copy of the whole group is a group."""
    formed = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in GROUPS:
            members = [children.get(n) for n in names]
            if not all(isinstance(m, CompressedLinear) for m in members):
                continue
            if all(m._group is not None and m._group is members[0]._group for m in members):
                continue  # already joined
            formed += join(members)
    return formed


def join(members: list[CompressedLinear]) -> bool:
    """Join ``members`` (siblings that read one input, in order) as a SharedInput, where their backend,
    act and bias presence agree and their weights concatenate; returns whether they were joined."""
    if len({(m.backend, m.act) for m in members}) != 1 or len({m.bias is None for m in members}) != 1:
        return False
    joint = concat_rows([m.packed for m in members])
    if joint is None:
        return False
    bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
    group = SharedInput(members, joint, bias)
    start = 0
    for m in members:  # the members' tensors become row views of the joint ones (stored once;
        n = m.out_features  # a CSR member's row starts are its own, shifted back to 0)
        part = joint.rows(start, start + n)
        for name, t in part.tensors().items():
            setattr(m, _buffer_name(name), t)
        m.packed = part  # (whose tensors the buffers now are)
        start += n
        m._plans.clear()
        m._group = group
    return True
