"""The autograd wrapper of a fused group: forward launches the group's forward
kernel and saves only the group's inputs; backward launches the generated
backward kernel, which recomputes the cheap forward values it needs."""

from __future__ import annotations

from typing import Any

import torch

from esper.triton.runtime import GroupRunner


class FusedGroupFunction(torch.autograd.Function):
    """``apply(runner, symbols, *inputs) -> tuple of outputs``."""

    @staticmethod
    def forward(ctx: Any, runner: GroupRunner, symbols: dict[str, int] | None,
                *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.runner, ctx.symbols = runner, symbols
        ctx.save_for_backward(*inputs)
        outs = runner.forward(inputs, symbols)
        # an aliased output (an input, or another output) must be a distinct tensor object
        res: list[torch.Tensor] = []
        for o in outs:
            same = any(o is i for i in inputs) or any(o is r for r in res)
            res.append(o.view_as(o) if same else o)
        return tuple(res)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grads_in = ctx.runner.backward(ctx.saved_tensors, grads, ctx.symbols)
        needs = ctx.needs_input_grad[2:]
        return (None, None, *(g if n else None for g, n in zip(grads_in, needs, strict=True)))


def run_group(runner: GroupRunner, inputs: list[torch.Tensor],
              symbols: dict[str, int] | None) -> tuple[torch.Tensor, ...]:
    """Through autograd only when some input needs a grad (inference skips it)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return FusedGroupFunction.apply(runner, symbols, *inputs)
    return runner.forward(inputs, symbols)
