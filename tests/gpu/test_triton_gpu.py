"""The Triton backend on a real GPU: real shapes, bf16 and fp32, forward and
backward vs float64; artifacts compiled on the CPU machine for cuda:sm_90
(``ESPER_TRITON_SHIPPED``: a folder of ``*.esper`` + ``pub.pem`` made by
``benchmarks/bench_triton.py build``) launch with zero compiles; a Triton
version mismatch serves the reference, recompiles in the background, switches."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from esper.compile.backend import CompileOptions
from esper.compile.evaluate import evaluate
from esper.ir import BlueprintIR, bundled
from esper.triton.backend import TritonBackend

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # fp32 matmuls may use TF32 in cuBLAS
KERNELS = {"serve": "schedule"}  # the fused kernels even where torch ops are predicted faster

WIDE = json.dumps({
    "schema_version": 1, "name": "wide", "inputs": [
        {"name": "x", "shape": ["B", 1000], "dtype": "float32"},
        {"name": "y", "shape": ["B", 1000], "dtype": "float32"}],
    "nodes": [
        {"id": "n", "op": "layer_norm", "inputs": ["x"], "attrs": {"normalized_shape": [1000]}},
        {"id": "h", "op": "linear", "inputs": ["n"], "attrs": {"out_features": 1000}},
        {"id": "g", "op": "gelu", "inputs": ["h"]},
        {"id": "s", "op": "softmax", "inputs": ["g"], "attrs": {"dim": -1}},
        {"id": "m", "op": "mul", "inputs": ["s", "y"]},
        {"id": "r", "op": "rms_norm", "inputs": ["m"], "attrs": {"normalized_shape": [1000]}},
        {"id": "mx", "op": "max", "inputs": ["r"], "attrs": {"dim": [-1], "keepdim": True}},
        {"id": "out", "op": "sub", "inputs": ["r", "mx"]}],
    "outputs": ["out"]})


def _target() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"cuda:sm_{major}{minor}"


def _grads(module: Any, xs64: list[torch.Tensor], gouts: list[torch.Tensor]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs, input grads and param grads of ``module`` in its own dtype."""
    dtype = module.compute_dtype
    xs = [x.detach().to(dtype).requires_grad_(True) for x in xs64]
    module.zero_grad(set_to_none=True)
    got = module(*xs)
    got = list(got) if isinstance(got, tuple) else [got]
    torch.autograd.backward(got, [t.to(dtype) for t in gouts])
    return got, [x.grad for x in xs], {k: p.grad for k, p in module.params.items()}


def _check(module: Any, rows: int, seed: int = 0) -> None:
    """Esper vs float64, allowed the error of eager torch in the same dtype (x1.5)
    or the dtype's tolerance, whichever is larger."""
    from esper.compile.reference import build_module

    dtype = module.compute_dtype
    g = torch.Generator(device="cuda").manual_seed(seed)
    symbols: dict[str, int] = {}
    for i in module.ir.inputs:  # the first symbol (batch) gets ``rows``, others 64
        for d in i.shape:
            if isinstance(d, str) and d not in symbols:
                symbols[d] = rows if not symbols else 64
    xs64 = [torch.randn([symbols.get(d, d) for d in i.shape], device="cuda",
                        dtype=torch.float64, generator=g).requires_grad_(True)
            for i in module.ir.inputs]
    params64 = {k: p.detach().double().requires_grad_(True) for k, p in module.params.items()}
    want = evaluate(module.ir, xs64, params64)
    gouts = [torch.randn(w.shape, device="cuda", dtype=torch.float64, generator=g) for w in want]
    torch.autograd.backward(list(want), gouts)
    eager = build_module(module.ir, device="cuda", dtype=dtype)
    eager.load_state_dict(module.state_dict())
    ours, theirs = _grads(module, xs64, gouts), _grads(eager, xs64, gouts)
    ref = ([w.detach() for w in want], [x.grad for x in xs64],
           {k: p.grad for k, p in params64.items()})

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    tol = TOL[dtype]
    pairs = [*zip(ours[0], theirs[0], ref[0], strict=True),
             *zip(ours[1], theirs[1], ref[1], strict=True),
             *((ours[2][k], theirs[2][k], ref[2][k]) for k in ref[2] if ref[2][k] is not None)]
    for o, e, r in pairs:
        assert o is not None and torch.isfinite(o).all()
        assert rel(o, r) <= max(tol, 1.5 * rel(e, r)), (rel(o, r), rel(e, r))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bundled_and_wide_blueprints_at_real_shapes(dtype: str, tmp_path: Path) -> None:
    irs = {"wide": BlueprintIR.from_json(WIDE), **bundled()}
    backend = TritonBackend(tmp_path)
    for name, ir in irs.items():
        cf = backend.compile(ir, _target(), CompileOptions(dtype=dtype, autotune=False,
                                                          extra=KERNELS))
        module = backend.load(SimpleNamespace(dtype=dtype), cf.files)("cuda")  # type: ignore[arg-type]
        assert module.backend_in_use == "triton", name
        rows = 32 if name.startswith("conv") else 4096
        try:
            _check(module, rows)
        except AssertionError as exc:
            raise AssertionError(f"{name} ({dtype}): {exc}") from exc


def _shipped() -> Path:
    folder = os.environ.get("ESPER_TRITON_SHIPPED")
    if not folder:
        pytest.skip("ESPER_TRITON_SHIPPED not set")
    return Path(folder)


def test_cpu_compiled_artifacts_launch_without_compiling() -> None:
    import triton

    from esper.artifacts import unpack_verified
    from esper.artifacts.signing import load_public_key

    folder = _shipped()
    pub = load_public_key(folder / "pub.pem")
    compiles: list[str] = []
    triton.knobs.compilation.listener = lambda **kw: compiles.append(kw["src"].name)
    try:
        paths = sorted(folder.glob("*.esper"))
        assert paths
        launched = 0
        for path in paths:
            art = unpack_verified(path.read_bytes(), pub)
            build = json.loads(art.files["triton/build.json"])
            assert build["triton_version"] == triton.__version__
            module = TritonBackend().load(art.manifest, art.files)("cuda")
            assert module.ready
            if not module.serves_reference:
                assert module.backend_in_use == "triton"
                launched += 1
            rows = 8 if "conv" in path.name else 512
            _check(module, rows)
        assert compiles == [], f"compiled at load/launch: {compiles}"
        assert launched >= len(paths) // 2, f"only {launched} of {len(paths)} ran kernels"
    finally:
        triton.knobs.compilation.listener = None


def test_version_mismatch_serves_reference_then_switches(tmp_path: Path) -> None:
    ir = BlueprintIR.from_json(WIDE)
    backend = TritonBackend(tmp_path)
    cf = backend.compile(ir, _target(), CompileOptions(dtype="float32", autotune=False,
                                                      extra=KERNELS))
    files = dict(cf.files)
    build = json.loads(files["triton/build.json"])
    build["triton_version"] = "0.0.0-elsewhere"
    files["triton/build.json"] = json.dumps(build).encode()
    module = backend.load(SimpleNamespace(dtype="float32"), files)("cuda")  # type: ignore[arg-type]
    assert module.backend_in_use == "reference"
    _check(module, 256)  # served by the reference meanwhile, same parameters
    deadline = time.monotonic() + 120
    while module.backend_in_use != "triton" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert module.backend_in_use == "triton"
    module.zero_grad(set_to_none=True)
    _check(module, 256, seed=1)


def _step_grads(module: Any, xs: list[torch.Tensor], gouts: list[torch.Tensor]
                ) -> list[torch.Tensor]:
    for x in xs:
        x.grad = None
    module.zero_grad(set_to_none=True)
    out = module(*xs)
    out = list(out) if isinstance(out, tuple) else [out]
    torch.autograd.backward(out, gouts)
    return [t.detach().clone() for t in out] + [x.grad.clone() for x in xs] + [
        p.grad.clone() for p in module.parameters()]


def test_cuda_graphs_capture_the_whole_step(tmp_path: Path) -> None:
    """One autograd function, in-kernel sums (atomics + ticket) and in-kernel grad
    accumulation replay from a CUDA graph with the eager step's results (up to
    the order of the fp32 atomic adds of bias/gain sums)."""
    ir = bundled()["bottleneck_adapter"]
    backend = TritonBackend(tmp_path)
    cf = backend.compile(ir, _target(), CompileOptions(dtype="float32", autotune=False,
                                                      extra=KERNELS))
    module = backend.load(SimpleNamespace(dtype="float32"), cf.files)("cuda")  # type: ignore[arg-type]
    gen = torch.Generator(device="cuda").manual_seed(3)
    xs = [torch.randn([512 if isinstance(d, str) else d for d in i.shape], device="cuda",
                      generator=gen).requires_grad_(True) for i in module.ir.inputs]
    with torch.no_grad():
        outs = module(*xs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gouts = [torch.randn(o.shape, device="cuda", generator=gen) for o in outs]
    want = _step_grads(module, xs, gouts)
    graphed = torch.cuda.make_graphed_callables(
        module, tuple(x.detach().clone().requires_grad_(True) for x in xs))
    for _ in range(3):  # replays must not depend on what earlier ones left behind
        got = _step_grads(graphed, xs, gouts)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_tuned_artifact_decides_per_group_on_the_whole_step(tmp_path: Path) -> None:
    ir = bundled()["residual_mlp"]
    backend = TritonBackend(tmp_path)
    cf = backend.compile(ir, _target(), CompileOptions(dtype="bfloat16", autotune=True))
    plan = json.loads(cf.files["triton/plan.json"])
    report = dict(plan["meta"]["tuning"])
    serve = report.pop("serve")  # the whole plan vs the plain torch ops, timed last
    # bias + gelu and bias + add after two addmm calls: no kernel saved, so the
    # measured plan had to win by the larger margin
    assert report.pop("predicted_serve") == "reference" and serve["margin"] == 0.05
    assert report
    for row in report.values():
        assert row["impl"] in ("triton", "torch")
        assert row["triton_step_ms"] > 0 and row["torch_step_ms"] > 0
    assert serve["choice"] == plan["serve"] in ("schedule", "reference")
    assert serve["plan_step_ms"] > 0 and serve["reference_step_ms"] > 0
    module = backend.load(SimpleNamespace(dtype="bfloat16"), cf.files)("cuda")  # type: ignore[arg-type]
    assert module.ready
    assert module.backend_in_use == ("triton" if plan["serve"] == "schedule" else "reference")
    _check(module, 4096)
