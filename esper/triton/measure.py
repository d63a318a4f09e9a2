"""Compile-time measurement on a GPU of the target's arch: time each group's
kernels under candidate configs and the group as plain torch ops (forward +
backward), then let ``tune.autotune`` keep the fastest. Runs only in compile
workers that have such a GPU; the choices ship in the plan."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from esper.compile.dtypes import torch_dtype
from esper.compile.lowering import LOWERING, RunContext, node_attrs
from esper.ir import BlueprintIR, IRNodeType
from esper.triton import aot
from esper.triton.plan import FusedStep, KernelConfig, Plan
from esper.triton.runtime import GroupRunner
from esper.triton.tune import autotune, tune_rows


def _bind(frame: list[Any], rows: int) -> dict[str, int]:
    syms = [d for d in frame[:-1] if isinstance(d, str)]
    static = math.prod(int(d) for d in frame[:-1] if isinstance(d, int))
    out = {s: 1 for s in syms}
    if syms:
        out[syms[0]] = max(1, rows // static)
    return out


def _shape(shape: Any, symbols: dict[str, int]) -> list[int]:
    return [symbols.get(d, 1) if isinstance(d, str) else int(d) for d in shape]


class _GroupBench:
    """Random inputs for one group at tuning size, and timers for its three variants."""

    def __init__(self, g: FusedStep, ir: BlueprintIR, module: Any, dtype: torch.dtype) -> None:
        schemas = ir.infer_shapes()
        pshapes = ir.param_shapes()
        self.symbols = _bind(g.frame, tune_rows(g))
        self.g, self.dtype = g, dtype
        self.attrs = node_attrs(ir)
        self.inputs: list[torch.Tensor] = []
        # a private generator: the default one may be registered with CUDA graphs
        self.gen = torch.Generator(device="cuda").manual_seed(0)
        for i in g.inputs:
            if i.param is not None:
                shape = _shape(pshapes[i.param[0]][i.param[1]], self.symbols)
            else:
                name = i.value.removesuffix("#mm")
                shape = _shape(schemas[name].shape, self.symbols)
            self.inputs.append(torch.randn(shape, device="cuda", dtype=dtype,
                                           generator=self.gen))
        self.fwd = aot.JitLauncher(getattr(module, g.fwd_kernel))
        self.bwd = aot.JitLauncher(getattr(module, g.bwd_kernel))

    def time(self, which: str, cfg: KernelConfig | None) -> float:
        from triton.testing import do_bench

        g = self.g
        if which == "torch":
            return self._torch()
        if which == "fwd":
            g.fwd_cfg = cfg
        else:
            g.bwd_cfg = cfg
        runner = GroupRunner(g, self.fwd, self.bwd, self.dtype)
        outs = runner.forward(self.inputs, self.symbols)
        if which == "fwd":
            return float(do_bench(lambda: runner.forward(self.inputs, self.symbols),
                                  warmup=5, rep=20, return_mode="median"))
        grads = [torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=self.gen)
                 for o in outs]
        return float(do_bench(lambda: runner.backward(self.inputs, grads, self.symbols),
                              warmup=5, rep=20, return_mode="median"))

    def _torch(self) -> float:
        from triton.testing import do_bench

        g = self.g
        leaves = [t.detach().requires_grad_(True) for t in self.inputs]
        ctx = RunContext(symbols=self.symbols, training=True)

        def step() -> None:
            env = {i.value: t for i, t in zip(g.inputs, leaves, strict=True)}
            for u in g.units:
                if u.op == "bias":
                    env[u.out] = env[u.inputs[0]] + env[f"{u.node}.bias"]
                    continue
                params = {k: env[f"{u.node}.{k}"] for k in ("weight", "bias")
                          if f"{u.node}.{k}" in env}
                env[u.out] = LOWERING[IRNodeType(u.op)](
                    self.attrs[u.node], [env[v] for v in u.inputs], params, ctx)
            outs = [env[o.value] for o in g.outputs]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return float(do_bench(step, warmup=5, rep=20, return_mode="median"))


def measure_and_tune(plan: Plan, ir: BlueprintIR, source: str, cache_dir: Path,
                     arch: int) -> dict[str, Any]:
    """Tune ``plan`` in place on the local GPU; returns the measurement report."""
    module = aot.import_source(source, cache_dir / "src")
    dtype = torch_dtype(plan.dtype)
    benches = {g.name: _GroupBench(g, ir, module, dtype) for g in plan.groups()}
    return autotune(plan, lambda g, which, cfg: benches[g.name].time(which, cfg), arch)
