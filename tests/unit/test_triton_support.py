"""Shared helpers of the Triton backend's CPU tests (no tests here; kernels run under
TRITON_INTERPRET=1): compile a blueprint without binaries, load it, and compare
forward and backward with the float64 evaluator."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from esper.compile.backend import CompileOptions
from esper.compile.evaluate import evaluate
from esper.ir import BlueprintIR

TOL = {"float32": 2e-4, "float16": 2e-2}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels run on CPU through Triton's interpreter (read when kernels are defined).

    Triton decides interpreted-or-compiled when a function is decorated: if an
    earlier test imported triton without the interpreter, ``tl.sum``/``tl.max``
    are compiled-only ``JITFunction``s that refuse to be called from an
    interpreted kernel; run them as interpreted device functions instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrapped: dict[int, Any] = {}

    def device_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        f = wrapped.get(id(self))
        if f is None:
            f = wrapped[id(self)] = InterpretedFunction(self.fn)
        return f(*args, **kwargs)

    monkeypatch.setattr(JITFunction, "__call__", device_call)


def compile_and_load(ir: BlueprintIR, dtype: str = "float32", serve: str | None = "schedule"
                     ) -> tuple[Any, dict[str, bytes]]:
    """Compile without binaries and load. ``serve``: the plan's choice, fixed to the
    fused kernels by default (these tests exist to run them); None: predicted."""
    from esper.triton.backend import TritonBackend

    be = TritonBackend()
    extra: dict[str, Any] = {"binaries": False}
    if serve is not None:
        extra["serve"] = serve
    cf = be.compile(ir, "cuda:sm_90", CompileOptions(dtype=dtype, autotune=False, extra=extra))
    factory = be.load(SimpleNamespace(dtype=dtype), cf.files)  # type: ignore[arg-type]
    return factory, dict(cf.files)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error; values that should be ~0 (the mean of a layer_norm's
    output) are judged against a floor of 1e-2 per element instead."""
    a64, b64 = a.detach().double(), b.detach().double()
    floor = 1e-2 * max(1, b64.numel()) ** 0.5
    return float((a64 - b64).norm() / max(float(b64.norm()), floor))


def check_against_float64(module: Any, batch: int = 5, seed: int = 0) -> None:
    """Outputs, input grads and parameter grads of ``module`` vs float64 ground truth."""
    ir = module.ir
    dtype = module.compute_dtype
    name = str(dtype).removeprefix("torch.")
    tol = TOL[name]
    g = torch.Generator().manual_seed(seed)
    symbols: dict[str, int] = {}
    xs64 = []
    for spec in ir.inputs:
        shape = [symbols.setdefault(d, batch) if isinstance(d, str) else d for d in spec.shape]
        xs64.append(torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True))
    params64 = {k: p.detach().double().requires_grad_(True) for k, p in module.params.items()}
    # eps defaults follow the declared dtypes, as in node_attrs (every backend agrees)
    want = evaluate(ir, xs64, params64)
    xs = [x.detach().to(dtype).requires_grad_(True) for x in xs64]
    module.zero_grad(set_to_none=True)
    got = module(*xs)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    gouts = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
    for o, w in zip(got, want, strict=True):
        assert o.dtype == dtype and o.shape == w.shape
        assert torch.isfinite(o).all()
        assert rel_err(o, w) < tol, f"forward rel err {rel_err(o, w):.2e}"
    torch.autograd.backward(list(want), gouts)
    torch.autograd.backward(list(got), [t.to(dtype) for t in gouts])
    for x, x64 in zip(xs, xs64, strict=True):
        assert x.grad is not None and x64.grad is not None
        assert rel_err(x.grad, x64.grad) < tol * 2, "input grad"
    torch_errs = _torch_backend_param_errs(module, xs, gouts, params64) if dtype != torch.float32 \
        else {}
    for k, p in module.params.items():
        ref = params64[k].grad
        if ref is None:
            continue
        assert p.grad is not None, f"no grad for {k}"
        # a parameter grad that torch's own ops compute (a conv's weight grad summed in
        # half precision on the CPU) may be no better than torch at this precision
        bound = max(tol * 2, 1.5 * torch_errs.get(k, 0.0))
        assert rel_err(p.grad, ref) < bound, f"grad {k}: {rel_err(p.grad, ref):.2e}"


def _torch_backend_param_errs(module: Any, xs: list[torch.Tensor], gouts: list[torch.Tensor],
                              params64: dict[str, torch.Tensor]) -> dict[str, float]:
    """Parameter-grad errors of the torch backend on the same params, inputs and dtype."""
    from esper.compile.reference import build_module

    ref = build_module(module.ir, dtype=module.compute_dtype)
    ref.load_state_dict(module.state_dict())
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    out = ref(*xr)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(out), [t.to(module.compute_dtype) for t in gouts])
    return {k: rel_err(p.grad, params64[k].grad) for k, p in ref.params.items()
            if p.grad is not None and params64[k].grad is not None}
