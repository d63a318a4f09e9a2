"""Compile-time measurement on a GPU of the target's arch. Two kinds of timing:
each candidate config of each group kernel on the GPU alone (a CUDA graph of
several launches, so host overhead, the same for every config, stays out), and
the WHOLE forward+backward step of the blueprint with a group on its kernels
vs on torch ops, and vs the blueprint's plain torch ops, at the validator's
performance shape (steps back to back as a training loop runs them, host
overhead in). ``tune.autotune``
decides; the choices ship in the plan."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from esper.compile.dtypes import torch_dtype
from esper.ir import BlueprintIR
from esper.triton import aot
from esper.triton.plan import FusedStep, KernelConfig, Plan
from esper.triton.runtime import GroupRunner
from esper.triton.serve import margin
from esper.triton.tune import autotune, tune_rows

GRAPH_LAUNCHES = 10


def _bench(fn: Callable[[], Any], rep: int = 40) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def graphed_ms(fn: Callable[[], Any], launches: int = 1) -> float:
    """Milliseconds of ``fn`` replayed from a CUDA graph (``launches`` copies
    captured back to back): device time without host overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (loads, allocations) off the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    ms = _bench(graph.replay) / launches
    del graph
    return ms


def _bind(frame: list[Any], rows: int) -> dict[str, int]:
    syms = [d for d in frame[:-1] if isinstance(d, str)]
    static = math.prod(int(d) for d in frame[:-1] if isinstance(d, int))
    out = {s: 1 for s in syms}
    if syms:
        out[syms[0]] = max(1, rows // static)
    return out


def _shape(shape: Any, symbols: dict[str, int]) -> list[int]:
    return [symbols.get(d, 1) if isinstance(d, str) else int(d) for d in shape]


# Whole-step decisions are made at the validator's performance shape (its
# ``perf_elements``): the first input holds about 4M elements, the k-th other
# symbol is 16 + k. A block is host-bound or not at the size it is judged at.
STEP_ELEMS = 1 << 22
STEP_OTHER = 16


def step_symbols(ir: BlueprintIR) -> dict[str, int]:
    """Symbols for a whole-step timing: the first symbol (the batch) sized so the
    first input holds about ``STEP_ELEMS`` elements."""
    syms: list[str] = []
    for i in ir.inputs:
        syms.extend(d for d in i.shape if isinstance(d, str) and d not in syms)
    out = {s: STEP_OTHER + k - 1 for k, s in enumerate(syms) if k}
    if syms:
        per_row = math.prod(_shape(ir.inputs[0].shape, {**out, syms[0]: 1}))
        out[syms[0]] = max(1, STEP_ELEMS // max(1, per_row))
    return out


def loop_ms(fn: Callable[[], Any], steps: int = 20, rounds: int = 5) -> float:
    """Milliseconds per call of ``fn`` called back to back as a training loop calls
    its step (one sync per round, host and GPU overlapping); best round."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / steps * 1e3)
    return best


class Compiler:
    """Kernels compiled in this process for the local GPU, one per (kernel, config)."""

    def __init__(self, module: Any, dtype: str, target: str) -> None:
        self.module, self.dtype, self.target = module, dtype, target
        self._done: dict[tuple[Any, ...], aot.BinaryLauncher] = {}

    def get(self, g: FusedStep, which: str, cfg: KernelConfig) -> aot.BinaryLauncher:
        key = (g.name, which, cfg.block_r, cfg.num_warps, cfg.num_stages)
        if key not in self._done:
            req = aot.kernel_request(g, which, cfg, self.dtype)
            self._done[key] = aot.compile_local(self.module, req, self.target)
        return self._done[key]

    def kernels(self, plan: Plan) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g in plan.groups():
            if g.impl == "triton":
                assert g.fwd_cfg is not None and g.bwd_cfg is not None
                out[g.fwd_kernel] = self.get(g, "fwd", g.fwd_cfg)
                out[g.bwd_kernel] = self.get(g, "bwd", g.bwd_cfg)
        return out


class _GroupBench:
    """Random inputs for one group at tuning size; GPU time of one kernel launch."""

    def __init__(self, g: FusedStep, ir: BlueprintIR, dtype: torch.dtype,
                 compiler: Compiler) -> None:
        schemas = ir.infer_shapes()
        pshapes = ir.param_shapes()
        self.symbols = _bind(g.frame, tune_rows(g))
        self.g, self.dtype, self.compiler = g, dtype, compiler
        # a private generator: the default one may be registered with CUDA graphs
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.inputs: list[torch.Tensor] = []
        for i in g.inputs:
            if i.param is not None:
                shape = _shape(pshapes[i.param[0]][i.param[1]], self.symbols)
            else:
                shape = _shape(schemas[i.value.removesuffix("#mm")].shape, self.symbols)
            self.inputs.append(torch.randn(shape, device="cuda", dtype=dtype, generator=gen))
        self.grads = [torch.randn(_shape(o.shape, self.symbols), device="cuda", dtype=dtype,
                                  generator=gen) for o in g.outputs]

    def time(self, which: str, cfg: KernelConfig) -> float:
        g = self.g
        launcher = self.compiler.get(g, which, cfg)
        if which == "fwd":
            g.fwd_cfg = cfg
            runner = GroupRunner(g, launcher, None, self.dtype)
            return graphed_ms(lambda: runner.forward(self.inputs, self.symbols), GRAPH_LAUNCHES)
        g.bwd_cfg = cfg
        runner = GroupRunner(g, launcher, launcher, self.dtype)
        return graphed_ms(lambda: runner.backward(self.inputs, self.grads, self.symbols),
                          GRAPH_LAUNCHES)


class StepBench:
    """One module of the blueprint at tuning size: a whole forward+backward step."""

    def __init__(self, ir: BlueprintIR, plan: Plan, dtype: torch.dtype,
                 compiler: Compiler) -> None:
        from esper.triton.module import TritonBlueprintModule

        self.plan, self.compiler = plan, compiler
        self.module = TritonBlueprintModule(ir, plan, None, dtype=dtype, device="cuda")
        symbols = step_symbols(ir)
        gen = torch.Generator(device="cuda").manual_seed(1)
        self.inputs = [torch.randn(_shape(i.shape, symbols), device="cuda", dtype=dtype,
                                   generator=gen).requires_grad_(True) for i in ir.inputs]
        self._reference: Any = None
        with torch.no_grad():
            outs = self._outputs(self.module)  # no kernels installed yet: the reference runs
        self.grads = [torch.randn(o.shape, device="cuda", dtype=dtype, generator=gen)
                      for o in outs]

    def _outputs(self, module: Any) -> list[torch.Tensor]:
        out = module(*self.inputs)
        return list(out) if isinstance(out, tuple) else [out]

    def step(self, module: Any = None) -> None:
        module = self.module if module is None else module
        for t in self.inputs:
            t.grad = None
        for p in module.parameters():
            p.grad = None
        torch.autograd.backward(self._outputs(module), self.grads)

    def __call__(self, plan: Plan) -> dict[str, float]:
        # No CUDA-graph capture of this step here: a capture binds the leaves'
        # grad-accumulation nodes to its side stream, and every later step of the
        # same module then paid cross-stream syncs (measured: one plan timed 0.55
        # then 0.80 ms), which skewed each decision toward whatever was timed first.
        self.module.install(self.compiler.kernels(plan))
        return {"step": loop_ms(self.step)}

    def reference(self) -> dict[str, float]:
        """The same step through the blueprint's plain torch ops (eager autograd)."""
        if self._reference is None:  # built once: tuning times it more than once
            from esper.compile.reference import build_module

            self._reference = build_module(self.module.ir, device="cuda",
                                           dtype=self.module.compute_dtype)
        ref = self._reference
        return {"step": loop_ms(lambda: self.step(ref))}


def measure_and_tune(plan: Plan, ir: BlueprintIR, source: str, cache_dir: Path,
                     arch: int, *, decide_serve: bool = True) -> dict[str, Any]:
    """Tune ``plan`` in place on the local GPU; returns the measurement report.
    ``decide_serve``: also time the plan against the blueprint's torch ops and set
    ``plan.serve`` (False: the caller fixed it)."""
    module = aot.import_source(source, cache_dir / "src")
    dtype = torch_dtype(plan.dtype)
    compiler = Compiler(module, plan.dtype, f"cuda:sm_{arch}")
    groups = {g.name: _GroupBench(g, ir, dtype, compiler) for g in plan.groups()}
    step = StepBench(ir, plan, dtype, compiler)
    for g in plan.groups():  # torch-only groups still need shapes; start all on triton
        g.impl = "triton"
    return autotune(plan, lambda g, which, cfg: groups[g.name].time(which, cfg), step, arch,
                    reference_ms=step.reference if decide_serve else None,
                    serve_margin=margin(plan))
