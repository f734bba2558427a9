"""What an artifact's program.json may contain: an allow-list of side-effect-free operators.

program.json is untrusted input, and torch's deserializer trusts it: a node may name any operator
(``aten.from_file`` reads or maps a file, ``aten.set_`` rebinds storage, ``aten.fill_`` writes an input),
and every symbolic shape expression is handed to ``sympy.sympify``, which evaluates Python. So before
torch reads a byte of it, ``check_program`` walks the whole JSON and refuses, naming the node:

* a signature that writes an input (a buffer, parameter or user input mutated in place) or threads
  effect tokens: outputs are user outputs only;
* a node or operator argument whose target is not allowed: only the aten operator families that
  compute a value from their inputs (arithmetic, comparisons, views and indexing, reductions,
  activations, norms, attention, embedding, convolution and pooling, tensor construction), in their
  overloads that write no argument (no ``out=``, no in-place variant); the symbolic-shape operators
  (``operator.add``, ``torch.sym_max``, ...); ``sparseinfer::packed_linear``; and the grad-mode /
  autocast wrappers whose nested graphs are checked the same way;
* a symbolic expression that is not plain arithmetic on shape symbols (strict grammar: known sympy
  and torch function names, symbol names, numbers; no attribute access, no other names, powers only
  to small literal exponents) and any integer beyond int64.

(The program's ``guards_code`` -- Python source torch can exec() to check inputs -- is never run: load
drops it before deserializing.)

``check_graph`` repeats the operator check on the graph torch built, so what runs is what was checked.
Nothing here limits how much memory or time an allowed program may use.
"""

from __future__ import annotations

import functools
import math
import operator
import re

import torch

from . import ops  # noqa: F401  (registers sparseinfer::packed_linear)
from .errors import ArtifactError
from .manifest import MAX_DEPTH, parse_json

# aten operator families (OpOverloadPacket names) that compute a value from their inputs and nothing
# else, in any overload that writes none of its arguments. Not here, among others: from_file and the
# storage / memory-format mutators (set_, resize_, as_strided_), every in-place (name_) and out= form
# (refused by schema), as_strided (arbitrary strides over a storage), empty / empty_strided
# (uninitialised memory) and batch_norm (updates running statistics in training mode).
ATEN_FAMILIES = frozenset("""
    abs acos acosh add addbmm addcdiv addcmul addmm addmv asin asinh atan atan2 atanh ceil clamp clamp_max
    clamp_min clip copysign cos cosh div erf erfc erfinv exp exp2 expm1 floor floor_divide fmax fmin fmod
    frac hypot lerp log log10 log1p log2 logit maximum minimum mul nan_to_num neg pow reciprocal remainder
    round rsqrt rsub sgn sign sin sinh sqrt square sub tan tanh true_divide trunc xlogy
    eq ge gt le lt ne isfinite isinf isnan isneginf isposinf where masked_fill
    logical_and logical_not logical_or logical_xor bitwise_and bitwise_left_shift bitwise_not bitwise_or
    bitwise_right_shift bitwise_xor __and__ __or__ __xor__ __lshift__ __rshift__
    alias alias_copy cat chunk clone concat concatenate contiguous detach diagonal diag diff expand
    expand_as flatten flip gather index index_add index_copy index_fill index_put index_select
    lift_fresh_copy masked_scatter masked_select movedim narrow permute repeat repeat_interleave reshape
    reshape_as roll scatter scatter_add select select_scatter slice slice_scatter diagonal_scatter split
    split_with_sizes squeeze stack t take_along_dim tensor_split tile transpose tril triu unbind unflatten
    unfold unsqueeze view view_as _unsafe_view _to_copy to type_as
    all amax amin any argmax argmin argsort count_nonzero cummax cummin cumprod cumsum logsumexp max mean
    median min norm linalg_vector_norm prod sort std std_mean sum topk var var_mean
    bmm dot linear matmul mm mv outer baddbmm
    celu elu gelu glu hardsigmoid hardswish hardtanh leaky_relu mish prelu _prelu_kernel relu relu6 selu
    sigmoid silu softplus threshold softmax _softmax _safe_softmax log_softmax _log_softmax
    layer_norm native_layer_norm rms_norm _fused_rms_norm group_norm native_group_norm
    _native_batch_norm_legit_no_training
    scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_attention_math
    embedding one_hot bucketize
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d convolution _convolution avg_pool1d avg_pool2d
    max_pool1d max_pool2d max_pool2d_with_indices adaptive_avg_pool1d adaptive_avg_pool2d _adaptive_avg_pool2d
    adaptive_max_pool2d upsample_bilinear2d upsample_nearest2d _upsample_nearest_exact2d pixel_shuffle
    pixel_unshuffle im2col col2im pad constant_pad_nd reflection_pad1d reflection_pad2d replication_pad1d
    replication_pad2d
    arange eye fill full full_like linspace new_full new_ones new_zeros ones ones_like scalar_tensor zeros
    zeros_like
    dropout feature_dropout native_dropout
    item _local_scalar_dense sym_size sym_stride sym_numel sym_storage_offset
    _assert_tensor_metadata _assert_scalar _assert_async sym_constrain_range sym_constrain_range_for_size
""".split())

# Shape arithmetic on SymInts (as torch.export records it) and the getitem of multi-output nodes.
# Not operator.pow / lshift: unbounded integers from small inputs.
SYMBOLIC_FUNCTIONS = (
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.neg, operator.pos, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, math.trunc, torch.sym_not, torch.sym_int, torch.sym_float,
    torch.sym_ite, torch.sym_max, torch.sym_min, torch.sym_sqrt,
)


INPUT_KINDS = ("user_input", "parameter", "buffer", "tensor_constant", "constant_input")


def serialized_name(target) -> str:
    """The name torch's serializer writes for ``target`` (as GraphModuleSerializer.serialize_operator)."""
    module = target.__module__
    if module.startswith("torch._ops"):
        module = module.replace("torch._ops", "torch.ops")
    return f"{module}.{target.__name__}"


def _writes_an_argument(op) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


@functools.lru_cache(maxsize=None)
def allowed_targets() -> dict:
    """{serialized name: operator} of everything a program may call."""
    allowed = {}
    for family in ATEN_FAMILIES:
        packet = getattr(torch.ops.aten, family, None)  # an older torch may lack a few
        for overload in packet.overloads() if packet is not None else ():
            op = getattr(packet, overload)
            if not _writes_an_argument(op):
                allowed[serialized_name(op)] = op
    hops = [getattr(torch.ops.higher_order, name, None)
            for name in ("wrap_with_set_grad_enabled", "wrap_with_autocast")]
    for target in (*SYMBOLIC_FUNCTIONS, torch.ops.sparseinfer.packed_linear.default, *filter(None, hops)):
        allowed[serialized_name(target)] = target
    return allowed


def _refuse(what: str, why: str) -> None:
    raise ArtifactError(f"program.json: {what} {why}; refused (an artifact's program may hold only side-effect-free "
                        f"operators and shape arithmetic: sparseinfer/runtime/program_check.py)")


# -- the JSON, before torch reads it ------------------------------------------------------------------

def check_program(program) -> None:
    """Raise ArtifactError at the first node, operator argument, expression or guard of ``program``
    (the parsed program.json) that is not allowed (see the module docstring)."""
    if not isinstance(program, dict):
        raise ArtifactError(f"program.json: not an exported program (a JSON {type(program).__name__})")
    signature = (program.get("graph_module") or {}).get("signature") or {}
    for spec in signature.get("input_specs") or []:
        kind = next(iter(spec), None) if isinstance(spec, dict) else None
        if kind not in INPUT_KINDS:
            _refuse(f"an input of kind {kind!r}", "is not a tensor, parameter, buffer or constant")
    for spec in signature.get("output_specs") or []:
        kind = next(iter(spec), None) if isinstance(spec, dict) else None
        if kind != "user_output":
            _refuse(f"an output of kind {kind!r}", "writes the model's state or inputs")
    allowed = allowed_targets()
    stack: list = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
                _refuse(f"the integer {item}", "is outside int64")
            continue
        if isinstance(item.get("nodes"), list):  # a graph (the program's, or one nested in a node's arguments)
            for node in item["nodes"]:
                target = node.get("target") if isinstance(node, dict) else None
                name = node.get("name") if isinstance(node, dict) else None
                if not isinstance(target, str) or target not in allowed:
                    _refuse(f"node {name!r} calls {target!r}, which", "is not on the allow-list")
        op = item.get("as_operator")
        if op is not None and (not isinstance(op, str) or op not in allowed):
            _refuse(f"an argument names the operator {op!r}, which", "is not on the allow-list")
        expr = item.get("expr_str")
        if expr is not None:
            check_expression(expr)
        for key in ("in_spec", "out_spec"):  # pytree specs: JSON inside a string
            if isinstance(item.get(key), str):
                stack.append(parse_json(item[key], f"program.json: {key}", MAX_DEPTH))
        stack.extend(item.values())


# -- symbolic expressions ---------------------------------------------------------------------------------

# sympy's (as srepr writes them) and torch.utils._sympy.functions' (as the deserializer provides them)
EXPRESSION_FUNCTIONS = frozenset("""
    Symbol Integer Float Rational Mul Add Pow Max Min Mod Abs floor ceiling Eq Ne Lt Le Gt Ge StrictLessThan
    StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural
    FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt
    RoundDecimal ToFloat Identity
""".split())
EXPRESSION_CONSTANTS = frozenset("True False true false oo zoo nan".split())
EXPRESSION_KEYWORDS = frozenset("positive negative nonnegative nonpositive integer real finite nonzero commutative "
                                "precision evaluate".split())
POWERS = frozenset("Pow PowByNatural FloatPow LShift".split())  # exponent: a literal integer, |n| <= 64
SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")  # s0, u12, zuf3: shape symbols
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<str>'(?:[A-Za-z]\w*|[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)')"  # a symbol's name, a number
                    r"|(?P<op>//|\*\*|<=|>=|==|!=|[-+*/%(),=<>]))")
MAX_EXPRESSION = 4096


def check_expression(expr) -> None:
    """Refuse anything but arithmetic on shape symbols (a strict subset of what sympy.sympify reads)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPRESSION:
        _refuse(f"the expression {str(expr)[:80]!r}", f"is not a string of at most {MAX_EXPRESSION} characters")
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        if not m:
            _refuse(f"the expression {expr[:80]!r}", f"holds something other than arithmetic at {expr[pos:pos + 20]!r}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    _Parser(expr, tokens).parse()


class _Parser:
    """expr := sum (cmp sum)? ; sum := term (+|- term)* ; term := unary (*|/|//|% unary)* ;
    unary := -unary | atom (** exponent)? ;
    atom := number | symbol | constant | '(' expr ')' | function '(' args ')'."""

    def __init__(self, text: str, tokens: list):
        self.text, self.tokens, self.i, self.depth = text, tokens, 0, 0

    def fail(self, why: str):
        _refuse(f"the expression {self.text[:80]!r}", why)

    def peek(self, value: str | None = None, kind: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        k, v = self.tokens[self.i]
        return (value is None or v == value) and (kind is None or k == kind)

    def take(self):
        if self.i >= len(self.tokens):
            self.fail("ends early")
        self.i += 1
        return self.tokens[self.i - 1]

    def expect(self, value: str) -> None:
        if self.take()[1] != value:
            self.fail(f"lacks {value!r}")

    def parse(self) -> None:
        self.expr()
        if self.i != len(self.tokens):
            self.fail(f"has {self.tokens[self.i][1]!r} where it should end")

    def expr(self):
        self.sum()
        if any(self.peek(op) for op in ("<", "<=", ">", ">=", "==", "!=")):
            self.take()
            self.sum()

    def sum(self):
        self.term()
        while self.peek("+") or self.peek("-"):
            self.take()
            self.term()

    def term(self):
        self.unary()
        while any(self.peek(op) for op in ("*", "/", "//", "%")):
            self.take()
            self.unary()

    def unary(self):
        if self.peek("-") or self.peek("+"):
            self.take()
            return self.unary()
        self.atom()
        if self.peek("**"):
            self.take()
            self.exponent()

    def atom(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nests deeper than {MAX_DEPTH} levels")
        kind, value = self.take()
        if kind == "num":
            self.number(value)
        elif value == "(":
            self.expr()
            self.expect(")")
        elif kind == "name" and self.peek("("):
            if value not in EXPRESSION_FUNCTIONS:
                self.fail(f"calls {value!r}, which is not a sympy / torch shape function")
            self.call(value)
        elif kind == "name":
            if value not in EXPRESSION_CONSTANTS and not SYMBOL_NAME.fullmatch(value):
                self.fail(f"names {value!r}, which is neither a shape symbol nor a constant")
        else:
            self.fail(f"has {value!r} where a value should be")
        self.depth -= 1

    def number(self, text: str) -> int | float:
        value = float(text) if any(c in text for c in ".eE") else int(text)
        if abs(value) >= 2**63:
            self.fail(f"holds the number {text}, outside int64")
        return value

    def call(self, function: str) -> None:
        self.expect("(")
        index = 0
        while not self.peek(")"):
            if index:
                self.expect(",")
            if self.peek(kind="name") and self.i + 1 < len(self.tokens) and self.tokens[self.i + 1][1] == "=":
                keyword = self.take()[1]
                self.take()
                if keyword not in EXPRESSION_KEYWORDS:
                    self.fail(f"passes the keyword {keyword!r}")
                kind, value = self.take()
                if not (kind == "num" or value in ("True", "False")):
                    self.fail(f"passes {keyword}={value}")
            elif self.peek(kind="str"):
                self.take()
            elif function in POWERS and index == 1:
                self.exponent()
            else:
                self.expr()
            index += 1
        self.take()

    def exponent(self) -> None:
        """A literal integer, bare or as Integer(n), with |n| <= 64: sympy evaluates powers of numbers."""
        wrapped = self.peek("Integer")
        if wrapped:
            self.take()
            self.expect("(")
        if self.peek("-"):
            self.take()
        kind, value = self.take()
        if kind != "num" or not value.isdigit() or int(value) > 64:
            self.fail(f"raises to the power {value!r} (only literal integers up to 64)")
        if wrapped:
            self.expect(")")


# -- the graph, after torch built it ------------------------------------------------------------------

def check_graph(gm: torch.fx.GraphModule) -> None:
    """Every call in ``gm`` and its nested graphs is an allowed operator (``check_program`` checked the
    names; this checks the objects torch resolved them to)."""
    allowed = set(map(id, allowed_targets().values()))
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            called = node.op in ("call_method", "call_module", "call_function")
            if called and (node.op != "call_function" or id(node.target) not in allowed):
                _refuse(f"node {node.name!r} ({node.op} {node.target!r})", "is not on the allow-list")
