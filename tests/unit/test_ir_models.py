"""BlueprintIR models: construction, validation errors, serialisation, graph queries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.errors import EsperError, IRValidationError
from esper.ir import (
    BlueprintIR,
    DType,
    FrozenDict,
    IRInput,
    IRNode,
    IRNodeType,
    TensorSchema,
)

X = {"name": "x", "shape": ["B", 64], "dtype": "float32"}
RESIDUAL = {
    "schema_version": 1,
    "name": "residual_mlp",
    "inputs": [X],
    "nodes": [
        {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 256}},
        {"id": "a", "op": "gelu", "inputs": ["h"]},
        {"id": "y", "op": "linear", "inputs": ["a"],
         "attrs": {"out_features": 64, "init": "zeros"}},
        {"id": "out", "op": "add", "inputs": ["x", "y"]},
    ],
    "outputs": ["out"],
    "metadata": {"description": "d", "author": "me", "tags": ["mlp"]},
}


def blueprint(nodes: list[dict], outputs: list[str], inputs: list[dict] | None = None
              ) -> dict:
    return {"schema_version": 1, "name": "t", "inputs": inputs or [X], "nodes": nodes,
            "outputs": outputs}


def test_enums_and_values() -> None:
    assert [d.value for d in DType] == ["float32", "float16", "bfloat16", "int64", "bool"]
    assert DType("float16") is DType.float16 and isinstance(DType.float32, str)
    assert IRNodeType.LAYER_NORM.value == "layer_norm" and IRNodeType("rms_norm")
    assert len(IRNodeType) == 24


def test_residual_mlp_parses_and_infers_symbolic_shapes() -> None:
    b = BlueprintIR.from_json(json.dumps(RESIDUAL))
    shapes = b.infer_shapes()
    assert list(shapes) == ["x", "h", "a", "y", "out"]
    assert shapes["h"] == TensorSchema(shape=("B", 256), dtype=DType.float32)
    assert str(shapes["out"]) == "float32[B, 64]"
    assert b.output_schemas() == (TensorSchema(shape=("B", 64), dtype=DType.float32),)
    assert b.param_shapes() == {
        "h": {"weight": (256, 64), "bias": (256,)},
        "y": {"weight": (64, 256), "bias": (64,)},
    }
    assert b.node("y").resolved_attrs == {"out_features": 64, "bias": True, "init": "zeros"}
    assert b.node("a").attrs == {} and b.node("a").resolved_attrs == {"approximate": "none"}
    assert b.inputs[0].schema == shapes["x"]


def test_cached_queries_answer_the_same_twice() -> None:
    b = BlueprintIR.from_dict(RESIDUAL)
    for _ in range(2):
        assert b.infer_shapes()["a"].shape == ("B", 256)
        assert b.output_schemas()[0].shape == ("B", 64)
        assert b.input_schemas()[0].shape == ("B", 64)
        assert len(b.canonical_hash()) == 64 and b.canonical_json().startswith("{")
        assert b.param_shapes()["h"]["weight"] == (256, 64)
    shapes = b.infer_shapes()
    shapes["x"] = shapes["h"]  # the caller's copy; the model is unaffected
    assert b.infer_shapes()["x"].shape == ("B", 64)
    assert b == BlueprintIR.from_dict(RESIDUAL)  # caches never affect equality


def test_gc_is_restored_after_parsing() -> None:
    import gc

    assert gc.isenabled()
    BlueprintIR.from_dict(RESIDUAL)
    with pytest.raises(IRValidationError):
        BlueprintIR.from_json("{")
    assert gc.isenabled()


def test_models_are_frozen_and_attrs_immutable() -> None:
    b = BlueprintIR.from_dict(RESIDUAL)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        b.name = "x"  # type: ignore[misc]
    node = b.node("h")
    assert isinstance(node.attrs, FrozenDict)
    with pytest.raises(TypeError):
        node.attrs["out_features"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        node.resolved_attrs["bias"] = False  # type: ignore[index]
    conv = IRNode(id="c", op="conv2d", inputs=("x",),
                  attrs={"out_channels": 4, "kernel_size": [3, 3]})
    assert conv.attrs["kernel_size"] == (3, 3)
    assert hash(conv) == hash(IRNode.model_validate(conv.model_dump()))
    assert hash(b) == hash(BlueprintIR.from_dict(RESIDUAL))


def test_resolved_attrs_normalise() -> None:
    conv = IRNode(id="c", op="conv2d", inputs=("x",),
                  attrs={"out_channels": 4, "kernel_size": 3, "padding": "valid"})
    assert conv.resolved_attrs == {
        "out_channels": 4, "kernel_size": (3, 3), "stride": (1, 1), "padding": (0, 0),
        "dilation": (1, 1), "groups": 1, "bias": True, "init": "default",
    }
    ln = IRNode(id="n", op="layer_norm", inputs=("x",), attrs={"normalized_shape": 64, "eps": 1})
    assert ln.resolved_attrs["normalized_shape"] == (64,) and ln.resolved_attrs["eps"] == 1.0
    s = IRNode(id="s", op="sum", inputs=("x",), attrs={"dim": 1})
    assert s.resolved_attrs == {"dim": (1,), "keepdim": False}
    assert IRNode(id="r", op="rms_norm", inputs=("x",),
                  attrs={"normalized_shape": [4]}).resolved_attrs["eps"] is None


def test_to_json_is_deterministic_and_round_trips() -> None:
    b = BlueprintIR.from_dict(RESIDUAL)
    shuffled = dict(RESIDUAL, metadata={"tags": ["mlp"], "author": "me", "description": "d"})
    assert BlueprintIR.from_dict(shuffled).to_json() == b.to_json()
    again = BlueprintIR.from_json(b.to_json())
    assert again == b and again.to_json() == b.to_json()
    assert BlueprintIR.from_json(b.to_json(indent=2)) == b
    assert BlueprintIR.from_dict(b.to_dict()) == b
    assert b.to_dict()["nodes"][1] == {"id": "a", "op": "gelu", "inputs": ["h"]}
    assert BlueprintIR.from_json(b.to_json().encode()) == b


def test_model_copy_revalidates() -> None:
    b = BlueprintIR.from_dict(RESIDUAL)
    assert b.model_copy() is b
    assert b.model_copy(update={"name": "n"}).name == "n"
    with pytest.raises(IRValidationError, match="output 'nope' names nothing"):
        b.model_copy(update={"outputs": ("nope",)})
    node = b.node("h")
    with pytest.raises(IRValidationError, match="out_features"):
        node.model_copy(update={"attrs": {"out_features": -1}})


def test_direct_construction_validates_too() -> None:
    nodes = (IRNode(id="r", op=IRNodeType.RELU, inputs=("x",)),)
    ok = BlueprintIR(schema_version=1, name="n", inputs=(IRInput(**X),), nodes=nodes,
                     outputs=("r",))
    assert ok.output_schemas()[0].shape == ("B", 64)
    with pytest.raises(IRValidationError, match="is never used"):
        BlueprintIR(schema_version=1, name="n", inputs=(IRInput(**X),), nodes=nodes,
                    outputs=("x",))
    with pytest.raises(IRValidationError, match="0 is not >= 1"):
        TensorSchema(shape=(0,), dtype=DType.float32)
    with pytest.raises(IRValidationError, match="unknown op 'nope'"):
        IRNode(id="q", op="nope", inputs=("x",))  # type: ignore[arg-type]


def test_node_lookup() -> None:
    b = BlueprintIR.from_dict(RESIDUAL)
    assert b.node("h").op is IRNodeType.LINEAR
    with pytest.raises(KeyError):
        b.node("x")  # an input, not a node
    with pytest.raises(KeyError):
        b.node("missing")
    assert b.schema_of("x").shape == ("B", 64)


def test_topological_order_is_kahn_and_deterministic() -> None:
    nodes = [
        {"id": "d", "op": "add", "inputs": ["b", "c"]},
        {"id": "c", "op": "tanh", "inputs": ["a"]},
        {"id": "b", "op": "relu", "inputs": ["a"]},
        {"id": "a", "op": "relu", "inputs": ["x"]},
    ]
    b = BlueprintIR.from_dict(blueprint(nodes, ["d"]))
    assert [n.id for n in b.topological_order()] == ["a", "c", "b", "d"]
    assert [n.id for n in b.topological_order()] == ["a", "c", "b", "d"]


def test_long_chain_has_no_recursion_limit() -> None:
    n = 100_000
    nodes = [{"id": f"n{i}", "op": "relu", "inputs": [f"n{i - 1}" if i else "x"]}
             for i in range(n)]
    nodes.reverse()
    b = BlueprintIR.from_dict(blueprint(nodes, [f"n{n - 1}"]))
    order = b.topological_order()
    assert order[0].id == "n0" and order[-1].id == f"n{n - 1}"
    assert len(b.canonical_hash()) == 64


def test_importing_esper_ir_does_not_import_torch() -> None:
    code = "import sys, esper.ir; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- validation errors --------------------------------------------------------------

def lin(i: str, src: str, **attrs: object) -> dict:
    return {"id": i, "op": "linear", "inputs": [src], "attrs": {"out_features": 8, **attrs}}


XY = [X, {"name": "y", "shape": ["B", 64], "dtype": "float16"}]

BAD: list[tuple[str, object, str]] = [
    ("malformed json", '{"schema_version": 1,', r"malformed JSON at line 1 column"),
    ("nan", '{"a": NaN}', "NaN is not valid JSON"),
    ("duplicate key", '{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("not utf-8", b'{"a": "\xff"}', "not UTF-8"),
    ("not an object", "[1, 2]", "must be a JSON object, got list"),
    ("schema version", dict(RESIDUAL, schema_version=2), "unsupported schema_version 2"),
    ("unknown top field", dict(RESIDUAL, extra=1), "unknown field 'extra'"),
    ("missing top field", {k: v for k, v in RESIDUAL.items() if k != "outputs"},
     "missing field 'outputs'"),
    ("unknown op", blueprint([{"id": "f", "op": "swish", "inputs": ["x"]}], ["f"]),
     r"node 'f' \(swish\): unknown op 'swish'"),
    ("unknown node field", blueprint([{"id": "f", "op": "relu", "inputs": ["x"], "z": 1}],
                                     ["f"]), r"node 'f' \(relu\): unknown field 'z'"),
    ("missing node field", blueprint([{"id": "f", "op": "relu"}], ["f"]),
     r"node 'f' \(relu\): missing field 'inputs'"),
    ("unknown attr", blueprint([lin("f", "x", widht=3)], ["f"]),
     r"node 'f' \(linear\): unknown attr 'widht'"),
    ("missing attr", blueprint([{"id": "f", "op": "linear", "inputs": ["x"]}], ["f"]),
     r"node 'f' \(linear\): missing required attr 'out_features'"),
    ("bad attr type", blueprint([lin("f", "x", bias="yes")], ["f"]),
     r"node 'f' \(linear\): attr 'bias': expected true or false"),
    ("bad attr value", blueprint([lin("f", "x", init="xavier")], ["f"]),
     r"node 'f' \(linear\): attr 'init'"),
    ("bool as int", blueprint([lin("f", "x", out_features=True)], ["f"]),
     "expected an integer, got True"),
    ("attrs not object", blueprint([{"id": "f", "op": "relu", "inputs": ["x"], "attrs": []}],
                                   ["f"]), r"node 'f' \(relu\).*attrs must be a JSON object"),
    ("arity", blueprint([{"id": "f", "op": "add", "inputs": ["x"]}], ["f"]),
     r"node 'f' \(add\): takes 2 input\(s\), got 1"),
    ("duplicate id", blueprint([lin("f", "x"), lin("f", "x")], ["f"]),
     r"node 'f' \(linear\): duplicate id"),
    ("id shadows input", blueprint([lin("x", "x")], ["x"]),
     r"node 'x' \(linear\): duplicate id \(also used by an input\)"),
    ("duplicate input", blueprint([lin("f", "x")], ["f"], [X, X]), "input 'x': duplicate"),
    ("undefined ref", blueprint([lin("f", "xx")], ["f"]),
     r"node 'f' \(linear\): input 'xx' is not defined.*did you mean 'x'"),
    ("cycle", blueprint([
        {"id": "a", "op": "relu", "inputs": ["c"]},
        {"id": "b", "op": "relu", "inputs": ["a"]},
        {"id": "c", "op": "add", "inputs": ["b", "x"]},
    ], ["c"]), r"cycle: 'a' \(relu\) -> 'b' \(relu\) -> 'c' \(add\) -> 'a'$"),
    ("self loop", blueprint([{"id": "a", "op": "relu", "inputs": ["a"]}], ["a"]),
     r"cycle: 'a' \(relu\) -> 'a'"),
    ("output names nothing", blueprint([lin("f", "x")], ["g"]),
     "output 'g' names nothing"),
    ("no outputs", blueprint([lin("f", "x")], []), "at least one output"),
    ("repeated output", blueprint([lin("f", "x")], ["f", "f"]), "listed twice"),
    ("unused input", blueprint([lin("f", "x")], ["f"], XY), "input 'y' is never used"),
    ("unused node", blueprint([lin("f", "x"), lin("g", "x")], ["f"]),
     r"node 'g' \(linear\): is never used"),
    ("dtype mix", blueprint([{"id": "s", "op": "add", "inputs": ["x", "y"]}], ["s"], XY),
     r"node 's' \(add\): inputs mix dtypes \('x' is float32, 'y' is float16\)"),
    ("dtype class", blueprint([lin("f", "x")], ["f"],
                              [{"name": "x", "shape": [2, 8], "dtype": "int64"}]),
     r"node 'f' \(linear\): needs float inputs, got int64"),
    ("shape mismatch", blueprint([{"id": "s", "op": "add", "inputs": ["x", "y"]}], ["s"],
                                 [X, {"name": "y", "shape": ["T", 64], "dtype": "float32"}]),
     r"node 's' \(add\): cannot broadcast \[B, 64\] with \[T, 64\]"),
    ("bad dim", blueprint([lin("f", "x")], ["f"],
                          [{"name": "x", "shape": ["B", -3], "dtype": "float32"}]),
     r"input 'x': .*-3 is not >= 1"),
    ("bad symbol", blueprint([lin("f", "x")], ["f"],
                             [{"name": "x", "shape": ["2B", 8], "dtype": "float32"}]),
     "is not a symbol"),
    ("bad dtype", blueprint([lin("f", "x")], ["f"],
                            [{"name": "x", "shape": [8], "dtype": "float64"}]),
     "input 'x': dtype"),
    ("metadata not json", dict(RESIDUAL, metadata={"x": {1, 2}}), "metadata"),
]


@pytest.mark.parametrize(("text", "pattern"), [(t, p) for _, t, p in BAD],
                         ids=[name for name, _, _ in BAD])
def test_invalid_blueprints_raise_ir_validation_error(text: object, pattern: str) -> None:
    with pytest.raises(IRValidationError, match=pattern) as info:
        if isinstance(text, (str, bytes)):
            BlueprintIR.from_json(text)
        else:
            BlueprintIR.from_dict(text)
    assert isinstance(info.value, EsperError) and isinstance(info.value, ValueError)


def test_errors_carry_node_id_and_op() -> None:
    with pytest.raises(IRValidationError) as info:
        BlueprintIR.from_dict(blueprint([lin("f", "x", out_features=0)], ["f"]))
    assert (info.value.node_id, info.value.op) == ("f", "linear")  # type: ignore[attr-defined]


# --- fuzzing: whatever the document, only IRValidationError comes out ---------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False)
    | st.text(max_size=6) | st.sampled_from(["x", "h", "a", "B", "linear", "same", "zeros"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=8,
)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzzed_documents_raise_only_ir_validation_error(data: st.DataObject) -> None:
    doc = json.loads(json.dumps(RESIDUAL))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values)
    try:
        BlueprintIR.from_dict(doc)
    except IRValidationError:
        pass
    text = json.dumps(doc)
    cut = data.draw(st.integers(0, len(text)))
    try:
        BlueprintIR.from_json(text[:cut])
    except IRValidationError:
        pass
