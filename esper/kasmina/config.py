"""Knobs of the execution plane: the lifecycle schedule and the fault budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class KasminaConfig:
    """Schedule and limits shared by every site of one Kasmina.

    Step counts are step boundaries spent in a state. ``None`` for an automatic
    move means a controller decides it (``Kasmina.transition``).
    """

    train_steps: int | None = 100
    """TRAINING → GRAFTING after this many steps (None: the controller decides)."""
    graft_steps: int = 50
    """GRAFTING ramps alpha 1/n, 2/n, …, 1 over n steps, then → STABILIZATION."""
    stabilize_steps: int | None = 50
    """STABILIZATION → FOSSILIZED after this many steps (None: the controller decides)."""
    embargo_steps: int = 100
    """CULLED → DORMANT after this many steps; the slot takes no kernel meanwhile."""
    max_seed_latency_s: float | None = None
    """A seed (or batched group) forward slower than this is culled (None: no limit)."""
    kernel_output: Literal["residual", "delta"] = "residual"
    """"residual": a kernel returns x + f(x) (the bundled blueprints), so the seed's
    delta is kernel(x) - x; "delta": a kernel returns f(x) itself."""
    residual_step: float = 0.1
    """While TRAINING a seed fits -residual_step·rms(x)·ĝ (see objective.py)."""
    loader_workers: int = 2
    """Threads that build kernel modules (factory(device)) off the training thread."""

    def __post_init__(self) -> None:
        for name in ("train_steps", "stabilize_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.graft_steps < 1:
            raise ValueError(f"graft_steps must be >= 1, got {self.graft_steps}")
        if self.embargo_steps < 0:
            raise ValueError(f"embargo_steps must be >= 0, got {self.embargo_steps}")
        if self.loader_workers < 1:
            raise ValueError(f"loader_workers must be >= 1, got {self.loader_workers}")
        if self.kernel_output not in ("residual", "delta"):
            raise ValueError(f"kernel_output must be 'residual' or 'delta': {self.kernel_output}")
