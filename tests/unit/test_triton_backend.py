"""The Triton backend end to end on CPU: compile (no binaries) -> load -> forward
and backward through the generated kernels (Triton interpreter) vs the float64
evaluator, for every bundled blueprint and hand-made ones, in fp32 and fp16."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from esper.ir import BlueprintIR, bundled
from esper.triton.plan import FusedStep, Plan
from tests.unit.test_triton_support import check_against_float64, compile_and_load, interpret

pytestmark = pytest.mark.usefixtures("interpret")
_ = interpret


def _ir(inputs: list[dict], nodes: list[dict], outputs: list[str]) -> str:
    return json.dumps({"schema_version": 1, "name": "t", "inputs": inputs,
                       "nodes": nodes, "outputs": outputs})


def hand(name: str) -> BlueprintIR:
    return BlueprintIR.from_json(HAND[name])  # a fresh IR object per use


def _x(name: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


HAND = {
    "mlp_ln_softmax": _ir([_x("x", ["B", 16])], [
        {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 24}},
        {"id": "a", "op": "gelu", "inputs": ["h"]},
        {"id": "n", "op": "layer_norm", "inputs": ["a"], "attrs": {"normalized_shape": [24]}},
        {"id": "s", "op": "softmax", "inputs": ["n"], "attrs": {"dim": -1}},
        {"id": "y", "op": "linear", "inputs": ["s"], "attrs": {"out_features": 16}},
        {"id": "out", "op": "add", "inputs": ["x", "y"]}], ["out"]),
    "gated_rms": _ir([_x("x", ["B", "T", 32])], [
        {"id": "r", "op": "rms_norm", "inputs": ["x"], "attrs": {"normalized_shape": [32]}},
        {"id": "a", "op": "linear", "inputs": ["r"], "attrs": {"out_features": 32}},
        {"id": "b", "op": "linear", "inputs": ["r"], "attrs": {"out_features": 32}},
        {"id": "g", "op": "silu", "inputs": ["b"]},
        {"id": "m", "op": "mul", "inputs": ["a", "g"]},
        {"id": "t", "op": "tanh", "inputs": ["m"]},
        {"id": "out", "op": "add", "inputs": ["x", "t"]}], ["out"]),
    "reductions": _ir([_x("x", ["B", 12]), _x("y", ["B", 12])], [
        {"id": "d", "op": "div", "inputs": ["x", "y"]},
        {"id": "s", "op": "sigmoid", "inputs": ["d"]},
        {"id": "mx", "op": "max", "inputs": ["s"], "attrs": {"dim": [-1], "keepdim": True}},
        {"id": "mn", "op": "mean", "inputs": ["x"], "attrs": {"dim": [-1], "keepdim": True}},
        {"id": "c", "op": "sub", "inputs": ["s", "mx"]},
        {"id": "e", "op": "mul", "inputs": ["c", "mn"]},
        {"id": "sm", "op": "sum", "inputs": ["e"], "attrs": {"dim": [-1], "keepdim": False}},
        {"id": "r", "op": "relu", "inputs": ["y"]},
        {"id": "k", "op": "scale", "inputs": ["r"], "attrs": {"value": 0.5}}],
        ["sm", "k", "e"]),
    "shared_grads": _ir([_x("x", ["B", 8]), _x("y", ["B", 8])], [
        {"id": "s", "op": "add", "inputs": ["x", "y"]},
        {"id": "r", "op": "relu", "inputs": ["s"]},
        {"id": "d", "op": "add", "inputs": ["r", "r"]}], ["d", "s"]),
    # regressions found by hypothesis: a path out of a group through a torch step
    # and back (must not merge), and a row grad reaching a norm's col parameters
    "through_torch": _ir([_x("x", ["B", 4])], [
        {"id": "r", "op": "relu", "inputs": ["x"]},
        {"id": "l", "op": "linear", "inputs": ["r"], "attrs": {"out_features": 4, "bias": False}},
        {"id": "a", "op": "add", "inputs": ["l", "r"]}], ["a"]),
    "norm_then_mean": _ir([_x("x", ["B", 6])], [
        {"id": "n", "op": "layer_norm", "inputs": ["x"], "attrs": {"normalized_shape": [6]}},
        {"id": "m", "op": "mean", "inputs": ["n"], "attrs": {"dim": [-1], "keepdim": True}}],
        ["m"]),
    "scalar_and_row_inputs": _ir(
        [_x("x", ["B", 8]), _x("s", [1]), _x("r", ["B", 1])], [
            {"id": "a", "op": "mul", "inputs": ["x", "s"]},
            {"id": "b", "op": "sub", "inputs": ["a", "r"]},
            {"id": "c", "op": "tanh", "inputs": ["b"]}], ["c"]),
    "attention": _ir([_x("q", ["B", 8, 16]), _x("k", ["B", 8, 16]), _x("v", ["B", 8, 16])], [
        {"id": "kt", "op": "permute", "inputs": ["k"], "attrs": {"dims": [0, 2, 1]}},
        {"id": "s", "op": "matmul", "inputs": ["q", "kt"]},
        {"id": "z", "op": "scale", "inputs": ["s"], "attrs": {"value": 0.25}},
        {"id": "p", "op": "softmax", "inputs": ["z"], "attrs": {"dim": -1}},
        {"id": "o", "op": "matmul", "inputs": ["p", "v"]}], ["o"]),
    "conv": _ir([_x("x", ["B", 3, 8, 8])], [
        {"id": "c", "op": "conv2d", "inputs": ["x"],
         "attrs": {"out_channels": 4, "kernel_size": 3, "padding": 1}},
        {"id": "r", "op": "relu", "inputs": ["c"]},
        {"id": "c2", "op": "conv2d", "inputs": ["r"],
         "attrs": {"out_channels": 3, "kernel_size": 3, "padding": 1}},
        {"id": "g", "op": "gelu", "inputs": ["c2"], "attrs": {"approximate": "tanh"}},
        {"id": "out", "op": "add", "inputs": ["x", "g"]}], ["out"]),
}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_blueprints_match_float64(name: str, dtype: str) -> None:
    factory, files = compile_and_load(hand(name), dtype)
    module = factory("cpu")
    assert module.ready and module.backend_in_use == "triton"
    assert Plan.from_json(files["triton/plan.json"]).groups(), "nothing was fused"
    check_against_float64(module)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_bundled_blueprint_matches_float64(dtype: str) -> None:
    blueprints = bundled()
    assert blueprints, "no bundled blueprints"
    for name, ir in sorted(blueprints.items()):
        factory, _ = compile_and_load(ir, dtype)
        module = factory("cpu")
        try:
            check_against_float64(module, batch=3)
        except AssertionError as exc:
            raise AssertionError(f"bundled blueprint {name!r}: {exc}") from exc


def test_one_artifact_serves_any_batch_size() -> None:
    factory, _ = compile_and_load(hand("gated_rms"))
    module = factory("cpu")
    for batch in (1, 3, 7):
        check_against_float64(module, batch=batch, seed=batch)


def test_fusion_moves_linear_bias_into_the_epilogue_group() -> None:
    _, files = compile_and_load(hand("mlp_ln_softmax"))
    plan = Plan.from_json(files["triton/plan.json"])
    groups = plan.groups()
    ops = [[u.op for u in g.units] for g in groups]
    assert ops[0] == ["bias", "gelu", "layer_norm", "softmax"]
    assert all(isinstance(s, FusedStep) or s.bias is False for s in plan.steps
               if not isinstance(s, FusedStep) and s.node in {u.node for u in groups[0].units})
    # the residual add's grads are the incoming grad itself: no kernel store
    src = files["kernels/esper_kernels.py"].decode()
    assert "import torch" not in src and "@triton.jit" in src


def test_checkpoints_are_interchangeable_with_the_torch_backend() -> None:
    from esper.compile.reference import build_module

    factory, files = compile_and_load(hand("mlp_ln_softmax"))
    module = factory("cpu")
    ref = build_module(BlueprintIR.from_json(files["ir.json"]))
    ref.load_state_dict(module.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)


def test_no_gpu_and_no_interpreter_serves_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.triton.backend import TritonBackend

    _, files = compile_and_load(hand("gated_rms"))
    monkeypatch.delenv("TRITON_INTERPRET")
    module = TritonBackend().load(SimpleNamespace(dtype="float32"), files)("cpu")
    assert not module.ready and module.backend_in_use == "reference"
    check_against_float64(module)


def test_plan_round_trips_through_json() -> None:
    _, files = compile_and_load(hand("reductions"))
    plan = Plan.from_json(files["triton/plan.json"])
    assert json.loads(plan.to_json()) == json.loads(files["triton/plan.json"])
