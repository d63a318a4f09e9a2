"""Parameter creation, keys and initialisation (shared by every backend)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from esper.compile.params import init_parameters, param_key, param_keys
from esper.compile.reference import build_module
from esper.ir import BlueprintIR


def make_ir(nodes: list[dict[str, Any]], outputs: list[str],
            inputs: list[dict[str, Any]] | None = None) -> BlueprintIR:
    return BlueprintIR.from_dict({
        "schema_version": 1,
        "name": "t",
        "inputs": inputs or [{"name": "x", "shape": ["B", 64], "dtype": "float32"}],
        "nodes": nodes,
        "outputs": outputs,
    })


def adapter(init: str = "zeros") -> BlueprintIR:
    return make_ir([
        {"id": "down", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 8}},
        {"id": "act", "op": "gelu", "inputs": ["down"]},
        {"id": "up", "op": "linear", "inputs": ["act"],
         "attrs": {"out_features": 64, "init": init}},
        {"id": "out", "op": "add", "inputs": ["x", "up"]},
    ], ["out", "up"])


def test_zero_init_adapter_is_the_identity_on_its_residual() -> None:
    module = build_module(adapter("zeros")).eval()
    x = torch.randn(5, 64)
    out, delta = module(x)
    assert torch.equal(delta, torch.zeros_like(delta))
    assert torch.equal(out, x)


def test_bundled_zero_init_blueprints_leave_their_residual_unchanged() -> None:
    from esper.ir import bundled

    checked = residuals = 0
    for name, ir in bundled().items():
        zero_nodes = [n.id for n in ir.nodes if n.resolved_attrs.get("init") == "zeros"]
        if not zero_nodes:
            continue
        # Expose every zero-initialised node as an output too: each computes 0.
        outputs = list(dict.fromkeys([*ir.outputs, *zero_nodes]))
        probe = BlueprintIR.from_dict({**ir.to_dict(), "outputs": outputs})
        module = build_module(probe).eval()
        xs = [torch.randn([3 if isinstance(d, str) else d for d in i.shape]) for i in ir.inputs]
        values = dict(zip(outputs, module(*xs), strict=True))
        for node_id in zero_nodes:
            assert torch.count_nonzero(values[node_id]) == 0, (name, node_id)
        # A residual output x + branch(x) whose branch ends in a zero init is x, exactly.
        inputs = dict(zip((i.name for i in ir.inputs), xs, strict=True))
        for out in ir.outputs:
            node = ir.node(out) if out not in inputs else None
            if node is None or node.op.value != "add":
                continue
            a, b = node.inputs
            for res, branch in ((a, b), (b, a)):
                if res in inputs and branch in zero_nodes:
                    assert torch.equal(values[out], inputs[res]), (name, out)
                    residuals += 1
        checked += 1
    assert checked >= 1 and residuals >= 1


@pytest.mark.parametrize("fan_in", [16, 300])
def test_linear_default_init_matches_torch(fan_in: int) -> None:
    ir = make_ir([{"id": "fc", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 512}}],
                 ["fc"], [{"name": "x", "shape": ["B", fan_in], "dtype": "float32"}])
    torch.manual_seed(123)
    module = build_module(ir)
    torch.manual_seed(123)
    ref = nn.Linear(fan_in, 512)
    # Same calls in the same order on the same RNG: bit-identical to nn.Linear.
    assert torch.equal(module.param("fc", "weight"), ref.weight)
    assert torch.equal(module.param("fc", "bias"), ref.bias)
    bound = 1 / math.sqrt(fan_in)
    w = module.param("fc", "weight").detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.99 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound  # uniform(-b, b)
    assert module.param("fc", "bias").abs().max() <= bound


def test_conv2d_default_init_matches_torch() -> None:
    ir = make_ir(
        [{"id": "c", "op": "conv2d", "inputs": ["x"],
          "attrs": {"out_channels": 32, "kernel_size": 3, "groups": 2}}],
        ["c"], [{"name": "x", "shape": ["B", 8, 6, 6], "dtype": "float32"}])
    torch.manual_seed(9)
    module = build_module(ir)
    torch.manual_seed(9)
    ref = nn.Conv2d(8, 32, 3, groups=2)
    assert torch.equal(module.param("c", "weight"), ref.weight)
    assert torch.equal(module.param("c", "bias"), ref.bias)
    bound = 1 / math.sqrt(8 // 2 * 3 * 3)
    assert module.param("c", "weight").abs().max() <= bound


def test_norm_default_init_and_zeros_and_normal() -> None:
    ir = make_ir([
        {"id": "ln", "op": "layer_norm", "inputs": ["x"], "attrs": {"normalized_shape": [64]}},
        {"id": "rms", "op": "rms_norm", "inputs": ["ln"], "attrs": {"normalized_shape": 64}},
        {"id": "z", "op": "layer_norm", "inputs": ["rms"],
         "attrs": {"normalized_shape": 64, "init": "zeros"}},
        {"id": "fc", "op": "linear", "inputs": ["z"],
         "attrs": {"out_features": 256, "init": "normal"}},
    ], ["fc"])
    m = build_module(ir, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.param("ln", "weight"), torch.ones(64))
    assert torch.equal(m.param("ln", "bias"), torch.zeros(64))
    assert torch.equal(m.param("rms", "weight"), torch.ones(64))
    assert set(m.node_params("rms")) == {"weight"}
    assert not m.param("z", "weight").any() and not m.param("z", "bias").any()
    w = m.param("fc", "weight").detach()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert not m.param("fc", "bias").any()


def test_same_generator_seed_gives_same_parameters() -> None:
    ir = adapter("default")
    a = build_module(ir, generator=torch.Generator().manual_seed(5))
    b = build_module(ir, generator=torch.Generator().manual_seed(5))
    c = build_module(ir, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.param("up", "weight"), c.param("up", "weight"))


def test_init_parameters_fills_a_plain_dict_like_the_module() -> None:
    ir = adapter("default")
    module = build_module(ir, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain: dict[str, torch.Tensor] = {}
    out = init_parameters(ir, plain, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    assert out.keys() == plain.keys() == dict(module.params).keys()
    assert all(torch.equal(plain[k], module.params[k]) for k in plain)


def test_param_keys_are_stable_and_sanitised() -> None:
    ir = make_ir([
        {"id": "fc.1", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 4}},
        {"id": "fc_1", "op": "linear", "inputs": ["fc.1"], "attrs": {"out_features": 4}},
        {"id": "training", "op": "linear", "inputs": ["fc_1"],
         "attrs": {"out_features": 4, "bias": False}},
    ], ["training"])
    keys = param_keys(ir)
    assert keys[("fc_1", "weight")] == "fc_1__weight"
    assert keys[("training", "weight")] == "training__weight"
    dotted = keys[("fc.1", "weight")]
    assert dotted.startswith("fc_1_") and dotted.endswith("__weight") and "." not in dotted
    assert dotted == param_key("fc.1", "weight")
    assert len(set(keys.values())) == len(keys) == 5
    module = build_module(ir)
    assert set(module.state_dict()) == {f"params.{k}" for k in keys.values()}
    assert module.param("fc.1", "bias") is module.params[param_key("fc.1", "bias")]
    with pytest.raises(KeyError):
        module.param("training", "bias")


def test_checkpoint_round_trips_between_modules() -> None:
    ir = adapter("default")
    a = build_module(ir, generator=torch.Generator().manual_seed(1))
    b = build_module(ir, generator=torch.Generator().manual_seed(2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 64)
    assert all(torch.equal(p, q) for p, q in zip(a(x), b(x), strict=True))
