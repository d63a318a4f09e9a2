"""Static hosts to compare a growing run with: the task's host with fixed modules
at its sites from step 0 (a grown model's shape, trained from scratch), and a
plain training loop on the same batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from esper.train.task import TeacherStudentTask


def static_model(
    task: TeacherStudentTask, additions: Sequence[tuple[str, nn.Module]]
) -> nn.Module:
    """A plain host (no Kasmina) with fixed residual modules at its sites from the
    start: ``out + sum(m(out) - out)`` at each site — a grown model's shape."""
    host = task.make_host()
    host.extra = nn.ModuleList(m for _, m in additions)  # type: ignore[assignment]
    by_site: dict[str, list[nn.Module]] = {}
    for site, module in additions:
        by_site.setdefault(site, []).append(module)
    for site, modules in by_site.items():

        def hook(_m: nn.Module, _a: Any, out: torch.Tensor,
                 modules: list[nn.Module] = modules) -> torch.Tensor:
            return out + sum(m(out) - out for m in modules)

        host.get_submodule(site).register_forward_hook(hook)
    return host


def train_static(task: TeacherStudentTask, model: nn.Module, steps: int, lr: float,
                 eval_every: int) -> list[tuple[int, float]]:
    """Train ``model`` on the task's batches; validation loss every ``eval_every`` steps."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve: list[tuple[int, float]] = []
    for step in range(steps):
        x, y = task.batch(step)
        opt.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step == steps - 1:
            curve.append((step, task.val_loss(model)))
    return curve
