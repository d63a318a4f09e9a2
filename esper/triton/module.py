"""The Triton backend's module: a ``BlueprintModule`` (same parameters, same keys,
same init as the reference) that runs the plan: torch steps for matmuls and
layout ops, fused groups through their kernels. Until its kernels are ready
(a background recompile after a Triton version mismatch) it serves the
reference implementation on the very same parameters."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from esper.compile.inputs import bind_inputs
from esper.compile.lowering import LOWERING, RunContext, node_attrs
from esper.compile.params import BlueprintModule
from esper.compile.reference import TorchBlueprintModule
from esper.ir import BlueprintIR, IRNodeType
from esper.triton.autograd import run_group
from esper.triton.plan import FusedStep, Plan, TorchStep
from esper.triton.runtime import GroupRunner, Launcher

log = logging.getLogger("esper.triton")

Kernels = dict[str, Launcher]
Call = Callable[[dict[str, torch.Tensor], dict[str, int], RunContext], None]


class TritonBlueprintModule(BlueprintModule):
    """Runs a Triton plan; checkpoints are interchangeable with the torch backend's."""

    def __init__(self, ir: BlueprintIR, plan: Plan, kernels: Kernels | None,
                 **kwargs: Any) -> None:
        super().__init__(ir, **kwargs)
        self.plan = plan
        self._attrs = node_attrs(ir)
        self._nodes = {n.id: n for n in ir.nodes}
        self._lock = threading.Lock()
        self._calls: list[Callable[[dict[str, torch.Tensor], dict[str, int], RunContext], None]]
        self._calls = []
        self._reference: TorchBlueprintModule | None = None
        self.backend_in_use = "reference"
        if kernels is not None:
            self.install(kernels)

    # -- readiness -------------------------------------------------------------

    def install(self, kernels: Kernels) -> None:
        """Switch to the given kernels (called again by a background recompile)."""
        calls = [self._make_call(s, kernels) for s in self.plan.steps]
        with self._lock:
            self._calls = calls
            self.backend_in_use = "triton"
        log.info("blueprint %r: triton kernels installed (%d steps)", self.ir.name, len(calls))

    @property
    def ready(self) -> bool:
        return self.backend_in_use == "triton"

    def _reference_module(self) -> TorchBlueprintModule:
        if self._reference is None:
            ref = TorchBlueprintModule(self.ir, dtype=self.compute_dtype, device="meta")
            ref.params = self.params  # share, never copy: one set of weights
            object.__setattr__(self, "_reference", ref)  # not a submodule: no duplicate keys
        assert self._reference is not None
        return self._reference

    # -- steps -----------------------------------------------------------------

    def _make_call(self, step: TorchStep | FusedStep, kernels: Kernels
                   ) -> Callable[[dict[str, torch.Tensor], dict[str, int], RunContext], None]:
        if isinstance(step, TorchStep):
            return self._torch_call(step)
        if step.impl == "torch":
            return self._group_torch_call(step)
        runner = GroupRunner(step, kernels[step.fwd_kernel], kernels.get(step.bwd_kernel),
                             self.compute_dtype)
        in_values = [i.value for i in step.inputs]
        params = [(j, self.param_keys[(i.param[0], i.param[1])])
                  for j, i in enumerate(step.inputs) if i.param is not None]
        out_values = [o.value for o in step.outputs]

        def call(env: dict[str, torch.Tensor], symbols: dict[str, int], ctx: RunContext) -> None:
            args = [env.get(v) for v in in_values]
            for j, key in params:
                args[j] = self.params[key]
            outs = run_group(runner, args, symbols)  # type: ignore[arg-type]
            for v, t in zip(out_values, outs, strict=True):
                env[v] = t

        return call

    def _torch_call(self, step: TorchStep
                    ) -> Callable[[dict[str, torch.Tensor], dict[str, int], RunContext], None]:
        node = self._nodes[step.node]
        attrs = self._attrs[step.node]
        keys = {n: k for (nid, n), k in self.param_keys.items() if nid == step.node}
        if node.op is IRNodeType.LINEAR and step.bias is False:
            wkey = keys["weight"]

            def mm(env: dict[str, torch.Tensor], symbols: dict[str, int], ctx: RunContext) -> None:
                env[step.out] = F.linear(env[step.inputs[0]], self.params[wkey])

            return mm
        rule = LOWERING[node.op]

        def call(env: dict[str, torch.Tensor], symbols: dict[str, int], ctx: RunContext) -> None:
            params = {n: self.params[k] for n, k in keys.items()}
            env[step.out] = rule(attrs, [env[v] for v in step.inputs], params, ctx)

        return call

    def _group_torch_call(self, step: FusedStep) -> Call:
        """A group that measured faster as plain torch ops (its bias adds included)."""
        units: list[tuple[Any, Any, str]] = []
        for u in step.units:
            if u.op == "bias":
                key = self.param_keys[(u.node, "bias")]
                units.append((u, None, key))
            else:
                units.append((u, LOWERING[IRNodeType(u.op)], ""))
        keys_of = {
            u.node: {n: k for (nid, n), k in self.param_keys.items() if nid == u.node}
            for u in step.units
        }

        def call(env: dict[str, torch.Tensor], symbols: dict[str, int], ctx: RunContext) -> None:
            for u, rule, bias_key in units:
                if rule is None:
                    env[u.out] = env[u.inputs[0]] + self.params[bias_key]
                    continue
                params = {n: self.params[k] for n, k in keys_of[u.node].items()}
                env[u.out] = rule(self._attrs[u.node], [env[v] for v in u.inputs], params, ctx)

        return call

    # -- run -------------------------------------------------------------------

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with self._lock:
            calls = self._calls
        if not calls:
            ref = self._reference_module()
            ref.train(self.training)
            return ref.run(inputs)
        symbols = bind_inputs(self.ir, inputs)
        ctx = RunContext(symbols=symbols, training=self.training)
        env: dict[str, torch.Tensor] = dict(zip(self.plan.inputs, inputs, strict=True))
        for call in calls:
            call(env, symbols, ctx)
        return tuple(env[o] for o in self.plan.outputs)
