"""Optimizers for seeds: one optimizer holding a param group per live seed, and
the move of a fossilizing seed's parameters — with their state, e.g. Adam's
moments and step count — into the host's optimizer. Resetting Adam at growth
is the most reported failure of growing networks (FIELD-NOTES)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

SeedKey = tuple[str, int]
"""(site name, seed slot)."""

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
"""Builds the seed optimizer from param groups, e.g. ``lambda g: Adam(g, lr=1e-3)``."""


def default_seed_optimizer(groups: list[dict[str, Any]]) -> Optimizer:
    return torch.optim.Adam(groups, lr=1e-3)


def move_params(
    params: Iterable[torch.Tensor], src: Optimizer | None, dst: Optimizer, *, group: int = 0
) -> None:
    """Move ``params`` out of ``src`` (if given) into ``dst.param_groups[group]``,
    carrying their per-parameter state unchanged (no reset of moments or step).

    ``src`` and ``dst`` must be the same optimizer class when state is carried;
    the params then follow ``dst``'s hyperparameters (lr, schedule)."""
    params = list(params)
    ids = {id(p) for p in params}
    for g in dst.param_groups:
        if any(id(p) in ids for p in g["params"]):
            raise ValueError("a parameter to move is already in the destination optimizer")
    states: dict[torch.Tensor, Any] = {}
    if src is not None:
        carried = [p for p in params if p in src.state]
        if carried and type(src) is not type(dst):
            raise ValueError(
                f"cannot carry {type(src).__name__} state into {type(dst).__name__}: "
                "use the same optimizer class for seeds and host"
            )
        for g in src.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        src.param_groups[:] = [g for g in src.param_groups if g["params"]]
        states = {p: src.state.pop(p) for p in carried}
    dst.param_groups[group]["params"].extend(params)
    for p, st in states.items():
        dst.state[p] = st


class SeedOptimizer:
    """One optimizer for every live seed, one param group per seed, so a seed
    can leave (culled: state dropped; fossilized: state moved) on its own."""

    def __init__(self, make: OptimizerFactory | None = None) -> None:
        self._make = make or default_seed_optimizer
        self.optimizer: Optimizer | None = None
        self._keys: dict[SeedKey, list[torch.Tensor]] = {}

    def add(self, key: SeedKey, params: Iterable[torch.Tensor]) -> None:
        if key in self._keys:
            raise KeyError(f"seed {key} already has a param group")
        ps = [p for p in params if p.requires_grad]
        self._keys[key] = ps
        if not ps:
            return
        if self.optimizer is None:
            self.optimizer = self._make([{"params": ps}])
        else:
            self.optimizer.add_param_group({"params": ps})

    def remove(self, key: SeedKey) -> list[torch.Tensor]:
        """Drop the seed's group and its state; returns its params."""
        ps = self._keys.pop(key, [])
        if self.optimizer is not None and ps:
            ids = {id(p) for p in ps}
            self.optimizer.param_groups[:] = [
                g for g in self.optimizer.param_groups if not any(id(p) in ids for p in g["params"])
            ]
            for p in ps:
                self.optimizer.state.pop(p, None)
        return ps

    def move_to(self, key: SeedKey, dst: Optimizer, *, group: int = 0) -> None:
        """Hand the seed's params and state to ``dst`` (fossilization)."""
        ps = self._keys.pop(key, [])
        if ps:
            move_params(ps, self.optimizer, dst, group=group)

    def in_order(self) -> list[SeedKey]:
        """Seeds in param-group order (what a checkpoint must rebuild)."""
        return list(self._keys)

    def __contains__(self, key: SeedKey) -> bool:
        return key in self._keys

    def zero_grad(self) -> None:
        """Drop every live seed's gradients (set to None)."""
        for ps in self._keys.values():
            for p in ps:
                p.grad = None

    def step(self) -> None:
        if self.optimizer is not None and self.optimizer.param_groups:
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.optimizer is None else self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            raise ValueError("no seed optimizer to load into: add the seeds first")
        self.optimizer.load_state_dict(state)
