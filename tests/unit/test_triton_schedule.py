"""The whole-blueprint schedule (one autograd function) under the Triton
interpreter: torch-op steps of every kind, groups kept on torch by tuning,
in-kernel bias/gain sums over many programs, grads added in-kernel to a grad
already there, inputs that need no grad, unused outputs, eval mode, dropout's
mask reused by backward; and the tuning decision rule with fake timers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from esper.ir import BlueprintIR
from esper.triton.plan import KernelConfig, Plan
from tests.unit.test_triton_support import check_against_float64, compile_and_load, interpret

_ = interpret


def _ir(inputs: list[dict[str, Any]], nodes: list[dict[str, Any]],
        outputs: list[str]) -> BlueprintIR:
    return BlueprintIR.from_dict({"schema_version": 1, "name": "s", "inputs": inputs,
                                  "nodes": nodes, "outputs": outputs})


def _x(name: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": "float32"}


TORCH_STEPS = _ir([_x("x", ["B", 4, 8]), _x("w", [8, 6]), _x("v", [1, 6, 4])], [
    {"id": "a", "op": "matmul", "inputs": ["x", "w"]},  # 2-D right operand
    {"id": "t", "op": "tanh", "inputs": ["a"]},
    {"id": "b", "op": "matmul", "inputs": ["t", "v"]},  # broadcast batch: torch subgraph
    {"id": "r", "op": "reshape", "inputs": ["b"], "attrs": {"shape": ["B", 16]}},
    {"id": "c", "op": "concat", "inputs": ["r", "r"], "attrs": {"dim": -1}},
    {"id": "m", "op": "mean", "inputs": ["c"], "attrs": {"dim": [0], "keepdim": True}},
    {"id": "p", "op": "permute", "inputs": ["x"], "attrs": {"dims": [0, 2, 1]}},
    {"id": "s", "op": "sigmoid", "inputs": ["p"]},
    {"id": "l", "op": "linear", "inputs": ["s"], "attrs": {"out_features": 5}},
    {"id": "g", "op": "gelu", "inputs": ["l"]}], ["c", "m", "g"])

SHARED = _ir([_x("x", ["B", 12])], [
    {"id": "n", "op": "layer_norm", "inputs": ["x"], "attrs": {"normalized_shape": [12]}},
    {"id": "h", "op": "linear", "inputs": ["n"], "attrs": {"out_features": 12}},
    {"id": "a", "op": "silu", "inputs": ["h"]},
    {"id": "y", "op": "linear", "inputs": ["n"], "attrs": {"out_features": 12}},
    {"id": "z", "op": "mul", "inputs": ["a", "y"]},
    {"id": "out", "op": "add", "inputs": ["z", "x"]}], ["out"])


# relu(x @ w) + x: the add's backward reads nothing, relu's only h; x is not saved
RESIDUAL_RELU = _ir([_x("x", ["B", 8]), _x("w", [8, 8])], [
    {"id": "h", "op": "matmul", "inputs": ["x", "w"]},
    {"id": "r", "op": "relu", "inputs": ["h"]},
    {"id": "out", "op": "add", "inputs": ["x", "r"]}], ["out"])


# found by hypothesis: relu(x0 + x1)'s backward stores one grad for both operands,
# and x0 also feeds a later group; adding that group's grad for x0 in-kernel
# leaked it into x1's grad, the same tensor
SHARED_GRAD = _ir([_x("x0", ["B", 4]), _x("x1", ["B", 4])], [
    {"id": "n0", "op": "add", "inputs": ["x1", "x0"]},
    {"id": "n1", "op": "relu", "inputs": ["x0"]},
    {"id": "n2", "op": "relu", "inputs": ["n0"]}], ["n1", "n2"])


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_grad_shared_by_two_operands_takes_no_other_consumers_grad(dtype: str) -> None:
    factory, files = compile_and_load(SHARED_GRAD, dtype)
    plan = Plan.from_json(files["triton/plan.json"])
    both = next(g for g in plan.groups() if len(g.inputs) == 2)
    assert both.bwd_acc == []
    for batch in (1, 3):
        check_against_float64(factory("cpu"), batch=batch)


@pytest.mark.usefixtures("interpret")
def test_torch_steps_of_every_kind_match_float64() -> None:
    factory, files = compile_and_load(TORCH_STEPS)
    assert Plan.from_json(files["triton/plan.json"]).groups()
    check_against_float64(factory("cpu"), batch=3)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_groups_kept_on_torch_match_float64(dtype: str) -> None:
    from esper.triton.backend import TritonBackend

    _, files = compile_and_load(SHARED, dtype)
    plan = Plan.from_json(files["triton/plan.json"])
    for g in plan.groups():
        g.impl = "torch"
    files["triton/plan.json"] = plan.to_json()
    module = TritonBackend().load(SimpleNamespace(dtype=dtype), files)("cpu")  # type: ignore[arg-type]
    assert module.ready
    check_against_float64(module, batch=4)


@pytest.mark.usefixtures("interpret")
def test_sums_over_rows_from_many_programs_and_workspace_left_zeroed(tmp_path: Path) -> None:
    from esper.triton import aot
    from esper.triton.backend import build_plan
    from esper.triton.module import TritonBlueprintModule
    from esper.triton.steps import GroupStep

    plan, source = build_plan(SHARED, "float32")
    for g in plan.groups():  # one row per block, 3 programs looping over 7 rows
        g.fwd_cfg = KernelConfig(block_r=1, num_warps=1)
        g.bwd_cfg = KernelConfig(block_r=1, num_warps=1, grid_cap=3)
    module_src = aot.import_source(source, tmp_path)
    module = TritonBlueprintModule(SHARED, plan, aot.jit_kernels(module_src, plan))
    for seed in (0, 1):  # twice: the second launch relies on the first leaving zeros
        check_against_float64(module, batch=7, seed=seed)
    assert module._schedule is not None
    runners = [s.runner for s in module._schedule.steps if isinstance(s, GroupStep)]
    assert any(r.n_partial for r in runners if r is not None)
    for r in runners:
        for ws, lock in r._ws.values():  # type: ignore[union-attr]
            assert not ws.any() and not lock.any()


@pytest.mark.usefixtures("interpret")
def test_a_grad_already_there_is_added_in_kernel() -> None:
    _, files = compile_and_load(SHARED)
    plan = Plan.from_json(files["triton/plan.json"])
    # x feeds the norm and the residual add: the norm's backward adds the other grad
    assert any(g.bwd_acc for g in plan.groups())
    assert "has_prev_" in files["kernels/esper_kernels.py"].decode()


@pytest.mark.usefixtures("interpret")
def test_inputs_without_grad_unused_outputs_and_eval_mode() -> None:
    factory, _ = compile_and_load(TORCH_STEPS)
    module = factory("cpu")
    x = torch.randn(2, 4, 8)
    w = torch.randn(8, 6, requires_grad=True)
    v = torch.randn(1, 6, 4)
    _c, _m, g = module(x, w, v)
    g.sum().backward()  # c and m get no grad at all
    assert x.grad is None and w.grad is None  # w reaches only c and m
    assert all(p.grad is not None for p in module.parameters())  # the linear before g
    module.eval()
    with torch.no_grad():
        ref = [t.clone() for t in module(x, w, v)]
    for a, b in zip(module(x, w, v), ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.usefixtures("interpret")
def test_dropout_backward_reuses_the_forward_mask() -> None:
    ir = _ir([_x("x", ["B", 8])], [
        {"id": "d", "op": "dropout", "inputs": ["x"], "attrs": {"p": 0.5}},
        {"id": "out", "op": "relu", "inputs": ["d"]}], ["out"])
    factory, _ = compile_and_load(ir)
    module = factory("cpu")
    module.train()
    x = (torch.rand(64, 8) + 0.1).requires_grad_(True)  # positive: relu passes all
    out = module(x)
    out.backward(torch.ones_like(out))
    assert x.grad is not None
    torch.testing.assert_close(out, x.detach() * x.grad)
    assert 0 < int((out == 0).sum()) < out.numel()


def test_tuning_keeps_torch_only_when_the_whole_step_is_faster() -> None:
    from esper.triton.backend import build_plan
    from esper.triton.tune import autotune, candidates

    plan, _ = build_plan(SHARED, "float32")
    names = [g.name for g in plan.groups()]
    assert len(names) >= 2
    slower_on_torch, faster_on_torch = names[0], names[1]

    def kernel_ms(g: Any, which: str, cfg: KernelConfig) -> float:
        return float(cfg.block_r)  # the smallest block wins

    def step_ms(p: Plan) -> dict[str, float]:
        impl = {g.name: g.impl for g in p.groups()}
        ms = 1.0
        ms += 0.5 if impl[slower_on_torch] == "torch" else 0.0
        ms -= 0.2 if impl[faster_on_torch] == "torch" else 0.0
        return {"step": ms, "graphed": ms / 2}

    report = autotune(plan, kernel_ms, step_ms)
    impls = {g.name: g.impl for g in plan.groups()}
    assert impls[slower_on_torch] == "triton" and impls[faster_on_torch] == "torch"
    assert all(n == faster_on_torch or impls[n] == "triton" for n in names)
    assert report[faster_on_torch]["torch_step_ms"] < report[faster_on_torch]["triton_step_ms"]
    assert json.loads(plan.to_json())["steps"]
    for g in plan.groups():
        assert g.fwd_cfg is not None
        assert g.fwd_cfg.block_r == min(c.block_r for c in candidates(g.fwd, g.c))


def _outputs_and_grads(module: Any, xs: list[torch.Tensor], gouts: list[torch.Tensor]
                       ) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    module.zero_grad(set_to_none=True)
    out = module(*leaves)
    out = list(out) if isinstance(out, tuple) else [out]
    torch.autograd.backward(out, gouts)
    return [*(o.detach() for o in out), *(x.grad for x in leaves),
            *(p.grad for p in module.parameters())]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("ir", [TORCH_STEPS, SHARED, RESIDUAL_RELU],
                         ids=["torch_steps", "shared", "residual_relu"])
def test_generated_host_code_matches_the_step_objects(ir: BlueprintIR) -> None:
    """Two implementations of one backward: the generated straight-line host code
    and the step objects walked generically must agree to the last bit or so."""
    factory, _ = compile_and_load(ir)
    module = factory("cpu")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn([3 if isinstance(d, str) else d for d in i.shape], generator=gen)
          for i in module.ir.inputs]
    with torch.no_grad():
        outs = module(*xs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gouts = [torch.randn(o.shape, generator=gen) for o in outs]
    assert module._schedule is not None
    generated = _outputs_and_grads(module, xs, gouts)
    source = next(iter(module._schedule._programs.values())).source
    assert "def forward(" in source and "def backward(" in source
    module._schedule.generated = False
    reference = _outputs_and_grads(module, xs, gouts)
    for a, b in zip(generated, reference, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("interpret")
def test_bench_blocks_need_no_generic_steps() -> None:
    """The blocks the benchmark times run entirely as generated code."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_triton import CASES, case_ir  # type: ignore[import-not-found]

    for name in CASES:
        factory, _ = compile_and_load(case_ir(name))
        module = factory("cpu")
        assert module._schedule is not None
        prog = module._schedule.program((True,) * (len(module.ir.inputs)
                                                   + len(module._pkeys)))
        assert "_S" not in prog.source, (name, prog.source)


def test_a_torch_subgraph_keeps_only_what_its_ops_saved() -> None:
    from torch.multiprocessing.reductions import StorageWeakRef

    from esper.triton.steps import Call, Grads, TorchGraphStep

    def scale(xs: list[torch.Tensor], ps: list[torch.Tensor], sym: dict[str, int],
              training: bool) -> list[torch.Tensor]:
        return [xs[0] * 0.125]

    step = TorchGraphStep(ins=(0,), outs=(1,), fn=scale, training=[True])
    x = torch.randn(4, 8)
    storage = StorageWeakRef(x.untyped_storage())
    call = Call(env=[x, None], params=[], symbols={})
    step.forward(call, 0, True)
    y = call.env[1]
    call.env[0] = None
    del x
    assert storage.expired()  # a scale saves nothing: its input must not outlive forward
    grads = Grads(slots=[None, None], params=[], need=[True, True], pneed=[])
    g = torch.randn_like(y)
    step.backward(call, 0, [g], grads)
    torch.testing.assert_close(grads.slots[0], g * 0.125)


@pytest.mark.usefixtures("interpret")
def test_a_group_saves_only_what_its_backward_reads() -> None:
    from esper.triton.steps import GroupStep

    factory, _ = compile_and_load(RESIDUAL_RELU)
    module = factory("cpu")
    sched = module._schedule
    groups = [st for st in sched.steps if isinstance(st, GroupStep)]
    assert groups and all(st.plain for st in groups)
    # relu(h) + x: the backward recomputes relu from h and never reads x
    (group,) = groups
    assert group.saves == (sched.steps[0].outs[0],)
    check_against_float64(module)
    residual = _ir([_x("x", ["B", 8]), _x("w", [8, 8])], [
        {"id": "h", "op": "matmul", "inputs": ["x", "w"]},
        {"id": "out", "op": "add", "inputs": ["x", "h"]}], ["out"])
    module = compile_and_load(residual)[0]("cpu")
    (group,) = [st for st in module._schedule.steps if isinstance(st, GroupStep)]
    # a residual add's grads are the incoming grad: nothing saved, nothing launched
    assert group.saves == () and group.runner is not None and group.runner.bwd_noop
    check_against_float64(module)


class _RawRecorder:
    """A launcher that takes raw device addresses (as shipped binaries do) and only
    records what it was given."""

    raw_pointers = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def launch(self, grid: int, args: Any, cfg: Any) -> None:
        self.calls.append(tuple(args))

    def bind(self, cfg: Any) -> Any:
        return lambda grid, *args: self.calls.append(args)


def test_raw_pointer_launchers_get_addresses_and_cpu_tensors_a_clear_error() -> None:
    from esper.triton.backend import build_plan
    from esper.triton.module import TritonBlueprintModule

    plan, _ = build_plan(SHARED, "float32")
    rec = _RawRecorder()
    kernels = {k: rec for g in plan.groups() for k in (g.fwd_kernel, g.bwd_kernel)}
    module = TritonBlueprintModule(SHARED, plan, kernels)  # type: ignore[arg-type]
    xs = [torch.randn([3 if isinstance(d, str) else d for d in i.shape], requires_grad=True)
          for i in SHARED.inputs]
    with pytest.raises(ValueError, match="must be on a CUDA device, got tensors on cpu"):
        module(*xs)
    assert not rec.calls, "nothing may launch with a host address"
    assert module._schedule is not None
    source = next(iter(module._schedule._programs.values())).source
    assert ".data_ptr()" in source and "_need_cuda(" in source


def test_tuning_keeps_the_fused_plan_only_when_it_beats_plain_torch_ops() -> None:
    from esper.triton.backend import build_plan
    from esper.triton.tune import autotune

    def kernel_ms(g: Any, which: str, cfg: KernelConfig) -> float:
        return float(cfg.block_r)

    def step_ms(p: Plan) -> dict[str, float]:
        return {"step": 1.0}

    for ref_ms, want in ((0.9, "reference"), (1.01, "reference"), (1.03, "schedule"),
                         (1.2, "schedule")):
        plan, _ = build_plan(SHARED, "float32")
        report = autotune(plan, kernel_ms, step_ms, reference_ms=lambda ms=ref_ms: {"step": ms})
        assert plan.serve == want, (ref_ms, plan.serve)
        assert report["serve"] == {"choice": want, "plan_step_ms": 1.0,
                                   "reference_step_ms": ref_ms, "margin": 0.02}
        assert Plan.from_json(plan.to_json()).serve == want


@pytest.mark.usefixtures("interpret")
def test_an_artifact_that_serves_the_reference_runs_torch_ops_and_ships_no_kernels() -> None:
    from types import SimpleNamespace

    from esper.compile.reference import build_module
    from esper.triton import aot
    from esper.triton.backend import TritonBackend

    _, files = compile_and_load(SHARED)
    plan = Plan.from_json(files["triton/plan.json"])
    plan.serve = "reference"
    files["triton/plan.json"] = plan.to_json()
    assert aot.kernel_requests(plan) == []
    module = TritonBackend().load(SimpleNamespace(dtype="float32"), files)("cpu")  # type: ignore[arg-type]
    assert module.ready and module.serves_reference and module.backend_in_use == "reference"
    check_against_float64(module)
    ref = build_module(module.ir)  # the artifact's canonical IR: its node ids
    ref.load_state_dict(module.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(module(x), ref(x), rtol=0, atol=0)
