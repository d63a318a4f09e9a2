"""Random blueprints (hypothesis) through the Triton backend under the
interpreter: every fused kernel, forward and backward, vs the float64 evaluator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.ir import BlueprintIR
from tests.unit.test_triton_support import check_against_float64, compile_and_load, interpret

_ = interpret
UNARY = ["relu", "gelu", "silu", "sigmoid", "tanh", "scale", "softmax", "layer_norm",
         "rms_norm", "linear", "mean", "sum"]
BINARY = ["add", "mul", "sub"]


def _attrs(op: str, c: int, draw: Callable[[Any], Any]) -> dict[str, Any]:
    if op == "scale":
        return {"value": draw(st.sampled_from([0.5, -2.0, 3.0]))}
    if op == "gelu":
        return {"approximate": draw(st.sampled_from(["none", "tanh"]))}
    if op == "linear":
        return {"out_features": c, "bias": draw(st.booleans())}
    if op in ("layer_norm", "rms_norm"):
        return {"normalized_shape": [c]}
    if op == "softmax":
        return {"dim": -1}
    if op in ("mean", "sum"):
        return {"dim": [-1], "keepdim": True}
    return {}


@st.composite
def blueprints(draw: Callable[[Any], Any]) -> BlueprintIR:
    c = draw(st.sampled_from([4, 6, 8]))
    n_in = draw(st.integers(1, 2))
    full = [f"x{i}" for i in range(n_in)]  # values of shape [B, c]
    rows: list[str] = []  # values of shape [B, 1]
    nodes: list[dict[str, Any]] = []
    for k in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(UNARY + BINARY))
        nid = f"n{k}"
        if op in BINARY:
            a = draw(st.sampled_from(full))
            b = draw(st.sampled_from(full + rows))
            ins = [a, b] if draw(st.booleans()) else [b, a]
        else:
            ins = [draw(st.sampled_from(full))]
        nodes.append({"id": nid, "op": op, "inputs": ins, "attrs": _attrs(op, c, draw)})
        (rows if op in ("mean", "sum") else full).append(nid)
    read = {i for n in nodes for i in n["inputs"]}
    outputs = [n["id"] for n in nodes if n["id"] not in read]
    unused = [x for x in (f"x{i}" for i in range(n_in)) if x not in read]
    return BlueprintIR.from_dict({
        "schema_version": 1, "name": "random",
        "inputs": [{"name": f"x{i}", "shape": ["B", c], "dtype": "float32"}
                   for i in range(n_in)],
        "nodes": nodes, "outputs": outputs + unused,
    })


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ir=blueprints(), batch=st.integers(1, 9))
def test_random_blueprints_match_float64(ir: BlueprintIR, batch: int, dtype: str) -> None:
    factory, _ = compile_and_load(ir, dtype)
    check_against_float64(factory("cpu"), batch=batch)
