"""GPU-resident per-site seed state, and its Python mirror.

The forward pass reads the device tensors (alpha) and never syncs. Transitions
are decided at step boundaries, on the training thread, from the Python mirror;
only then are the device tensors rewritten (a pinned, non-blocking copy on
CUDA), so a step without transitions does no host↔device traffic at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esper.kasmina.lifecycle import BLENDED_STATES, SeedState


@dataclass(slots=True)
class SeedSlot:
    """The Python mirror of one seed slot; authoritative for decisions."""

    state: SeedState = SeedState.DORMANT
    steps: int = 0
    """Step boundaries spent in ``state`` (not counted while DORMANT or FOSSILIZED)."""
    kernel_slot: int = -1
    cache_key: str | None = None

    def alpha(self, graft_steps: int) -> float:
        """Blend weight: 0 until GRAFTING, ramps (s+1)/n while grafting, then 1."""
        if self.state is SeedState.GRAFTING:
            return min(1.0, (self.steps + 1) / graft_steps)
        return 1.0 if self.state in BLENDED_STATES else 0.0


class SiteState(nn.Module):
    """Device tensors for one site's K seeds: lifecycle, alpha, kernel slot, steps."""

    lifecycle: torch.Tensor
    alpha: torch.Tensor
    kernel_slot: torch.Tensor
    steps: torch.Tensor

    def __init__(self, seeds: int, graft_steps: int) -> None:
        super().__init__()
        if seeds < 1:
            raise ValueError(f"a site needs at least one seed slot, got {seeds}")
        self.graft_steps = graft_steps
        self.slots = [SeedSlot() for _ in range(seeds)]
        self.register_buffer("lifecycle", torch.zeros(seeds, dtype=torch.int8))
        self.register_buffer("alpha", torch.zeros(seeds, dtype=torch.float32))
        self.register_buffer("kernel_slot", torch.full((seeds,), -1, dtype=torch.int32))
        self.register_buffer("steps", torch.zeros(seeds, dtype=torch.int32))

    def __len__(self) -> int:
        return len(self.slots)

    def write(self) -> None:
        """Copy the whole mirror to the device (after a transition)."""
        s = self.slots
        _h2d(self.lifecycle, [int(x.state) for x in s])
        _h2d(self.alpha, [x.alpha(self.graft_steps) for x in s])
        _h2d(self.kernel_slot, [x.kernel_slot for x in s])
        _h2d(self.steps, [x.steps for x in s])

    def tick(self) -> None:
        """Advance the device counters by one step without leaving the device;
        the caller advanced the mirror the same way."""
        counting = (self.lifecycle != int(SeedState.DORMANT)) & (
            self.lifecycle != int(SeedState.FOSSILIZED)
        )
        self.steps.add_(counting.to(torch.int32))
        grafting = self.lifecycle == int(SeedState.GRAFTING)
        ramp = ((self.steps + 1).to(torch.float32) / self.graft_steps).clamp_(max=1.0)
        self.alpha.copy_(torch.where(grafting, ramp, self.alpha))

    def mirror_matches_device(self) -> bool:
        """Test helper (syncs): the device tensors agree with the mirror."""
        s = self.slots
        return (
            self.lifecycle.tolist() == [int(x.state) for x in s]
            and self.kernel_slot.tolist() == [x.kernel_slot for x in s]
            and self.steps.tolist() == [x.steps for x in s]
            and torch.allclose(
                self.alpha.cpu(), torch.tensor([x.alpha(self.graft_steps) for x in s])
            )
        )


def _h2d(dst: torch.Tensor, values: list[int] | list[float]) -> None:
    """Host → device copy that never blocks the host: from pinned memory on CUDA."""
    if dst.device.type == "cuda":
        src = torch.tensor(values, dtype=dst.dtype, pin_memory=True)
        dst.copy_(src, non_blocking=True)
    else:
        dst.copy_(torch.tensor(values, dtype=dst.dtype))
