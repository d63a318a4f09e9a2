"""Each optimisation pass on hand-written graphs: what it removes, what it keeps."""

from __future__ import annotations

from typing import Any

import torch

from esper.compile.evaluate import evaluate
from esper.compile.params import init_parameters
from esper.compile.passes import optimize
from esper.compile.passes.canonical import canonicalize_operands
from esper.compile.passes.cse import eliminate_common_subexpressions
from esper.compile.passes.dce import eliminate_dead_nodes
from esper.compile.passes.fold import fold_scale_identity
from esper.compile.passes.rewrite import live_nodes
from esper.ir import BlueprintIR


def make_ir(nodes: list[dict[str, Any]], outputs: list[str], n_inputs: int = 1) -> BlueprintIR:
    return BlueprintIR.from_dict({
        "schema_version": 1,
        "name": "p",
        "inputs": [{"name": f"x{i}" if n_inputs > 1 else "x", "shape": ["B", 4],
                    "dtype": "float32"} for i in range(n_inputs)],
        "nodes": nodes,
        "outputs": outputs,
    })


def n(id_: str, op: str, *inputs: str, **attrs: Any) -> dict[str, Any]:
    return {"id": id_, "op": op, "inputs": list(inputs), "attrs": attrs}


def ops(ir: BlueprintIR) -> dict[str, str]:
    return {node.id: node.op.value for node in ir.nodes}


def same_function(a: BlueprintIR, b: BlueprintIR) -> None:
    params = init_parameters(a, {}, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in a.inputs]
    for u, v in zip(evaluate(a, xs, params), evaluate(b, xs, params), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    assert a.output_schemas() == b.output_schemas()


def test_dce_keeps_what_outputs_need_and_every_input() -> None:
    # A valid IR has no dead nodes (the IR rejects them): DCE leaves it alone ...
    ir = make_ir([n("a", "relu", "x0"), n("b", "tanh", "x1"), n("c", "add", "a", "b")],
                 ["c"], n_inputs=2)
    assert eliminate_dead_nodes(ir) is ir
    # ... and prunes what a rewrite orphans (here: the inner scale after folding).
    chain = make_ir([n("a", "scale", "x0", value=2.0), n("b", "scale", "a", value=3.0),
                     n("c", "add", "b", "x1")], ["c"], n_inputs=2)
    folded = fold_scale_identity(chain)
    assert ops(folded) == {"b": "scale", "c": "add"}
    assert [i.name for i in folded.inputs] == ["x0", "x1"]
    nodes = [{"id": "a", "inputs": ["x"]}, {"id": "dead", "inputs": ["a"]},
             {"id": "o", "inputs": ["a", "x"]}]
    assert [nd["id"] for nd in live_nodes(nodes, ["o"])] == ["a", "o"]


def test_cse_merges_equal_pure_nodes_including_swapped_commutative_operands() -> None:
    ir = make_ir([
        n("r1", "relu", "x"), n("r2", "relu", "x"),
        n("s1", "add", "r1", "x"), n("s2", "add", "x", "r2"),
        n("d1", "sub", "r1", "x"), n("d2", "sub", "x", "r1"),
        n("out", "mul", "s1", "s2"), n("o2", "add", "d1", "d2"),
    ], ["out", "o2"])
    out = eliminate_dead_nodes(eliminate_common_subexpressions(ir))
    assert ops(out) == {"r1": "relu", "s1": "add", "d1": "sub", "d2": "sub", "out": "mul",
                        "o2": "add"}
    assert out.node("out").inputs == ("s1", "s1")
    same_function(ir, out)


def test_cse_never_merges_parameterised_nodes_or_dropout() -> None:
    ir = make_ir([
        n("fc1", "linear", "x", out_features=4), n("fc2", "linear", "x", out_features=4),
        n("ln1", "layer_norm", "x", normalized_shape=[4]),
        n("ln2", "layer_norm", "x", normalized_shape=[4]),
        n("rn1", "rms_norm", "x", normalized_shape=[4]),
        n("rn2", "rms_norm", "x", normalized_shape=[4]),
        n("dr1", "dropout", "x", p=0.1), n("dr2", "dropout", "x", p=0.1),
        n("a", "add", "fc1", "fc2"), n("b", "add", "ln1", "ln2"), n("c", "add", "rn1", "rn2"),
        n("d", "add", "dr1", "dr2"),
    ], ["a", "b", "c", "d"])
    assert eliminate_common_subexpressions(ir) is ir
    assert set(ops(optimize(ir))) == set(ops(ir))


def test_fold_collapses_scale_chains_and_removes_identities() -> None:
    ir = make_ir([
        n("i1", "identity", "x"), n("s1", "scale", "i1", value=2.0),
        n("s2", "scale", "s1", value=-0.25), n("i2", "identity", "s2"),
        n("s3", "scale", "i2", value=3.0), n("r", "relu", "s3"),
        n("one", "scale", "r", value=1.0), n("out", "tanh", "one"),
    ], ["out"])
    out = optimize(ir)
    assert ops(out) == {"s3": "scale", "r": "relu", "out": "tanh"}
    assert out.node("s3").inputs == ("x",)
    assert out.node("s3").resolved_attrs["value"] == -1.5
    assert out.node("r").inputs == ("s3",) and out.node("out").inputs == ("r",)
    same_function(ir, out)


def test_fold_cancelling_scales_disappear() -> None:
    ir = make_ir([n("a", "scale", "x", value=4.0), n("b", "scale", "a", value=0.25),
                  n("out", "relu", "b")], ["out"])
    out = optimize(ir)
    assert ops(out) == {"out": "relu"} and out.node("out").inputs == ("x",)


def test_fold_keeps_output_nodes_that_would_duplicate_another_output() -> None:
    ir = make_ir([n("i", "identity", "x"), n("r", "relu", "x"), n("j", "identity", "r"),
                  n("s", "scale", "r", value=1.0)], ["i", "r", "j", "s"])
    out = optimize(ir)
    assert out.outputs == ("x", "r", "j", "s")  # an output may name a graph input
    same_function(ir, out)


def test_fold_keeps_inner_scale_when_it_has_other_users() -> None:
    ir = make_ir([n("a", "scale", "x", value=2.0), n("b", "scale", "a", value=3.0),
                  n("out", "add", "a", "b")], ["out"])
    out = fold_scale_identity(ir)
    assert out.node("b").inputs == ("x",) and out.node("b").resolved_attrs["value"] == 6.0
    assert "a" in ops(out)
    same_function(ir, out)


def test_canonical_order_does_not_depend_on_node_ids() -> None:
    def graph(first: str, second: str) -> BlueprintIR:
        return make_ir([n(first, "relu", "x"), n(second, "tanh", "x"),
                        n("out", "add", first, second), n("o2", "mul", second, first)],
                       ["out", "o2"])

    a = canonicalize_operands(graph("p", "q"))
    b = canonicalize_operands(graph("q", "p"))
    # Whatever the ids, the relu operand sits in the same position in both.
    pos_a = [a.node(a.node("out").inputs[k]).op.value for k in range(2)]
    pos_b = [b.node(b.node("out").inputs[k]).op.value for k in range(2)]
    assert pos_a == pos_b
    assert a.node("o2").inputs == a.node("out").inputs
    same_function(graph("p", "q"), a)


def test_parameterised_nodes_keep_their_ids_through_optimize() -> None:
    ir = make_ir([
        n("pre", "identity", "x"), n("fc", "linear", "pre", out_features=4),
        n("s", "scale", "fc", value=1.0), n("ln", "layer_norm", "s", normalized_shape=4),
        n("out", "add", "ln", "pre"),
    ], ["out"])
    out = optimize(ir)
    assert {"fc", "ln"} <= set(ops(out))
    assert out.param_shapes() == ir.param_shapes()
    same_function(ir, out)


def test_optimize_is_idempotent_on_optimised_graphs() -> None:
    ir = make_ir([n("r1", "relu", "x"), n("r2", "relu", "x"), n("a", "add", "r2", "r1"),
                  n("s", "scale", "a", value=2.0), n("t", "scale", "s", value=2.0)], ["t"])
    once = optimize(ir)
    assert optimize(once) is once
    same_function(ir, once)
