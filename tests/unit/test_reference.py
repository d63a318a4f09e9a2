"""The torch reference backend against the float64 evaluator: every bundled
blueprint, forward and backward."""

from __future__ import annotations

import pytest
import torch

from esper.compile.evaluate import evaluate
from esper.compile.reference import build_module
from esper.errors import InputMismatchError
from esper.ir import BlueprintIR, bundled

BUNDLED = bundled()


def concrete_inputs(ir: BlueprintIR, *, dtype: torch.dtype, seed: int = 0,
                    batch: int = 3) -> list[torch.Tensor]:
    """Random inputs, every symbolic dim bound to ``batch``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in ir.inputs:
        shape = [batch if isinstance(d, str) else d for d in spec.shape]
        out.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
    return out


def _outputs(result: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _normal_params(module: torch.nn.Module, seed: int) -> None:
    # Non-trivial values everywhere (zero-init projections would hide errors upstream).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)


def test_bundled_is_not_empty() -> None:
    assert len(BUNDLED) >= 3


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_forward_matches_float64_evaluation(name: str) -> None:
    ir = BUNDLED[name]
    m64 = build_module(ir, dtype=torch.float64).eval()
    _normal_params(m64, seed=1)
    xs = concrete_inputs(ir, dtype=torch.float64)
    ref = evaluate(ir, xs, dict(m64.params))
    got64 = _outputs(m64(*xs))
    assert len(got64) == len(ref) == len(ir.outputs)
    for g, r in zip(got64, ref, strict=True):
        assert g.dtype == r.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)

    m32 = build_module(ir, dtype=torch.float32).eval()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    got32 = _outputs(m32(*[x.float() for x in xs]))
    for g, r in zip(got32, ref, strict=True):
        assert g.dtype == torch.float32
        # float32 rounding grows with the output's scale (conv_block reaches ~470,
        # where 3e-4 is a few ulps and the CPU's conv algorithm picks the order).
        atol = max(1e-4, 4e-6 * r.abs().max().item())
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_backward_matches_float64_evaluation(name: str) -> None:
    ir = BUNDLED[name]
    m64 = build_module(ir, dtype=torch.float64).eval()
    _normal_params(m64, seed=2)
    xs = [x.requires_grad_() for x in concrete_inputs(ir, dtype=torch.float64, seed=3)]
    params = {k: v.detach().clone().requires_grad_() for k, v in m64.params.items()}

    ref = evaluate(ir, xs, params)
    g = torch.Generator().manual_seed(4)
    cot = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    leaves = [*xs, *params.values()]
    ref_grads = torch.autograd.grad(ref, leaves, cot, allow_unused=True)
    scale = max(r.norm().item() for r in ref_grads if r is not None)

    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        module = build_module(ir, dtype=dtype).eval()
        module.load_state_dict({k: v.to(dtype) for k, v in m64.state_dict().items()})
        mx = [x.detach().to(dtype).requires_grad_() for x in xs]
        out = _outputs(module(*mx))
        mleaves = [*mx, *(module.params[k] for k in params)]
        grads = torch.autograd.grad(out, mleaves, [c.to(dtype) for c in cot], allow_unused=True)
        for leaf_name, got, want in zip([*range(len(xs)), *params], grads, ref_grads,
                                        strict=True):
            if want is None:
                assert got is None or not got.any(), leaf_name
                continue
            assert got is not None, f"no gradient for {leaf_name}"
            # Norm-wise: a weight grad sums thousands of products, so single
            # elements near zero carry fp32 rounding far above an elementwise bound.
            # Analytically-zero grads (a key bias under softmax) are judged on the
            # scale of the whole backward pass instead of their own rounding noise.
            err = ((got.double() - want).norm() / max(want.norm().item(), 1e-2 * scale)).item()
            assert err <= tol, f"{leaf_name} {dtype}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_compiles_in_half_precisions(name: str) -> None:
    ir = BUNDLED[name]
    for dtype in (torch.float16, torch.bfloat16):
        module = build_module(ir, dtype=dtype, generator=torch.Generator().manual_seed(0))
        assert all(p.dtype == dtype for p in module.parameters())
        out = _outputs(module.eval()(*concrete_inputs(ir, dtype=dtype)))
        assert all(o.dtype == dtype and torch.isfinite(o).all() for o in out)


LOCAL = BlueprintIR.from_dict({
    "schema_version": 1, "name": "local",
    "inputs": [{"name": "x", "shape": ["B", 2, 6], "dtype": "float32"}],
    "nodes": [
        {"id": "n", "op": "layer_norm", "inputs": ["x"], "attrs": {"normalized_shape": 6}},
        {"id": "h", "op": "linear", "inputs": ["n"], "attrs": {"out_features": 6}},
        {"id": "r", "op": "reshape", "inputs": ["h"], "attrs": {"shape": ["B", 12]}},
        {"id": "s", "op": "softmax", "inputs": ["r"]},
    ],
    "outputs": ["s"],
})


def test_symbolic_batch_any_size() -> None:
    ir = LOCAL
    module = build_module(ir).eval()
    for batch in (1, 5):
        out = _outputs(module(*concrete_inputs(ir, dtype=torch.float32, batch=batch)))
        ref = evaluate(ir, concrete_inputs(ir, dtype=torch.float32, batch=batch),
                       dict(module.params))
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5)


def test_wrong_inputs_are_refused_with_the_input_named() -> None:
    ir = LOCAL
    module = build_module(ir)
    with pytest.raises(InputMismatchError, match="input"):
        module()
    bad = [torch.zeros(2, *([7] * (len(s.shape) - 1)), 1) for s in ir.inputs]
    with pytest.raises(InputMismatchError, match=ir.inputs[0].name):
        module(*bad)
