"""Every pass, and ``optimize``, preserves semantics on random small graphs
(hypothesis), with duplicates, dead nodes and scale/identity chains planted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.compile.evaluate import evaluate
from esper.compile.params import init_parameters
from esper.compile.passes import PASSES, optimize
from esper.compile.passes.rewrite import NEVER_MERGE
from esper.ir import BlueprintIR

UNARY = ["relu", "tanh", "sigmoid", "silu", "gelu", "identity", "scale", "dropout",
         "linear", "layer_norm", "rms_norm", "softmax"]
BINARY = ["add", "mul", "sub"]
SCALES = [0.5, 2.0, 1.0, -1.0, 0.25, 4.0]


def _attrs(op: str, draw: Callable[[Any], Any]) -> dict[str, Any]:
    if op == "scale":
        return {"value": draw(st.sampled_from(SCALES))}
    if op == "linear":
        return {"out_features": 4, "init": draw(st.sampled_from(["default", "normal"]))}
    if op in ("layer_norm", "rms_norm"):
        return {"normalized_shape": [4]}
    if op == "dropout":
        return {"p": 0.25}
    return {}


@st.composite
def graphs(draw: Callable[[Any], Any]) -> BlueprintIR:
    n_inputs = draw(st.integers(1, 2))
    names = [f"x{i}" for i in range(n_inputs)]
    nodes: list[dict[str, Any]] = []
    ids = draw(st.permutations([f"v{k}" for k in range(24)]))  # ids in random order
    for k in range(draw(st.integers(1, 12))):
        if nodes and draw(st.integers(0, 4)) == 0:  # plant a duplicate for CSE
            copy = dict(draw(st.sampled_from(nodes)))
            inputs = list(copy["inputs"])
            if copy["op"] in BINARY and draw(st.booleans()):
                inputs.reverse()
            nodes.append({**copy, "id": ids[k], "inputs": inputs})
        else:
            op = draw(st.sampled_from(UNARY + BINARY))
            arity = 2 if op in BINARY else 1
            inputs = [draw(st.sampled_from(names)) for _ in range(arity)]
            nodes.append({"id": ids[k], "op": op, "inputs": inputs, "attrs": _attrs(op, draw)})
        names.append(ids[k])
    # A valid IR uses every input and node: sinks and unread inputs are outputs,
    # plus a few inner nodes.
    read = {i for nd in nodes for i in nd["inputs"]}
    sinks = [name for name in names if name not in read]
    extra = draw(st.lists(st.sampled_from(names[n_inputs:]), max_size=2, unique=True))
    outputs = draw(st.permutations(list(dict.fromkeys(sinks + extra))))
    order = draw(st.permutations(nodes))  # file order is free
    return BlueprintIR.from_dict({
        "schema_version": 1, "name": "random",
        "inputs": [{"name": f"x{i}", "shape": ["B", 4], "dtype": "float32"}
                   for i in range(n_inputs)],
        "nodes": list(order), "outputs": outputs,
    })


def check_same(a: BlueprintIR, b: BlueprintIR) -> None:
    params = init_parameters(a, {}, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in a.inputs]
    got, want = evaluate(b, xs, params), evaluate(a, xs, params)
    assert len(got) == len(want)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    assert a.output_schemas() == b.output_schemas()
    # Parameterised and dropout nodes that survive keep their ids and shapes.
    shapes = a.param_shapes()
    for node_id, named in b.param_shapes().items():
        assert shapes[node_id] == named


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(graphs())
def test_each_pass_preserves_semantics(ir: BlueprintIR) -> None:
    for run in PASSES:
        check_same(ir, run(ir))


@FAST
@given(graphs())
def test_optimize_preserves_semantics_and_is_a_fixed_point(ir: BlueprintIR) -> None:
    out = optimize(ir)
    check_same(ir, out)
    assert optimize(out).to_dict() == out.to_dict()
    assert len(out.nodes) <= len(ir.nodes)


def _needed(ir: BlueprintIR) -> set[str]:
    """Nodes the outputs depend on."""
    inputs = {i.name for i in ir.inputs}
    seen: set[str] = set()
    stack = list(ir.outputs)
    while stack:
        name = stack.pop()
        if name in seen or name in inputs:
            continue
        seen.add(name)
        stack.extend(ir.node(name).inputs)
    return seen


@FAST
@given(graphs())
def test_cse_never_merges_parameterised_or_dropout_nodes(ir: BlueprintIR) -> None:
    out = optimize(ir)
    needed = {nd for nd in _needed(ir) if ir.node(nd).op in NEVER_MERGE}
    kept = {nd.id for nd in out.nodes if nd.op in NEVER_MERGE}
    # Every parameterised or dropout node an output needs survives under its own id.
    assert kept == needed
