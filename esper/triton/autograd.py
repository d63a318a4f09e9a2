"""The whole blueprint as ONE ``torch.autograd.Function``: a forward schedule
(cuBLAS/cuDNN calls and fused kernel launches, no per-op autograd nodes) and a
hand-written backward schedule that walks the steps in reverse. Only the
tensors some backward step reads are saved; cheap elementwise values are
recomputed by the fused backward kernels. Per step, autograd's bookkeeping
(one node, one Python round trip per op) is what a small block paid before."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esper.triton.steps import Call, Grads, Step


@dataclass
class _Needs:
    """Which slots and steps take part in backward, for one requires-grad pattern."""

    slot: list[bool]
    param: list[bool]
    step: list[bool]
    saved: tuple[int, ...]


class Schedule:
    """Steps over numbered slots; ``run`` picks the autograd or the plain path."""

    def __init__(self, steps: list[Step], n_slots: int, input_slots: Sequence[int],
                 output_slots: Sequence[int], n_params: int, *,
                 dtype: torch.dtype = torch.float32) -> None:
        self.steps = steps
        self.dtype = dtype
        self.generated = True  # False: the step objects' own backward (the reference)
        self._programs: dict[tuple[bool, ...], Any] = {}
        self.n_slots = n_slots
        self.input_slots = tuple(input_slots)
        self.output_slots = tuple(output_slots)
        self.n_inputs = len(self.input_slots)
        self.n_params = n_params
        self._needs: dict[tuple[bool, ...], _Needs] = {}

    def needs(self, flags: tuple[bool, ...]) -> _Needs:
        """``flags``: requires-grad of each input, then of each parameter."""
        got = self._needs.get(flags)
        if got is not None:
            return got
        slot = [False] * self.n_slots
        for s, f in zip(self.input_slots, flags, strict=False):
            slot[s] = slot[s] or f
        param = list(flags[self.n_inputs:])
        step = []
        saved: list[int] = []
        for st in self.steps:
            rec = any(slot[i] for i in st.ins) or any(param[p] for p in st.pins)
            step.append(rec)
            for o in st.outs:
                slot[o] = rec
            if rec:
                saved.extend(s for s in st.saves if s not in saved)
        got = _Needs(slot, param, step, tuple(saved))
        self._needs[flags] = got
        return got

    def run(self, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
            symbols: dict[str, int]) -> tuple[torch.Tensor, ...]:
        if torch.is_grad_enabled():
            for t in (*params, *inputs):  # parameters first: in training they need grads
                if t.requires_grad:
                    return BlueprintFunction.apply(self, symbols, *inputs, *params)  # type: ignore[no-any-return]
        env: list[Any] = [None] * self.n_slots
        for s, t in zip(self.input_slots, inputs, strict=True):
            env[s] = t
        call = Call(env, params, symbols)
        for i, st in enumerate(self.steps):
            st.forward(call, i, False)
        return tuple(env[s] for s in self.output_slots)

    # -- autograd path ----------------------------------------------------------

    def forward(self, ctx: Any, symbols: dict[str, int], tensors: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, ...]:
        n = self.n_inputs
        needs = self.needs(tuple(ctx.needs_input_grad[2:]))
        env: list[Any] = [None] * self.n_slots
        for s, t in zip(self.input_slots, tensors[:n], strict=True):
            env[s] = t
        params = tensors[n:]
        call = Call(env, params, symbols)
        for i, (st, rec) in enumerate(zip(self.steps, needs.step, strict=True)):
            st.forward(call, i, rec)
        ctx.save_for_backward(*(env[s] for s in needs.saved), *params)
        ctx.needs, ctx.keep, ctx.symbols = needs, call.keep, symbols
        outs: list[torch.Tensor] = []
        for s in self.output_slots:
            o = env[s]
            # an output that is an input or an earlier output must be its own tensor
            if any(o is t for t in tensors[:n]) or any(o is r for r in outs):
                o = o.view_as(o)
            outs.append(o)
        return tuple(outs)

    def backward(self, ctx: Any, gouts: Sequence[torch.Tensor | None]
                 ) -> tuple[torch.Tensor | None, ...]:
        needs: _Needs = ctx.needs
        saved = ctx.saved_tensors
        k = len(needs.saved)
        env: list[Any] = [None] * self.n_slots
        for s, t in zip(needs.saved, saved[:k], strict=True):
            env[s] = t
        call = Call(env, saved[k:], ctx.symbols, ctx.keep)
        grads = Grads([None] * self.n_slots, [None] * self.n_params, needs.slot, needs.param)
        for s, g in zip(self.output_slots, gouts, strict=True):
            if g is not None:
                grads.add(s, g)
        for i in range(len(self.steps) - 1, -1, -1):
            if not needs.step[i]:
                continue
            st = self.steps[i]
            gs = [grads.slots[o] for o in st.outs]
            if all(g is None for g in gs):
                continue
            for o in st.outs:
                grads.slots[o] = None  # consumed: free it early
            st.backward(call, i, gs, grads)
        ctx.keep = None
        inputs = [grads.slots[s] if needs.slot[s] else None for s in self.input_slots]
        return (*inputs, *(g if n else None for g, n in zip(grads.params, needs.param,
                                                             strict=True)))


    def program(self, flags: tuple[bool, ...]) -> Any:
        """The generated host program for one requires-grad pattern (made once)."""
        prog = self._programs.get(flags)
        if prog is None:
            from esper.triton.hostgen import HostProgram

            prog = self._programs[flags] = HostProgram(self, self.needs(flags), self.dtype)
        return prog


class BlueprintFunction(torch.autograd.Function):
    """``apply(schedule, symbols, *inputs, *params) -> outputs``."""

    @staticmethod
    def forward(ctx: Any, schedule: Schedule, symbols: dict[str, int],
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        if schedule.generated:
            prog = ctx.prog = schedule.program(ctx.needs_input_grad[2:])
            return prog.forward(ctx, symbols, *tensors)  # type: ignore[no-any-return]
        ctx.prog = None
        ctx.schedule = schedule
        return schedule.forward(ctx, symbols, tensors)

    @staticmethod
    def backward(ctx: Any, *gouts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if ctx.prog is not None:
            return (None, None, *ctx.prog.backward(ctx, *gouts))
        return (None, None, *ctx.schedule.backward(ctx, gouts))
