"""Seeds of one site that share a kernel run as one batched launch: their
parameters are stacked (differentiably, so each seed keeps its own leaf
parameters and optimizer state) and the kernel is vmapped over the stack."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn
from torch.func import functional_call, vmap


class Mode(Enum):
    """How a group's output is used."""

    TRAIN = "train"  # detached input, own loss, not added to the host (alpha 0)
    BLEND = "blend"  # isolated input, alpha-weighted, fault-masked
    FOSSIL = "fossil"  # part of the host: plain call, alpha 1


class SeedGroup:
    """Seeds of one site with the same kernel slot and mode."""

    def __init__(
        self,
        mode: Mode,
        kernel_slot: int,
        seeds: list[int],
        modules: list[nn.Module],
        *,
        index: torch.Tensor,
        batched: bool = True,
    ) -> None:
        self.mode = mode
        self.kernel_slot = kernel_slot
        self.seeds = seeds
        self.modules = modules
        self.index = index  # device int64 [S]: the seeds' rows in the site state
        self.batched = batched and len(modules) > 1
        base = modules[0]
        self._base = base
        named: list[dict[str, torch.Tensor]] = [dict(m.named_parameters()) for m in modules]
        self._param_lists = {n: [d[n] for d in named] for n in named[0]}
        named_b: list[dict[str, torch.Tensor]] = [dict(m.named_buffers()) for m in modules]
        self._buffer_lists = {n: [d[n] for d in named_b] for n in named_b[0]}
        self.seed_params: list[list[torch.Tensor]] = [
            [p for p in m.parameters() if p.requires_grad] for m in modules
        ]
        self.params: list[torch.Tensor] = [p for ps in self.seed_params for p in ps]

    def __len__(self) -> int:
        return len(self.seeds)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """All seeds on the same input → ``[S, *x.shape]``. Raises what a kernel raises."""
        if len(self.modules) == 1:
            return self._base(x).unsqueeze(0)
        if not self.batched:
            return torch.stack([m(x) for m in self.modules])
        params = {n: torch.stack(ps) for n, ps in self._param_lists.items()}
        buffers = {n: torch.stack(bs) for n, bs in self._buffer_lists.items()}
        return vmap(self._call, in_dims=(0, 0, None), randomness="different")(params, buffers, x)

    def _call(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(self._base, (params, buffers), (x,))

    def culprits(self, x: torch.Tensor) -> dict[int, BaseException]:
        """After the batched call raised: run each seed alone (no grad) to find
        which ones raise. Empty means the kernel just can't be vmapped."""
        found: dict[int, BaseException] = {}
        with torch.no_grad():
            for seed, module in zip(self.seeds, self.modules, strict=True):
                try:
                    module(x)
                except Exception as exc:
                    found[seed] = exc
        return found
