"""The Triton backend's module: a ``BlueprintModule`` (same parameters, same keys,
same init as the reference) that runs the plan as one schedule: cuBLAS/cuDNN
calls and fused kernel launches under a single autograd function
(``esper.triton.autograd``). Until its kernels are ready (a background recompile
after a Triton version mismatch) it serves the reference implementation on the
very same parameters."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from esper.compile.inputs import bind_inputs
from esper.compile.lowering import LOWERING, RunContext, node_attrs
from esper.compile.params import BlueprintModule
from esper.compile.reference import TorchBlueprintModule
from esper.ir import BlueprintIR, IRNodeType
from esper.triton.autograd import Schedule
from esper.triton.plan import FusedStep, Plan, TorchStep
from esper.triton.runtime import GroupRunner, Launcher
from esper.triton.steps import (
    ConvStep,
    GroupStep,
    LinearStep,
    MatmulStep,
    PermuteStep,
    ReshapeStep,
    Step,
    TorchGraphStep,
)

log = logging.getLogger("esper.triton")

Kernels = dict[str, Launcher]
Op = IRNodeType


class ServedTorchOpsModule(TorchBlueprintModule):
    """A Triton artifact whose plan serves the blueprint's torch ops: the reference
    module itself, so a step costs what eager's does and nothing more (no wrapper
    call, no schedule). It is ready by design: those ops are its kernels."""

    ready = True
    serves_reference = True
    backend_in_use = "reference"

    def __init__(self, ir: BlueprintIR, plan: Plan, **kwargs: Any) -> None:
        super().__init__(ir, **kwargs)
        self.plan = plan


class TritonBlueprintModule(BlueprintModule):
    """Runs a Triton plan; checkpoints are interchangeable with the torch backend's.
    A plan that serves torch ops loads as ``ServedTorchOpsModule`` instead, so this
    module runs the reference only while its kernels are not installed."""

    serves_reference = False

    def __init__(self, ir: BlueprintIR, plan: Plan, kernels: Kernels | None,
                 **kwargs: Any) -> None:
        super().__init__(ir, **kwargs)
        self.plan = plan
        self._attrs = node_attrs(ir)
        self._nodes = {n.id: n for n in ir.nodes}
        self._pkeys = list(self.param_keys.values())  # the schedule's parameter order
        self._pindex = {nk: i for i, nk in enumerate(self.param_keys)}
        self._training = [self.training]  # read by torch-op steps (dropout)
        self._lock = threading.Lock()
        self._schedule: Schedule | None = None
        self._symbols: dict[tuple[Any, ...], dict[str, int]] = {}
        self._reference: TorchBlueprintModule | None = None
        self.backend_in_use = "reference"
        if kernels is not None:
            self.install(kernels)

    # -- readiness -------------------------------------------------------------

    def install(self, kernels: Kernels) -> None:
        """Switch to the given kernels (called again by a background recompile)."""
        schedule = self._build(kernels)
        with self._lock:
            self._schedule = schedule
            self.backend_in_use = "triton"
        log.info("blueprint %r: triton kernels installed (%d steps)", self.ir.name,
                 len(schedule.steps))

    @property
    def ready(self) -> bool:
        return self.backend_in_use == "triton"

    def train(self, mode: bool = True) -> TritonBlueprintModule:
        super().train(mode)
        self._training[0] = mode
        return self

    def _reference_module(self) -> TorchBlueprintModule:
        if self._reference is None:
            ref = TorchBlueprintModule(self.ir, dtype=self.compute_dtype, device="meta")
            ref.params = self.params  # share, never copy: one set of weights
            object.__setattr__(self, "_reference", ref)  # not a submodule: no duplicate keys
        assert self._reference is not None
        return self._reference

    # -- schedule ---------------------------------------------------------------

    def _build(self, kernels: Kernels) -> Schedule:
        slots: dict[str, int] = {}

        def slot(v: str) -> int:
            return slots.setdefault(v, len(slots))

        for v in self.plan.inputs:
            slot(v)
        steps: list[Step] = []
        for s in self.plan.steps:
            if isinstance(s, TorchStep):
                steps.append(self._torch_step(s, slot))
            elif s.impl == "torch":
                steps.append(self._group_torch_step(s, slot))
            else:
                runner = GroupRunner(s, kernels[s.fwd_kernel], kernels.get(s.bwd_kernel),
                                     self.compute_dtype)
                args = tuple(("param", self._pindex[(i.param[0], i.param[1])])
                             if i.param is not None else ("slot", slot(i.value))
                             for i in s.inputs)
                ins = tuple(i for kind, i in args if kind == "slot")
                pins = tuple(i for kind, i in args if kind == "param")
                plain = self._plain_group(s, runner)
                # a plain group's full inputs have its output's shape: one its backward
                # does not read is not saved (the grad stands in for its pointer)
                saves = tuple(i for j, (kind, i) in enumerate(args) if kind == "slot" and (
                    not plain or j in runner.bwd_used or s.inputs[j].kind != "full"))
                steps.append(GroupStep(ins=ins, outs=tuple(slot(o.value) for o in s.outputs),
                                       pins=pins, saves=saves, runner=runner, args=args,
                                       plain=plain))
        return Schedule(steps, len(slots), [slots[v] for v in self.plan.inputs],
                        [slot(v) for v in self.plan.outputs], len(self._pkeys),
                        dtype=self.compute_dtype)

    def _plain_group(self, step: FusedStep, runner: GroupRunner) -> bool:
        """One full output shaped like its first full input (of the frame's rank)."""
        if not runner.plain_fwd or len(step.outputs) != 1 or runner.bwd is None:
            return False
        assert runner.full_input is not None
        name = step.inputs[runner.full_input].value.removesuffix("#mm")
        shapes = self.ir.infer_shapes()
        shape = shapes[name].shape if name in shapes else None
        return shape is not None and len(shape) == len(step.frame)

    def _params_of(self, node: str) -> dict[str, int]:
        return {n: i for (nid, n), i in self._pindex.items() if nid == node}

    def _torch_step(self, step: TorchStep, slot: Any) -> Step:
        node = self._nodes[step.node]
        a = self._attrs[step.node]
        ins = tuple(slot(v) for v in step.inputs)
        outs = (slot(step.out),)
        prm = self._params_of(step.node)
        if node.op is Op.LINEAR:
            bias = bool(step.bias) and "bias" in prm
            pins = (prm["weight"], prm["bias"]) if bias else (prm["weight"],)
            return LinearStep(ins=ins, outs=outs, pins=pins, saves=ins, bias=bias)
        if node.op is Op.CONV2D and isinstance(a["padding"], tuple):
            bias = "bias" in prm
            pins = (prm["weight"], prm["bias"]) if bias else (prm["weight"],)
            return ConvStep(ins=ins, outs=outs, pins=pins, saves=ins, stride=a["stride"],
                            padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                            bias=bias)
        if node.op is Op.MATMUL and self._plain_matmul(step):
            return MatmulStep(ins=ins, outs=outs, saves=ins)
        if node.op is Op.PERMUTE:
            return PermuteStep(ins=ins, outs=outs, dims=tuple(a["dims"]))
        if node.op is Op.RESHAPE:
            return ReshapeStep(ins=ins, outs=outs, shape=tuple(a["shape"]))
        rule = LOWERING[node.op]
        names = list(prm)

        def fn(xs: list[torch.Tensor], ps: list[torch.Tensor], symbols: dict[str, int],
               training: bool) -> list[torch.Tensor]:
            ctx = RunContext(symbols=symbols, training=training)
            return [rule(a, xs, dict(zip(names, ps, strict=True)), ctx)]

        return TorchGraphStep(ins=ins, outs=outs, pins=tuple(prm.values()), fn=fn,
                              training=self._training)

    def _plain_matmul(self, step: TorchStep) -> bool:
        """Operands with identical batch dims, or a 2-D right operand: no broadcast."""
        shapes = self.ir.infer_shapes()
        a, b = (tuple(shapes[v].shape) for v in step.inputs)
        if len(a) < 2 or len(b) < 2:
            return False
        return len(b) == 2 or a[:-2] == b[:-2]

    def _group_torch_step(self, step: FusedStep, slot: Any) -> Step:
        """A group that measured faster as plain torch ops (its bias adds included)."""
        inside = {u.out for u in step.units}
        ext: list[str] = []
        pins: list[int] = []
        for u in step.units:
            ext.extend(v for v in u.inputs if v not in inside and v not in ext)
            for i in self._params_of(u.node).values():
                if i not in pins:
                    pins.append(i)
        pos = {i: j for j, i in enumerate(pins)}
        plan_units: list[tuple[Any, Any, dict[str, int]]] = []
        for u in step.units:
            prm = {n: pos[i] for n, i in self._params_of(u.node).items()}
            if u.op == "bias":
                plan_units.append((u, None, {"bias": prm["bias"]}))
            else:
                plan_units.append((u, LOWERING[IRNodeType(u.op)], prm))
        outputs = [o.value for o in step.outputs]
        attrs = self._attrs

        def fn(xs: list[torch.Tensor], ps: list[torch.Tensor], symbols: dict[str, int],
               training: bool) -> list[torch.Tensor]:
            env = dict(zip(ext, xs, strict=True))
            ctx = RunContext(symbols=symbols, training=training)
            for u, rule, prm in plan_units:
                if rule is None:
                    env[u.out] = env[u.inputs[0]] + ps[prm["bias"]]
                else:
                    env[u.out] = rule(attrs[u.node], [env[v] for v in u.inputs],
                                      {n: ps[i] for n, i in prm.items()}, ctx)
            return [env[o] for o in outputs]

        return TorchGraphStep(ins=tuple(slot(v) for v in ext),
                              outs=tuple(slot(v) for v in outputs), pins=tuple(pins), fn=fn,
                              training=self._training)

    # -- run -------------------------------------------------------------------

    def _bind(self, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
        key = tuple(t.shape for t in inputs)
        symbols = self._symbols.get(key)
        if symbols is None:
            symbols = bind_inputs(self.ir, inputs)  # validates; remembered per shape
            if len(self._symbols) < 64:
                self._symbols[key] = symbols
        return symbols

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        schedule = self._schedule
        if schedule is None:
            ref = self._reference_module()
            ref.train(self.training)
            return ref.run(inputs)
        # the ParameterDict's own mapping (what functional_call swaps), without
        # its per-key __getitem__ overhead
        params = self.params._parameters
        ps = [params[k] for k in self._pkeys]
        return schedule.run(inputs, ps, self._bind(inputs))  # type: ignore[arg-type]
