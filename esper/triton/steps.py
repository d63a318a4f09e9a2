"""The steps of a whole-blueprint schedule, each with a hand-written backward.

Values live in numbered slots; parameters are numbered too. A step's forward
reads and writes slots; its backward gets the grads of its outputs and adds
the grads of its inputs and parameters into a ``Grads`` accumulator. cuBLAS and
cuDNN calls run as plain torch ops (no autograd nodes), fused groups as
direct kernel launches; ops without a rule here run as a small torch autograd
subgraph built in forward (so dropout keeps its mask) and differentiated with
``torch.autograd.grad``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge

from esper.compile.inputs import resolve_shape
from esper.triton.runtime import GroupRunner

Env = list[Any]  # slot -> tensor (or None)


@dataclass
class Call:
    """One run of the schedule: slot values, parameters, bound symbols, and what
    steps keep from forward for their backward (by step index)."""

    env: Env
    params: Sequence[torch.Tensor]
    symbols: dict[str, int]
    keep: dict[int, Any] = field(default_factory=dict)


@dataclass
class Grads:
    """Grads being accumulated during one backward pass."""

    slots: list[torch.Tensor | None]
    params: list[torch.Tensor | None]
    need: Sequence[bool]  # per slot: some leaf upstream needs a grad
    pneed: Sequence[bool]  # per parameter

    def add(self, slot: int, g: torch.Tensor) -> None:
        prev = self.slots[slot]
        # out of place: a grad may be another slot's grad or autograd's own tensor
        self.slots[slot] = g if prev is None else prev + g

    def add_param(self, i: int, g: torch.Tensor) -> None:
        prev = self.params[i]
        self.params[i] = g if prev is None else prev + g


@dataclass
class Step:
    """One scheduled step: slots it reads (``ins``), writes (``outs``), parameters
    it uses (``pins``) and the slots its backward reads (``saves``)."""

    ins: tuple[int, ...]
    outs: tuple[int, ...]
    pins: tuple[int, ...] = ()
    saves: tuple[int, ...] = ()

    def forward(self, call: Call, index: int, record: bool) -> None:
        raise NotImplementedError

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        raise NotImplementedError


@dataclass
class LinearStep(Step):
    """``F.linear`` (cuBLAS, bias in its epilogue when the linear keeps it)."""

    bias: bool = False

    def forward(self, call: Call, index: int, record: bool) -> None:
        env, params = call.env, call.params
        b = params[self.pins[1]] if self.bias else None
        env[self.outs[0]] = F.linear(env[self.ins[0]], params[self.pins[0]], b)

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        g, env = gouts[0], call.env
        xs = self.ins[0]
        w = call.params[self.pins[0]]
        g2 = g.reshape(-1, g.shape[-1])
        if grads.need[xs]:
            x_shape = env[xs].shape
            prev = grads.slots[xs]
            if prev is not None and prev.shape == x_shape:
                # accumulate into the grad already there inside the GEMM (beta = 1)
                gx = torch.addmm(prev.reshape(-1, w.shape[1]), g2, w)
                grads.slots[xs] = gx.view(x_shape)
            else:
                grads.add(xs, torch.mm(g2, w).view(x_shape))
        if grads.pneed[self.pins[0]]:
            x2 = env[xs].reshape(-1, w.shape[1])
            grads.add_param(self.pins[0], torch.mm(g2.t(), x2))
        if self.bias and grads.pneed[self.pins[1]]:
            grads.add_param(self.pins[1], g2.sum(0))


@dataclass
class MatmulStep(Step):
    """``torch.matmul`` of operands with the same batch dims (or a 2-D right operand)."""

    def forward(self, call: Call, index: int, record: bool) -> None:
        env = call.env
        env[self.outs[0]] = torch.matmul(env[self.ins[0]], env[self.ins[1]])

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        g = gouts[0]
        sa, sb = self.ins
        a, b = call.env[sa], call.env[sb]
        if grads.need[sa]:
            grads.add(sa, torch.matmul(g, b.mT))
        if grads.need[sb]:
            if b.dim() == 2:
                gb = torch.mm(a.reshape(-1, a.shape[-1]).t(), g.reshape(-1, g.shape[-1]))
            else:
                gb = torch.matmul(a.mT, g)
            grads.add(sb, gb)


@dataclass
class ConvStep(Step):
    """``F.conv2d`` (cuDNN) with numeric padding; backward is one
    ``convolution_backward`` call for input, weight and bias grads."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False

    def forward(self, call: Call, index: int, record: bool) -> None:
        env, params = call.env, call.params
        b = params[self.pins[1]] if self.bias else None
        env[self.outs[0]] = F.conv2d(env[self.ins[0]], params[self.pins[0]], b, self.stride,
                                     self.padding, self.dilation, self.groups)

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        xs = self.ins[0]
        w = call.params[self.pins[0]]
        mask = [grads.need[xs], grads.pneed[self.pins[0]],
                self.bias and grads.pneed[self.pins[1]]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gouts[0].contiguous(), call.env[xs], w, [w.shape[0]] if self.bias else None,
            list(self.stride), list(self.padding), list(self.dilation), False, [0, 0],
            self.groups, mask)
        if mask[0]:
            grads.add(xs, gx)
        if mask[1]:
            grads.add_param(self.pins[0], gw)
        if mask[2]:
            grads.add_param(self.pins[1], gb)


@dataclass
class PermuteStep(Step):
    dims: tuple[int, ...] = ()

    def forward(self, call: Call, index: int, record: bool) -> None:
        call.env[self.outs[0]] = call.env[self.ins[0]].permute(self.dims)

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        if grads.need[self.ins[0]]:
            inverse = [0] * len(self.dims)
            for i, d in enumerate(self.dims):
                inverse[d % len(self.dims)] = i
            grads.add(self.ins[0], gouts[0].permute(inverse))


@dataclass
class ReshapeStep(Step):
    shape: tuple[Any, ...] = ()

    def forward(self, call: Call, index: int, record: bool) -> None:
        x = call.env[self.ins[0]]
        if record:
            call.keep[index] = x.shape
        call.env[self.outs[0]] = torch.reshape(x, resolve_shape(self.shape, call.symbols))

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        if grads.need[self.ins[0]]:
            grads.add(self.ins[0], gouts[0].reshape(call.keep[index]))


@dataclass
class GroupStep(Step):
    """A fused group: one forward launch, one backward launch (``GroupRunner``).
    ``args``: per group input, ("slot", i) or ("param", i)."""

    runner: GroupRunner | None = None
    args: tuple[tuple[str, int], ...] = ()
    # one full output shaped like a full input of the frame's rank (no aliases):
    # the host code generator spells its launches out
    plain: bool = False

    def _inputs(self, call: Call) -> list[torch.Tensor]:
        env, params = call.env, call.params
        return [env[i] if kind == "slot" else params[i] for kind, i in self.args]

    def forward(self, call: Call, index: int, record: bool) -> None:
        assert self.runner is not None
        outs = self.runner.forward(self._inputs(call), call.symbols)
        env = call.env
        for s, t in zip(self.outs, outs, strict=True):
            env[s] = t

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        assert self.runner is not None
        inputs = self._inputs(call)
        if self.plain:  # inputs not saved (the backward never reads them): the grad's shape
            inputs = [gouts[0] if t is None else t for t in inputs]
        prev: dict[int, torch.Tensor] = {}
        for j in self.runner.acc:  # the kernel adds the grad already there (one pass)
            g = grads.slots[self.args[j][1]]
            t = inputs[j]
            if (g is not None and g.shape == t.shape and g.dtype == t.dtype
                    and g.is_contiguous() and not g.data_ptr() % 16):
                prev[j] = g
        gin = self.runner.backward(inputs, gouts, call.symbols, prev)
        for j, ((kind, i), g) in enumerate(zip(self.args, gin, strict=True)):
            if kind == "slot":
                if j in prev:
                    grads.slots[i] = g
                elif grads.need[i]:
                    grads.add(i, g)
            elif grads.pneed[i]:
                grads.add_param(i, g)


Fn = Callable[[list[torch.Tensor], list[torch.Tensor], dict[str, int], bool],
              list[torch.Tensor]]


class _Entry(torch.autograd.Function):
    """Where a subgraph's input enters it: a node that saves nothing. A detached
    leaf would do, but its AccumulateGrad node holds the leaf, so the subgraph
    would keep every input alive until backward even when no op saved it (a
    scale before a softmax kept both T x T score matrices)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


_ANCHOR: dict[torch.device, torch.Tensor] = {}


def _enter(x: torch.Tensor) -> torch.Tensor:
    anchor = _ANCHOR.get(x.device)
    if anchor is None:
        anchor = _ANCHOR[x.device] = torch.zeros((), device=x.device, requires_grad=True)
    return _Entry.apply(x.detach(), anchor)  # type: ignore[no-any-return]


@dataclass
class TorchGraphStep(Step):
    """Any torch ops (``fn(inputs, params, symbols, training) -> outputs``): in
    training, a detached autograd subgraph recorded in forward; backward runs
    ``torch.autograd.grad`` over it. The subgraph is kept by its gradient edges
    only, so it holds exactly what its ops saved, as eager autograd would."""

    fn: Fn | None = None
    training: list[bool] = field(default_factory=lambda: [False])  # shared with the module

    def forward(self, call: Call, index: int, record: bool) -> None:
        assert self.fn is not None
        env = call.env
        xs = [env[i] for i in self.ins]
        ps = [call.params[i] for i in self.pins]
        if not record:
            outs = self.fn(xs, ps, call.symbols, self.training[0])
        else:
            with torch.enable_grad():
                lx = [_enter(x) if x.dtype.is_floating_point else x for x in xs]
                lp = [p.detach().requires_grad_(True) for p in ps]
                outs = self.fn(lx, lp, call.symbols, self.training[0])
            call.keep[index] = (
                [get_gradient_edge(t) if t.requires_grad else None for t in lx], lp,
                [get_gradient_edge(o) if o.requires_grad else None for o in outs])
            outs = [o.detach() for o in outs]
        for s, t in zip(self.outs, outs, strict=True):
            env[s] = t

    def backward(self, call: Call, index: int, gouts: list[Any], grads: Grads) -> None:
        lx, lp, outs = call.keep[index]
        pairs = [(o, g) for o, g in zip(outs, gouts, strict=True)
                 if g is not None and o is not None]
        want = [(("slot", s), t) for s, t in zip(self.ins, lx, strict=True)
                if grads.need[s] and t is not None]
        want += [(("param", p), t) for p, t in zip(self.pins, lp, strict=True) if grads.pneed[p]]
        if not pairs or not want:
            return
        got = torch.autograd.grad([o for o, _ in pairs], [t for _, t in want],
                                  [g for _, g in pairs], allow_unused=True)
        for ((kind, i), _), g in zip(want, got, strict=True):
            if g is None:
                continue
            if kind == "slot":
                grads.add(i, g)
            else:
                grads.add_param(i, g)
