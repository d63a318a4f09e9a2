"""Each op's lowering against a direct torch call, and against the float64
evaluator (forward and backward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from esper.compile.evaluate import evaluate
from esper.compile.reference import build_module
from esper.ir import BlueprintIR

T = torch.Tensor


def one_node_ir(op: str, attrs: dict[str, Any], shapes: list[list[int | str]]) -> BlueprintIR:
    inputs = [{"name": f"x{i}", "shape": s, "dtype": "float32"} for i, s in enumerate(shapes)]
    return BlueprintIR.from_dict({
        "schema_version": 1,
        "name": f"one_{op}",
        "inputs": inputs,
        "nodes": [{"id": "n", "op": op, "inputs": [i["name"] for i in inputs], "attrs": attrs}],
        "outputs": ["n"],
    })


# op, attrs, input shapes, direct torch call (inputs, module) -> expected
CASES: list[tuple[str, dict[str, Any], list[list[int | str]], Callable[..., T]]] = [
    ("linear", {"out_features": 5}, [["B", 4]],
     lambda x, m: F.linear(x[0], m.param("n", "weight"), m.param("n", "bias"))),
    ("linear", {"out_features": 5, "bias": False}, [["B", 2, 4]],
     lambda x, m: x[0] @ m.param("n", "weight").T),
    ("matmul", {}, [["B", 3, 4], [4, 2]], lambda x, m: torch.matmul(x[0], x[1])),
    ("conv2d", {"out_channels": 4, "kernel_size": 3, "padding": 1}, [["B", 2, 6, 6]],
     lambda x, m: F.conv2d(x[0], m.param("n", "weight"), m.param("n", "bias"), padding=1)),
    ("conv2d", {"out_channels": 4, "kernel_size": [3, 2], "stride": 2, "dilation": [1, 2],
                "groups": 2, "bias": False}, [["B", 2, 7, 8]],
     lambda x, m: F.conv2d(x[0], m.param("n", "weight"), None, stride=2, dilation=(1, 2),
                           groups=2)),
    ("conv2d", {"out_channels": 3, "kernel_size": 4, "padding": "same", "dilation": 1},
     [["B", 2, 5, 5]],
     lambda x, m: F.conv2d(x[0], m.param("n", "weight"), m.param("n", "bias"),
                           padding="same")),
    ("conv2d", {"out_channels": 3, "kernel_size": 3, "padding": "valid"}, [["B", 2, 5, 5]],
     lambda x, m: F.conv2d(x[0], m.param("n", "weight"), m.param("n", "bias"))),
    ("add", {}, [["B", 4], [4]], lambda x, m: x[0] + x[1]),
    ("sub", {}, [["B", 4], ["B", 4]], lambda x, m: x[0] - x[1]),
    ("mul", {}, [["B", 1, 4], [3, 1]], lambda x, m: x[0] * x[1]),
    ("div", {}, [["B", 4], ["B", 4]], lambda x, m: x[0] / x[1]),
    ("relu", {}, [["B", 4]], lambda x, m: torch.relu(x[0])),
    ("gelu", {}, [["B", 4]], lambda x, m: F.gelu(x[0])),
    ("gelu", {"approximate": "tanh"}, [["B", 4]], lambda x, m: F.gelu(x[0], approximate="tanh")),
    ("silu", {}, [["B", 4]], lambda x, m: F.silu(x[0])),
    ("sigmoid", {}, [["B", 4]], lambda x, m: torch.sigmoid(x[0])),
    ("tanh", {}, [["B", 4]], lambda x, m: torch.tanh(x[0])),
    ("softmax", {}, [["B", 5]], lambda x, m: torch.softmax(x[0], -1)),
    ("softmax", {"dim": 0}, [["B", 5]], lambda x, m: torch.softmax(x[0], 0)),
    ("layer_norm", {"normalized_shape": 4}, [["B", 3, 4]],
     lambda x, m: F.layer_norm(x[0], [4], m.param("n", "weight"), m.param("n", "bias"))),
    ("layer_norm", {"normalized_shape": [3, 4], "eps": 1e-3, "bias": False}, [["B", 3, 4]],
     lambda x, m: F.layer_norm(x[0], [3, 4], m.param("n", "weight"), None, 1e-3)),
    ("layer_norm", {"normalized_shape": [4], "elementwise_affine": False}, [["B", 4]],
     lambda x, m: F.layer_norm(x[0], [4])),
    ("rms_norm", {"normalized_shape": [4]}, [["B", 4]],
     lambda x, m: F.rms_norm(x[0], [4], m.param("n", "weight"))),
    ("rms_norm", {"normalized_shape": 4, "eps": 1e-2}, [["B", 4]],
     lambda x, m: F.rms_norm(x[0], [4], m.param("n", "weight"), 1e-2)),
    ("dropout", {"p": 0.3}, [["B", 4]], lambda x, m: x[0]),
    ("sum", {}, [["B", 4]], lambda x, m: x[0].sum()),
    ("sum", {"dim": 1, "keepdim": True}, [["B", 4]], lambda x, m: x[0].sum(1, keepdim=True)),
    ("mean", {"dim": [0, 2]}, [["B", 3, 4]], lambda x, m: x[0].mean((0, 2))),
    ("max", {"dim": -1}, [["B", 4]], lambda x, m: x[0].max(-1).values),
    ("max", {}, [["B", 4]], lambda x, m: x[0].max()),
    ("reshape", {"shape": ["B", 2, -1]}, [["B", 4, 3]], lambda x, m: x[0].reshape(3, 2, 6)),
    ("reshape", {"shape": [-1, 4]}, [[2, 3, 4]], lambda x, m: x[0].reshape(-1, 4)),
    ("permute", {"dims": [2, 0, 1]}, [["B", 4, 3]], lambda x, m: x[0].permute(2, 0, 1)),
    ("concat", {"dim": 1}, [["B", 4], ["B", 2], ["B", 1]], lambda x, m: torch.cat(x, 1)),
    ("concat", {}, [[2, 4], [1, 4]], lambda x, m: torch.cat(x)),
    ("identity", {}, [["B", 4]], lambda x, m: x[0]),
    ("scale", {"value": -2.5}, [["B", 4]], lambda x, m: x[0] * -2.5),
]


def _inputs(ir: BlueprintIR, dtype: torch.dtype, batch: int = 3) -> list[T]:
    g = torch.Generator().manual_seed(7)
    shapes = [[batch if isinstance(d, str) else d for d in i.shape] for i in ir.inputs]
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    if ir.nodes[0].op.value == "div":
        xs[1] = xs[1].sign() * (xs[1].abs() + 0.5)  # keep away from 0
    return [x.to(dtype) for x in xs]


def _case_id(case: tuple[str, dict[str, Any], list[list[int | str]], Any]) -> str:
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[1].items())}"


pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_op_matches_direct_torch_call(case: tuple[Any, ...]) -> None:
    op, attrs, shapes, direct = case
    ir = one_node_ir(op, attrs, shapes)
    module = build_module(ir, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        for p in module.parameters():  # non-trivial norm gains/shifts too
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    xs = _inputs(ir, torch.float32)
    got = module(*xs)
    torch.testing.assert_close(got, direct(xs, module), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_op_matches_float64_evaluation_forward_and_backward(case: tuple[Any, ...]) -> None:
    op, attrs, shapes, _ = case
    ir = one_node_ir(op, attrs, shapes)
    module = build_module(ir, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64) * 0.1)
    xs = [x.requires_grad_() for x in _inputs(ir, torch.float64)]
    got = module(*xs)
    params = dict(module.params)
    want = evaluate(ir, xs, params)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64)
    leaves = [*xs, *params.values()]
    g_got = torch.autograd.grad(got, leaves, cot)
    g_want = torch.autograd.grad(want, leaves, cot)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dropout_is_active_only_in_training() -> None:
    ir = one_node_ir("dropout", {"p": 0.5}, [["B", 1000]])
    module = build_module(ir)
    x = torch.ones(2, 1000)
    assert torch.equal(module.eval()(x), x)
    y = module.train()(x)
    zeros = (y == 0).float().mean().item()
    assert 0.4 < zeros < 0.6
    assert torch.all((y == 0) | (y == 2.0))


def test_error_inside_a_node_names_it() -> None:
    ir = one_node_ir("matmul", {}, [["B", 4], [4, 2]])
    module = build_module(ir)
    with pytest.raises(RuntimeError) as info:
        module(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4, 2))
    assert any("'n' (matmul)" in note for note in getattr(info.value, "__notes__", []))
