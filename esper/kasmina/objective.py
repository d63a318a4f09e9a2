"""What a TRAINING seed learns, on detached activations, with its own loss.

The host's residual at a site is the negative gradient of the host's loss with
respect to the site's activation (gradient boosting's pseudo-residual; for an
MSE loss read at the output it is exactly target - prediction, up to scale).
A seed fits one small functional-gradient step of that residual, so that when
it is grafted in (alpha → 1) the activation moves downhill. The gradient is
captured by a tensor hook during the host's own backward: no extra host pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SeedObjective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x, grad, delta) → loss[S]``: x the detached site activation ``[B, ...]``,
grad the host's loss gradient at it, delta the S seeds' outputs ``[S, B, ...]``."""


class GradientResidual:
    """Target ``-step · rms(x)/rms(g) · g``: a step of relative size ``step`` in
    the host's descent direction; loss = per-seed mean squared error to it."""

    def __init__(self, step: float = 0.1, eps: float = 1e-12) -> None:
        self.step = step
        self.eps = eps

    def __call__(self, x: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        g = grad.detach().float()
        scale = self.step * x.detach().float().pow(2).mean().sqrt() / (
            g.pow(2).mean().sqrt() + self.eps
        )
        target = (-scale * g).to(delta.dtype)
        return (delta - target.unsqueeze(0)).float().pow(2).flatten(1).mean(dim=1)
