"""The op table: every op's shape and dtype rule, checked against torch itself on
concrete shapes, plus the symbolic cases torch cannot check."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from esper.ir import OPS, PARAMETERISED, BlueprintIR, IRNodeType, IRValidationError
from esper.ir.attrs import REQUIRED

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16, "int64": torch.int64, "bool": torch.bool}


def infer(shapes: list[list[Any]], op: str, attrs: dict[str, Any] | None = None,
          dtype: str = "float32") -> tuple[tuple[Any, ...], str] | str:
    """The IR's output (shape, dtype), or the error message."""
    names = [f"i{k}" for k in range(len(shapes))]
    data = {
        "schema_version": 1, "name": "t",
        "inputs": [{"name": n, "shape": s, "dtype": dtype} for n, s in zip(names, shapes,
                                                                           strict=True)],
        "nodes": [{"id": "o", "op": op, "inputs": names, "attrs": attrs or {}}],
        "outputs": ["o"],
    }
    try:
        out = BlueprintIR.from_dict(data).output_schemas()[0]
    except IRValidationError as exc:
        return str(exc)
    return out.shape, out.dtype.value


def run_torch(shapes: list[list[int]], op: str, attrs: dict[str, Any], dtype: str) -> Any:
    """torch's own answer for the op (the reference for every concrete case)."""
    dt = TORCH_DTYPE[dtype]
    xs = [torch.ones(s, dtype=dt) for s in shapes]
    a = dict(attrs)
    x = xs[0]
    if op == "linear":
        w = torch.ones(a["out_features"], x.shape[-1], dtype=dt)
        bias = None if a.get("bias") is False else torch.ones(w.shape[0], dtype=dt)
        return F.linear(x, w, bias)
    if op == "conv2d":
        k = a["kernel_size"]
        kh, kw = (k, k) if isinstance(k, int) else k
        g = a.get("groups", 1)
        w = torch.ones(a["out_channels"], x.shape[1] // g, kh, kw, dtype=dt)
        pad = a.get("padding", 0)
        return F.conv2d(x, w, None, a.get("stride", 1), pad, a.get("dilation", 1), g)
    binary = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
              "matmul": torch.matmul}
    if op in binary:
        return binary[op](xs[0], xs[1])
    unary = {"relu": torch.relu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "identity": lambda t: t}
    if op in unary:
        return unary[op](x)
    if op == "gelu":
        return F.gelu(x, approximate=a.get("approximate", "none"))
    if op == "softmax":
        return torch.softmax(x, a.get("dim", -1))
    if op in ("layer_norm", "rms_norm"):
        ns = a["normalized_shape"]
        ns = [ns] if isinstance(ns, int) else ns
        if op == "layer_norm":
            return F.layer_norm(x, ns, torch.ones(ns, dtype=dt), torch.zeros(ns, dtype=dt))
        return F.rms_norm(x, ns, torch.ones(ns, dtype=dt))
    if op == "dropout":
        return F.dropout(x, a.get("p", 0.5))
    if op in ("sum", "mean", "max"):
        dim = a.get("dim")
        dims = () if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
        keep = a.get("keepdim", False)
        if op == "max":
            return torch.amax(x, dim=dims, keepdim=keep)
        return getattr(torch, op)(x, dim=dims or None, keepdim=keep)
    if op == "reshape":
        return x.reshape(a["shape"])
    if op == "permute":
        return x.permute(a["dims"])
    if op == "concat":
        return torch.cat(xs, a.get("dim", 0))
    if op == "scale":
        return x * a["value"]
    raise AssertionError(op)


# (input shapes, op, attrs, dtype); each is run through the IR and through torch.
CONCRETE: list[tuple[list[list[int]], str, dict[str, Any], str]] = [
    ([[4, 64]], "linear", {"out_features": 8}, "float32"),
    ([[2, 3, 64]], "linear", {"out_features": 8, "bias": False}, "float32"),
    ([[64]], "linear", {"out_features": 8}, "float32"),
    ([[2, 5, 6], [2, 6, 7]], "matmul", {}, "float32"),
    ([[6], [6]], "matmul", {}, "float32"),
    ([[3, 6], [6]], "matmul", {}, "float32"),
    ([[6], [2, 6, 7]], "matmul", {}, "float32"),
    ([[2, 1, 4, 6], [3, 6, 5]], "matmul", {}, "float32"),
    ([[2, 4, 6], [3, 6, 5]], "matmul", {}, "float32"),
    ([[4, 6], [5, 7]], "matmul", {}, "float32"),
    ([[2, 3, 16, 16]], "conv2d", {"out_channels": 8, "kernel_size": 3}, "float32"),
    ([[2, 3, 16, 16]], "conv2d", {"out_channels": 8, "kernel_size": 3, "stride": 2,
                                   "padding": 1}, "float32"),
    ([[2, 4, 17, 9]], "conv2d", {"out_channels": 8, "kernel_size": [3, 2], "stride": [2, 1],
                                  "padding": [1, 0], "dilation": [2, 1], "groups": 2},
     "float32"),
    ([[2, 4, 10, 10]], "conv2d", {"out_channels": 4, "kernel_size": 4, "padding": "same"},
     "float32"),
    ([[2, 4, 10, 10]], "conv2d", {"out_channels": 4, "kernel_size": 3, "padding": "valid",
                                   "dilation": 3}, "float32"),
    ([[2, 4, 10, 10]], "conv2d", {"out_channels": 4, "kernel_size": 3, "groups": 4},
     "float32"),
    ([[2, 4, 10, 10]], "conv2d", {"out_channels": 6, "kernel_size": 3, "groups": 3},
     "float32"),
    ([[2, 4, 2, 2]], "conv2d", {"out_channels": 4, "kernel_size": 3}, "float32"),
    ([[4, 10, 10]], "conv2d", {"out_channels": 4, "kernel_size": 3}, "float32"),
    ([[4, 1], [1, 5]], "add", {}, "float32"),
    ([[3, 4, 5], [5]], "sub", {}, "float32"),
    ([[3, 4], [5, 4]], "mul", {}, "float32"),
    ([[2, 3], [2, 3]], "div", {}, "float32"),
    ([[2, 3], [2, 3]], "add", {}, "int64"),
    ([[2, 3]], "relu", {}, "int64"),
    ([[2, 3]], "gelu", {"approximate": "tanh"}, "bfloat16"),
    ([[2, 3]], "silu", {}, "float16"),
    ([[2, 3]], "sigmoid", {}, "float32"),
    ([[2, 3]], "tanh", {}, "float32"),
    ([[2, 3]], "identity", {}, "bool"),
    ([[2, 3, 4]], "softmax", {"dim": 1}, "float32"),
    ([[2, 3, 4]], "softmax", {}, "float32"),
    ([[2, 3, 4]], "softmax", {"dim": 3}, "float32"),
    ([[2, 3, 4]], "layer_norm", {"normalized_shape": [3, 4]}, "float32"),
    ([[2, 3, 4]], "layer_norm", {"normalized_shape": 4}, "float32"),
    ([[2, 3, 4]], "layer_norm", {"normalized_shape": 3}, "float32"),
    ([[2, 3, 4]], "rms_norm", {"normalized_shape": [4]}, "float32"),
    ([[2, 3, 4]], "dropout", {"p": 0.1}, "float32"),
    ([[2, 3, 4]], "sum", {}, "float32"),
    ([[2, 3, 4]], "sum", {"dim": 1}, "int64"),
    ([[2, 3, 4]], "mean", {"dim": [0, -1], "keepdim": True}, "float32"),
    ([[2, 3, 4]], "max", {"dim": [1]}, "float32"),
    ([[2, 3, 4]], "max", {"keepdim": True}, "float32"),
    ([[2, 3, 4]], "sum", {"dim": 5}, "float32"),
    ([[2, 3, 4]], "reshape", {"shape": [6, -1]}, "float32"),
    ([[2, 3, 4]], "reshape", {"shape": [-1]}, "float32"),
    ([[2, 3, 4]], "reshape", {"shape": [5, -1]}, "float32"),
    ([[2, 3, 4]], "reshape", {"shape": [4, 3, 2]}, "float32"),
    ([[2, 3, 4]], "reshape", {"shape": [4, 3, 3]}, "float32"),
    ([[2, 3, 4]], "permute", {"dims": [2, 0, 1]}, "float32"),
    ([[2, 3, 4]], "permute", {"dims": [-1, 0, 1]}, "float32"),
    ([[2, 3, 4]], "permute", {"dims": [0, 1]}, "float32"),
    ([[2, 3], [2, 5]], "concat", {"dim": 1}, "float32"),
    ([[2, 3], [4, 3], [1, 3]], "concat", {}, "float32"),
    ([[2, 3], [4, 4]], "concat", {}, "float32"),
    ([[2, 3]], "scale", {"value": 0.5}, "float32"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize(("shapes", "op", "attrs", "dtype"), CONCRETE,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CONCRETE)])
def test_shape_and_dtype_rules_match_torch(shapes: list[list[int]], op: str,
                                           attrs: dict[str, Any], dtype: str) -> None:
    ours = infer(shapes, op, attrs, dtype)
    try:
        ref = run_torch(shapes, op, attrs, dtype)
    except (RuntimeError, IndexError, ValueError, TypeError, NotImplementedError) as exc:
        assert isinstance(ours, str), f"torch rejects ({exc}) but the IR accepts: {ours}"
        return
    assert not isinstance(ours, str), f"torch accepts {tuple(ref.shape)} but: {ours}"
    shape, out_dtype = ours
    assert shape == tuple(ref.shape)
    if ref.dtype == TORCH_DTYPE[dtype]:
        assert out_dtype == dtype
    else:  # torch would promote (e.g. int64 division); the IR must have refused
        pytest.fail(f"torch promotes {dtype} to {ref.dtype}; the IR should reject")


def test_ir_is_stricter_than_torch_about_promotion() -> None:
    assert "needs float inputs, got int64" in infer([[2], [2]], "div", dtype="int64")
    assert "needs float inputs, got int64" in infer([[2]], "mean", dtype="int64")
    assert "needs numeric inputs, got bool" in infer([[2], [2]], "add", dtype="bool")
    # torch runs int64 linear on CPU; parameterised ops here are float-only
    assert "needs float inputs, got int64" in infer([[2, 4]], "linear", {"out_features": 3},
                                                    dtype="int64")


SYMBOLIC: list[tuple[list[list[Any]], str, dict[str, Any], tuple[Any, ...] | str]] = [
    ([["B", 64]], "linear", {"out_features": 256}, ("B", 256)),
    ([["B", "D"]], "linear", {"out_features": 2}, "must be a concrete int, got symbol 'D'"),
    ([["B", "T", 64], ["B", 64, "T"]], "matmul", {}, ("B", "T", "T")),
    ([["B", 64], [64, "T"]], "matmul", {}, ("B", "T")),
    ([["B", 64], ["T", 64, 3]], "matmul", {}, ("T", "B", 3)),
    ([["B", 4, 64], ["T", 64, 3]], "matmul", {}, "batch dims"),
    ([["B", 64], [1, 64]], "add", {}, ("B", 64)),
    ([["B", 1], [1, "T"]], "mul", {}, ("B", "T")),
    ([["B", 64], ["T", 64]], "add", {}, "dim -2 is 'B' vs 'T'"),
    ([["B", 64], [4, 64]], "add", {}, "dim -2 is 'B' vs 4"),
    ([["B", 3, 32, 32]], "conv2d", {"out_channels": 8, "kernel_size": 3, "stride": 2,
                                     "padding": 1}, ("B", 8, 16, 16)),
    ([["B", 3, "H", "W"]], "conv2d", {"out_channels": 8, "kernel_size": 3, "padding": 1},
     ("B", 8, "H", "W")),
    ([["B", 3, "H", "W"]], "conv2d", {"out_channels": 8, "kernel_size": 5, "padding": "same"},
     ("B", 8, "H", "W")),
    ([["B", 3, "H", 8]], "conv2d", {"out_channels": 8, "kernel_size": 3},
     "height is the symbol 'H'"),
    ([["B", "C", 8, 8]], "conv2d", {"out_channels": 8, "kernel_size": 3},
     "channel dim must be a concrete int"),
    ([["B", 4, 8, 8]], "conv2d", {"out_channels": 8, "kernel_size": 3, "stride": 2,
                                   "padding": "same"}, "needs stride 1"),
    ([["B", 16, 4]], "reshape", {"shape": ["B", -1]}, ("B", 64)),
    ([["B", 16, 4]], "reshape", {"shape": ["B", 16, 2, -1]}, ("B", 16, 2, 2)),
    ([["B", "T", 64]], "reshape", {"shape": [-1, "T", 8, 8]}, ("B", "T", 8, 8)),
    ([["B", 16, 4]], "reshape", {"shape": [-1, 8]}, "-1 would be 8*B"),
    ([["B", 16, 4]], "reshape", {"shape": ["T", -1]}, "names symbol 'T'"),
    ([["B", 16, 4]], "reshape", {"shape": ["B", 16, 5]}, "element counts differ"),
    ([["B", 16, 4]], "reshape", {"shape": [0, -1]}, "is not an int >= 1"),
    ([["B", 16, 4]], "permute", {"dims": [0, 2, 1]}, ("B", 4, 16)),
    ([["B", 16], ["B", 8]], "concat", {"dim": -1}, ("B", 24)),
    ([["B", 16], ["B", 8]], "concat", {}, "concat dim 0 is the symbol 'B'"),
    ([["B", 16], ["T", 16]], "concat", {"dim": 1}, "differ outside concat dim"),
    ([["B", "T", 64]], "layer_norm", {"normalized_shape": 64}, ("B", "T", 64)),
    ([["B", "T", 64]], "rms_norm", {"normalized_shape": [64], "eps": 1e-6}, ("B", "T", 64)),
    ([["B", "T", 64]], "mean", {"dim": 1}, ("B", 64)),
    ([["B", "T", 64]], "max", {"dim": [0, 1], "keepdim": True}, (1, 1, 64)),
    ([["B", "T", 64]], "sum", {"dim": [1, -2]}, "names the same axis twice"),
    ([["B", 8]], "softmax", {"dim": -3}, "dim -3 is out of range"),
    ([["B", 8]], "dropout", {"p": 1.0}, "must be < 1.0"),
    ([["B", 8]], "dropout", {"p": -0.1}, "must be >= 0.0"),
    ([["B", 8]], "scale", {"value": 1e400}, "finite"),
    ([["B", 8]], "gelu", {"approximate": "erf"}, "expected one of 'none', 'tanh'"),
    ([["B", 8]], "sum", {"dim": []}, "non-empty"),
    ([["B", 8]], "layer_norm", {"normalized_shape": [8], "eps": 0}, "must be > 0.0"),
    ([["B", 4, 8, 8]], "conv2d", {"out_channels": 6, "kernel_size": 3, "groups": 4},
     "not divisible by groups 4"),
    ([["B", 4, 8, 8]], "conv2d", {"out_channels": 8, "kernel_size": [3, 3, 3]},
     "expected an int or a pair"),
    ([["B", 4, 8, 8]], "conv2d", {"out_channels": 8, "kernel_size": 3, "padding": "full"},
     "'same' or 'valid'"),
]


@pytest.mark.parametrize(("shapes", "op", "attrs", "expected"), SYMBOLIC,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(SYMBOLIC)])
def test_symbolic_shapes(shapes: list[list[Any]], op: str, attrs: dict[str, Any],
                         expected: tuple[Any, ...] | str) -> None:
    ours = infer(shapes, op, attrs)
    if isinstance(expected, str):
        assert isinstance(ours, str), ours
        assert expected in ours and "node 'o' (" + op + ")" in ours
    else:
        assert ours == (expected, "float32")


def test_param_shapes_of_every_parameterised_op() -> None:
    x = [{"name": "x", "shape": ["B", 4, 8, 8], "dtype": "float32"}]
    nodes = [
        {"id": "c", "op": "conv2d", "inputs": ["x"],
         "attrs": {"out_channels": 6, "kernel_size": [3, 1], "groups": 2}},
        {"id": "ln", "op": "layer_norm", "inputs": ["c"], "attrs": {"normalized_shape": [6, 8]}},
        {"id": "ln2", "op": "layer_norm", "inputs": ["ln"],
         "attrs": {"normalized_shape": 8, "bias": False}},
        {"id": "ln3", "op": "layer_norm", "inputs": ["ln2"],
         "attrs": {"normalized_shape": 8, "elementwise_affine": False}},
        {"id": "rn", "op": "rms_norm", "inputs": ["ln3"], "attrs": {"normalized_shape": 8}},
        {"id": "l", "op": "linear", "inputs": ["rn"], "attrs": {"out_features": 3, "bias": False}},
    ]
    b = BlueprintIR.from_dict({"schema_version": 1, "name": "p", "inputs": x, "nodes": nodes,
                               "outputs": ["l"]})
    assert b.param_shapes() == {
        "c": {"weight": (6, 2, 3, 1), "bias": (6,)},
        "ln": {"weight": (6, 8), "bias": (6, 8)},
        "ln2": {"weight": (8,)},
        "rn": {"weight": (8,)},
        "l": {"weight": (3, 8)},
    }
    assert {op.value for op in PARAMETERISED} == {"linear", "conv2d", "layer_norm", "rms_norm"}
    for op in PARAMETERISED:
        assert "init" in OPS[op].attrs


def test_table_covers_every_op() -> None:
    assert set(OPS) == set(IRNodeType)
    commutative = {op.value for op, spec in OPS.items() if spec.commutative}
    assert commutative == {"add", "mul"}


def test_reference_doc_lists_every_op_and_attr_default() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "IR.md").read_text()
    sections = re.split(r"^### ", doc, flags=re.M)[1:]
    for op, spec in OPS.items():
        section = next((s for s in sections if f"`{op.value}`" in s.splitlines()[0]), None)
        assert section is not None, f"docs/IR.md has no section for {op.value}"
        for attr in spec.attrs.values():
            assert f"`{attr.name}`" in section, f"{op.value}.{attr.name} undocumented"
            if attr.default is REQUIRED:
                assert "required" in section
            else:
                d = attr.default
                if d is None or isinstance(d, bool):
                    text = {None: "null", True: "true", False: "false"}[d]
                else:
                    text = f'"{d}"' if isinstance(d, str) else str(d)
                text = re.sub(r"e-0(\d)", r"e-\1", text)  # 1e-05 is written 1e-5
                assert f"`{text}`" in section, f"{op.value}.{attr.name} default {d!r} not in docs"
