"""The op table: one OpSpec per IRNodeType — attrs, arity, dtype rule, shape
rule and parameter shapes. Adding an op means adding one entry here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from esper.ir import dims
from esper.ir.attrs import (
    INIT,
    AttrSpec,
    boolean,
    choice,
    int_list,
    integer,
    optional,
    padding,
    pair,
    permutation,
    real,
    reduce_dims,
    reshape_target,
)
from esper.ir.types import (
    ALL_DTYPES,
    FLOAT_DTYPES,
    NUMERIC_DTYPES,
    DType,
    IRNodeType,
    RuleError,
    Shape,
    fmt_shape,
)

ShapeRule = Callable[[Sequence[Shape], Mapping[str, Any]], Shape]
ParamRule = Callable[[Sequence[Shape], Mapping[str, Any]], dict[str, Shape]]
AttrCheck = Callable[[Mapping[str, Any]], None]

_DTYPE_CLASS = {FLOAT_DTYPES: "float", NUMERIC_DTYPES: "numeric", ALL_DTYPES: "any"}


@dataclass(frozen=True, slots=True)
class OpSpec:
    """Everything the IR knows about one op."""

    op: IRNodeType
    doc: str
    arity: tuple[int, int | None]  # (min, max) inputs; max None = unbounded
    dtypes: frozenset[DType]  # allowed input dtype; all inputs share it; output has it
    shape: ShapeRule
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    params: ParamRule | None = None
    check: AttrCheck | None = None  # cross-attr constraints, no input shapes needed
    commutative: bool = False  # operand order is canonicalised for hashing
    symbolic_attrs: tuple[str, ...] = ()  # attrs that may name dim symbols (renamed in hashing)

    @property
    def dtype_class(self) -> str:
        return _DTYPE_CLASS[self.dtypes]

    @property
    def arity_text(self) -> str:
        lo, hi = self.arity
        if hi is None:
            return f">= {lo}"
        return str(lo) if lo == hi else f"{lo}..{hi}"


# --- shape rules ----------------------------------------------------------------


def _same(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    return shapes[0]


def _broadcast(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    return dims.broadcast(shapes[0], shapes[1])


def _matmul(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    return dims.matmul(shapes[0], shapes[1])


def _in_features(x: Shape, what: str) -> int:
    if not x:
        raise RuleError(f"input must have rank >= 1, got {fmt_shape(x)}")
    last = x[-1]
    if not isinstance(last, int):
        raise RuleError(f"{what} must be a concrete int, got symbol {last!r} in {fmt_shape(x)}")
    return last


def _linear(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    x = shapes[0]
    _in_features(x, "the last (feature) dim")
    return (*x[:-1], a["out_features"])


def _linear_params(shapes: Sequence[Shape], a: Mapping[str, Any]) -> dict[str, Shape]:
    n_in = _in_features(shapes[0], "the last (feature) dim")
    out: dict[str, Shape] = {"weight": (a["out_features"], n_in)}
    if a["bias"]:
        out["bias"] = (a["out_features"],)
    return out


def _conv_channels(x: Shape, a: Mapping[str, Any]) -> int:
    if len(x) != 4:
        raise RuleError(f"input must be 4-D [N, C, H, W], got {fmt_shape(x)}")
    c = x[1]
    if not isinstance(c, int):
        raise RuleError(f"channel dim must be a concrete int, got symbol {c!r}")
    if c % a["groups"]:
        raise RuleError(f"input channels {c} are not divisible by groups {a['groups']}")
    return c


def _conv2d(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    x = shapes[0]
    _conv_channels(x, a)
    (kh, kw), (sh, sw), (dh, dw) = a["kernel_size"], a["stride"], a["dilation"]
    if a["padding"] == "same":
        ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
        # "same" keeps H and W for any kernel (torch pads asymmetrically if needed).
        h, w = x[2], x[3]
    else:
        ph, pw = a["padding"]
        h = dims.conv_out(x[2], kh, sh, ph, dh, what="height")
        w = dims.conv_out(x[3], kw, sw, pw, dw, what="width")
    return (x[0], a["out_channels"], h, w)


def _conv2d_params(shapes: Sequence[Shape], a: Mapping[str, Any]) -> dict[str, Shape]:
    c = _conv_channels(shapes[0], a)
    kh, kw = a["kernel_size"]
    out: dict[str, Shape] = {"weight": (a["out_channels"], c // a["groups"], kh, kw)}
    if a["bias"]:
        out["bias"] = (a["out_channels"],)
    return out


def _conv2d_check(a: Mapping[str, Any]) -> None:
    if a["out_channels"] % a["groups"]:
        raise RuleError(
            f"out_channels {a['out_channels']} is not divisible by groups {a['groups']}"
        )
    if a["padding"] == "same" and a["stride"] != (1, 1):
        raise RuleError("padding 'same' needs stride 1 (as in torch)")


def _norm(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    x, ns = shapes[0], a["normalized_shape"]
    if len(x) < len(ns) or tuple(x[len(x) - len(ns) :]) != ns:
        raise RuleError(
            f"normalized_shape {list(ns)} must equal the trailing dims of the input {fmt_shape(x)}"
        )
    return x


def _layer_norm_params(shapes: Sequence[Shape], a: Mapping[str, Any]) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    if a["elementwise_affine"]:
        out["weight"] = a["normalized_shape"]
        if a["bias"]:
            out["bias"] = a["normalized_shape"]
    return out


def _rms_norm_params(shapes: Sequence[Shape], a: Mapping[str, Any]) -> dict[str, Shape]:
    return {"weight": a["normalized_shape"]} if a["elementwise_affine"] else {}


def _softmax(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    x = shapes[0]
    if not x:
        raise RuleError("softmax needs an input of rank >= 1")
    dims.axis(a["dim"], len(x))
    return x


def _reduce(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    x, keep = shapes[0], a["keepdim"]
    if a["dim"] is None:
        axes = set(range(len(x)))
    else:
        axes = {dims.axis(d, len(x)) for d in a["dim"]}
        if len(axes) != len(a["dim"]):
            raise RuleError(f"dim {list(a['dim'])} names the same axis twice")
    return tuple(1 if i in axes else d for i, d in enumerate(x) if keep or i not in axes)


def _reshape(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    return dims.reshape(shapes[0], a["shape"])


def _permute(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    x, perm = shapes[0], a["dims"]
    if len(perm) != len(x):
        raise RuleError(f"dims {list(perm)} must have one entry per input dim of {fmt_shape(x)}")
    norm = [dims.axis(d, len(x)) for d in perm]
    if len(set(norm)) != len(norm):
        raise RuleError(f"dims {list(perm)} is not a permutation")
    return tuple(x[d] for d in norm)


def _concat(shapes: Sequence[Shape], a: Mapping[str, Any]) -> Shape:
    first = shapes[0]
    if not first:
        raise RuleError("concat needs inputs of rank >= 1")
    d = dims.axis(a["dim"], len(first))
    total = 0
    for s in shapes:
        if len(s) != len(first) or any(
            x != y for i, (x, y) in enumerate(zip(s, first, strict=True)) if i != d
        ):
            raise RuleError(
                f"inputs {', '.join(map(fmt_shape, shapes))} differ outside concat dim {a['dim']}"
            )
        size = s[d]
        if not isinstance(size, int):
            raise RuleError(f"concat dim {a['dim']} is the symbol {size!r}; it must be concrete")
        total += size
    return (*first[:d], total, *first[d + 1 :])


# --- the table ------------------------------------------------------------------


def _attrs(*specs: AttrSpec) -> Mapping[str, AttrSpec]:
    return MappingProxyType({s.name: s for s in specs})


_UNARY = (1, 1)
_BINARY = (2, 2)
_BIAS = AttrSpec("bias", boolean, True, "learn an additive bias")
_REDUCE_ATTRS = _attrs(
    AttrSpec("dim", reduce_dims, None, "null = all dims, or an int, or a list of ints"),
    AttrSpec("keepdim", boolean, False, "keep reduced dims as size 1"),
)
_NORMALIZED_SHAPE = AttrSpec(
    "normalized_shape", int_list(1), doc="int or list; must equal the input's trailing dims"
)
_ELEMENTWISE_AFFINE = AttrSpec("elementwise_affine", boolean, True, "learn a per-element weight")


def _unary(op: IRNodeType, doc: str, dtypes: frozenset[DType] = FLOAT_DTYPES) -> OpSpec:
    return OpSpec(op, doc, _UNARY, dtypes, _same)


def _binary(op: IRNodeType, doc: str, dtypes: frozenset[DType], comm: bool) -> OpSpec:
    return OpSpec(op, doc, _BINARY, dtypes, _broadcast, commutative=comm)


T = IRNodeType
_SPECS = (
    OpSpec(
        T.LINEAR, "x @ W.T + b over the last dim", _UNARY, FLOAT_DTYPES, _linear,
        _attrs(AttrSpec("out_features", integer(1), doc="output features"), _BIAS, INIT),
        params=_linear_params,
    ),
    OpSpec(T.MATMUL, "torch.matmul (batch dims broadcast)", _BINARY, FLOAT_DTYPES, _matmul),
    OpSpec(
        T.CONV2D, "2-D convolution of [N, C, H, W]", _UNARY, FLOAT_DTYPES, _conv2d,
        _attrs(
            AttrSpec("out_channels", integer(1), doc="output channels (divisible by groups)"),
            AttrSpec("kernel_size", pair(1), doc="int or [kh, kw]"),
            AttrSpec("stride", pair(1), 1, "int or [sh, sw]"),
            AttrSpec("padding", padding, 0, "int, [ph, pw], 'same' or 'valid'"),
            AttrSpec("dilation", pair(1), 1, "int or [dh, dw]"),
            AttrSpec("groups", integer(1), 1, "channel groups (divides C and out_channels)"),
            _BIAS,
            INIT,
        ),
        params=_conv2d_params, check=_conv2d_check,
    ),
    _binary(T.ADD, "a + b (broadcast)", NUMERIC_DTYPES, True),
    _binary(T.SUB, "a - b (broadcast)", NUMERIC_DTYPES, False),
    _binary(T.MUL, "a * b (broadcast)", NUMERIC_DTYPES, True),
    _binary(T.DIV, "a / b (broadcast, true division)", FLOAT_DTYPES, False),
    _unary(T.RELU, "max(x, 0)", NUMERIC_DTYPES),
    OpSpec(
        T.GELU, "Gaussian error linear unit", _UNARY, FLOAT_DTYPES, _same,
        _attrs(AttrSpec("approximate", choice("none", "tanh"), "none", "'none' or 'tanh'")),
    ),
    _unary(T.SILU, "x * sigmoid(x)"),
    _unary(T.SIGMOID, "1 / (1 + exp(-x))"),
    _unary(T.TANH, "hyperbolic tangent"),
    OpSpec(
        T.SOFTMAX, "softmax along dim", _UNARY, FLOAT_DTYPES, _softmax,
        _attrs(AttrSpec("dim", integer(), -1, "the axis (negative counts from the end)")),
    ),
    OpSpec(
        T.LAYER_NORM, "layer normalisation over the trailing dims", _UNARY, FLOAT_DTYPES, _norm,
        _attrs(
            _NORMALIZED_SHAPE,
            AttrSpec("eps", real(0.0, lo_open=True), 1e-5, "added to the variance"),
            _ELEMENTWISE_AFFINE,
            AttrSpec("bias", boolean, True, "learn a bias (when elementwise_affine)"),
            INIT,
        ),
        params=_layer_norm_params,
    ),
    OpSpec(
        T.RMS_NORM, "RMS normalisation over the trailing dims", _UNARY, FLOAT_DTYPES, _norm,
        _attrs(
            _NORMALIZED_SHAPE,
            AttrSpec(
                "eps", optional(real(0.0, lo_open=True)), None,
                "null = torch.finfo(dtype).eps, as in torch",
            ),
            _ELEMENTWISE_AFFINE,
            INIT,
        ),
        params=_rms_norm_params,
    ),
    OpSpec(
        T.DROPOUT, "zero elements with probability p while training", _UNARY, FLOAT_DTYPES,
        _same, _attrs(AttrSpec("p", real(0.0, 1.0), 0.5, "drop probability, 0 <= p < 1")),
    ),
    OpSpec(T.SUM, "sum over dims", _UNARY, NUMERIC_DTYPES, _reduce, _REDUCE_ATTRS),
    OpSpec(T.MEAN, "mean over dims", _UNARY, FLOAT_DTYPES, _reduce, _REDUCE_ATTRS),
    OpSpec(T.MAX, "max over dims (values only, like amax)", _UNARY, NUMERIC_DTYPES, _reduce,
           _REDUCE_ATTRS),
    OpSpec(
        T.RESHAPE, "reshape (one -1 allowed; symbols of the input allowed)", _UNARY,
        ALL_DTYPES, _reshape,
        _attrs(AttrSpec("shape", reshape_target, doc="ints >= 1, input symbols, one -1")),
        symbolic_attrs=("shape",),
    ),
    OpSpec(
        T.PERMUTE, "reorder dims", _UNARY, ALL_DTYPES, _permute,
        _attrs(AttrSpec("dims", permutation, doc="a permutation of the input's dims")),
    ),
    OpSpec(
        T.CONCAT, "concatenate along dim", (1, None), ALL_DTYPES, _concat,
        _attrs(AttrSpec("dim", integer(), 0, "the axis; other dims must be equal")),
    ),
    OpSpec(T.IDENTITY, "the input, unchanged", _UNARY, ALL_DTYPES, _same),
    OpSpec(
        T.SCALE, "x * value", _UNARY, FLOAT_DTYPES, _same,
        _attrs(AttrSpec("value", real(), doc="a finite number")),
    ),
)

OPS: Mapping[IRNodeType, OpSpec] = MappingProxyType({s.op: s for s in _SPECS})
PARAMETERISED = frozenset(op for op, s in OPS.items() if s.params is not None)

if set(OPS) != set(IRNodeType):  # pragma: no cover - a table edit forgot an op
    raise RuntimeError(f"ops without an OpSpec: {sorted(set(IRNodeType) - set(OPS))}")
