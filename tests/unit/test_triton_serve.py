"""Unmeasured artifacts: which plans run fused kernels and which serve the
blueprint's torch ops (``esper.triton.serve``), and how compile honours a fixed
choice."""

from __future__ import annotations

from typing import Any

import pytest

from esper.compile.backend import CompileOptions
from esper.compile.passes import optimize
from esper.errors import CompileError
from esper.ir import BlueprintIR, bundled
from esper.triton.backend import TritonBackend, build_plan
from esper.triton.plan import Plan
from esper.triton.serve import MARGIN_PREDICTED_LOSS, MARGIN_PREDICTED_WIN, margin, predicted_serve

CHAIN = BlueprintIR.from_dict({
    "schema_version": 1, "name": "chain",
    "inputs": [{"name": "x", "shape": ["B", 64], "dtype": "float32"},
               {"name": "y", "shape": ["B", 64], "dtype": "float32"}],
    "nodes": [{"id": "s", "op": "sigmoid", "inputs": ["y"]},
              {"id": "m", "op": "mul", "inputs": ["x", "s"]},
              {"id": "t", "op": "tanh", "inputs": ["m"]}],
    "outputs": ["t"]})


def _plan(ir: BlueprintIR) -> Plan:
    return build_plan(optimize(ir), "bfloat16")[0]


@pytest.mark.parametrize(("name", "want"), [
    # addmm adds the bias; gelu and the residual add are one kernel each either way
    ("residual_mlp", "reference"),
    # cuDNN's convolutions with a one-op epilogue: one kernel saved in all
    ("conv_block", "reference"),
    # layer_norm's torch backward is several kernels
    ("bottleneck_adapter", "schedule"),
    ("norm_gated_linear", "schedule"),
])
def test_bundled_blueprints(name: str, want: str) -> None:
    plan = _plan(bundled()[name])
    assert predicted_serve(plan) == want
    assert margin(plan) == (MARGIN_PREDICTED_WIN if want == "schedule" else MARGIN_PREDICTED_LOSS)


def test_an_elementwise_region_of_three_ops_is_served_fused() -> None:
    assert predicted_serve(_plan(CHAIN)) == "schedule"


def _compile(ir: BlueprintIR, **extra: Any) -> dict[str, bytes]:
    cf = TritonBackend().compile(ir, "cuda:sm_90", CompileOptions(
        dtype="float32", autotune=False, extra={"binaries": False, **extra}))
    return dict(cf.files)


def test_compile_records_the_prediction_and_honours_a_fixed_choice() -> None:
    conv = bundled()["conv_block"]
    plan = Plan.from_json(_compile(conv)["triton/plan.json"])
    assert plan.serve == "reference" and plan.meta["tuning"]["predicted_serve"] == "reference"
    forced = Plan.from_json(_compile(conv, serve="schedule")["triton/plan.json"])
    assert forced.serve == "schedule" and forced.meta["tuning"]["predicted_serve"] == "reference"
    assert Plan.from_json(_compile(CHAIN, serve="reference")["triton/plan.json"]).serve \
        == "reference"


def test_an_unknown_serve_choice_is_refused_by_name() -> None:
    with pytest.raises(CompileError, match=r"extra\.serve='fused'"):
        _compile(CHAIN, serve="fused")


def test_a_module_serving_torch_ops_is_the_reference_module_with_the_same_checkpoint() -> None:
    from types import SimpleNamespace

    import torch

    from esper.compile.reference import TorchBlueprintModule, build_module

    conv = bundled()["conv_block"]
    be = TritonBackend()
    served = be.load(SimpleNamespace(dtype="float32"), _compile(conv))("cpu")  # type: ignore[arg-type]
    fused = be.load(SimpleNamespace(dtype="float32"), _compile(conv, serve="schedule"))("cpu")  # type: ignore[arg-type]
    # no wrapper around the torch ops: a step costs what eager's costs
    assert isinstance(served, TorchBlueprintModule)
    assert served.ready and served.serves_reference and served.backend_in_use == "reference"
    assert served.state_dict().keys() == fused.state_dict().keys()
    served.load_state_dict(fused.state_dict())
    ref = build_module(served.ir)
    ref.load_state_dict(served.state_dict())
    x = torch.randn(2, 64, 32, 32)
    torch.testing.assert_close(served(x), ref(x), rtol=0, atol=0)
