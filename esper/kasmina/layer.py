"""KasminaLayer: one seed site at the output of a host submodule.

The site's activation ``h`` (the submodule's output) is what seeds see. Seeds
are parallel residual branches: ``y = h + Σ_k alpha_k · delta_k(h)``, where a
kernel that returns ``h + f(h)`` (the bundled residual blueprints) has
``delta = kernel(h) - h``. A lone seed at alpha 1 is thus exactly the inserted
block. While TRAINING (alpha 0) nothing is added: ``y`` is ``h`` itself.

The layer is a forward hook on the host submodule, registered only while one
of its seeds runs: a site whose seeds are all dormant costs nothing at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from esper.kasmina.batching import Mode, SeedGroup
from esper.kasmina.config import KasminaConfig
from esper.kasmina.faults import FaultLog, SeedTimer, all_finite_rows, isolate
from esper.kasmina.kernels import KernelOffer, KernelTable, ModuleFactory
from esper.kasmina.lifecycle import SeedState
from esper.kasmina.objective import SeedObjective
from esper.kasmina.schema import SiteSchema
from esper.kasmina.state import SiteState

_MODE = {
    SeedState.TRAINING: Mode.TRAIN,
    SeedState.GRAFTING: Mode.BLEND,
    SeedState.STABILIZATION: Mode.BLEND,
    SeedState.FOSSILIZED: Mode.FOSSIL,
}
_ORDER = {Mode.FOSSIL: 0, Mode.BLEND: 1, Mode.TRAIN: 2}


class _GradCatcher:
    """Tensor hook: keeps the host's gradient at the site activation."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None

    def __call__(self, g: torch.Tensor) -> None:
        self.grad = g.detach()


@dataclass(slots=True)
class _TrainRecord:
    group: SeedGroup
    x: torch.Tensor
    delta: torch.Tensor
    catcher: _GradCatcher


class KasminaLayer(nn.Module):
    """K seed slots at one point of the host; see the module docstring."""

    def __init__(
        self,
        name: str,
        schema: SiteSchema,
        seeds: int,
        config: KasminaConfig,
        offers: Callable[[KernelOffer], None],
    ) -> None:
        super().__init__()
        self.name = name
        self.schema = schema
        self.config = config
        self.state = SiteState(seeds, config.graft_steps)
        self.kernels = KernelTable()
        self.seeds = nn.ModuleDict()  # str(slot) → installed kernel module
        self.faults = FaultLog()
        self.seed_losses: dict[int, torch.Tensor] = {}
        """Each TRAINING seed's last objective value (device scalars; read = sync)."""
        self.changed = False
        """The mirror moved since the device state was last written."""
        self._offers = offers
        self._host_module: list[nn.Module] = []  # a list: not a registered submodule
        self._hook: RemovableHandle | None = None
        self._plan: list[SeedGroup] = []
        self._plan_dirty = True
        self._unbatchable: set[int] = set()  # kernel slots vmap failed on
        self._records: list[_TrainRecord] = []

    # --- wiring -----------------------------------------------------------------

    def attach(self, module: nn.Module) -> None:
        """Sit at ``module``'s output; the host module is not changed."""
        self._host_module[:] = [module]

    def detach_from_host(self) -> None:
        self._set_hooked(False)
        self._host_module.clear()

    @property
    def hooked(self) -> bool:
        return self._hook is not None

    def _set_hooked(self, on: bool) -> None:
        if on and self._hook is None and self._host_module:
            self._hook = self._host_module[0].register_forward_hook(self._forward_hook)
        elif not on and self._hook is not None:
            self._hook.remove()
            self._hook = None

    # --- the controller's side ---------------------------------------------------

    def offer_kernel(self, seed: int | None, cache_key: str, factory: ModuleFactory) -> None:
        """Ask to germinate ``cache_key`` in slot ``seed`` (None: any free slot) at
        the next step boundary. Thread-safe; never blocks."""
        if seed is not None and not 0 <= seed < len(self.state):
            raise IndexError(f"site {self.name} has seed slots 0..{len(self.state) - 1}")
        self._offers(KernelOffer(self.name, seed, cache_key, factory))

    def install(self, seed: int, module: nn.Module) -> None:
        self.seeds[str(seed)] = module
        self._plan_dirty = True

    def remove(self, seed: int) -> nn.Module | None:
        self._plan_dirty = True
        self.seed_losses.pop(seed, None)
        return self.seeds.pop(str(seed)) if str(seed) in self.seeds else None

    def module_of(self, seed: int) -> nn.Module | None:
        return self.seeds[str(seed)] if str(seed) in self.seeds else None  # noqa: SIM401

    def refresh(self) -> None:
        """At a boundary: write the device state if the mirror moved, rebuild the
        run plan, hook on/off."""
        if self.changed:
            self.state.write()
            self.changed = False
            self._plan_dirty = True
        if self._plan_dirty:
            self._build_plan()
        self._set_hooked(bool(self._plan))

    @property
    def running(self) -> list[SeedGroup]:
        """The current run plan (groups of seeds sharing a kernel and a mode)."""
        if self._plan_dirty:
            self._build_plan()
        return self._plan

    def _build_plan(self) -> None:
        buckets: dict[tuple[Mode, int], list[int]] = defaultdict(list)
        for k, slot in enumerate(self.state.slots):
            mode = _MODE.get(slot.state)
            if mode is None or str(k) not in self.seeds or k in self.faults.found:
                continue
            buckets[(mode, slot.kernel_slot)].append(k)
        device = self.state.alpha.device
        plan = []
        ordered = sorted(buckets.items(), key=lambda kv: (_ORDER[kv[0][0]], kv[0][1]))
        for (mode, kslot), seeds in ordered:
            plan.append(
                SeedGroup(
                    mode,
                    kslot,
                    seeds,
                    [self.seeds[str(k)] for k in seeds],
                    index=_index(seeds, device),
                    batched=kslot not in self._unbatchable,
                )
            )
        self._plan = plan
        self._plan_dirty = False

    # --- the forward pass ---------------------------------------------------------

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"site {self.name}: the host module must return a tensor")
        if output.dtype != self.schema.dtype or not self.schema.matches(output.shape):
            raise ValueError(
                f"site {self.name}: activation {output.dtype}{list(output.shape)} "
                f"does not fit the site's schema {self.schema}"
            )
        h = output
        grad_on = torch.is_grad_enabled()
        total: torch.Tensor | None = None
        catcher: _GradCatcher | None = None
        for group in self.running:
            if group.mode is Mode.TRAIN:
                if grad_on and module.training and h.requires_grad:
                    catcher = catcher or _GradCatcher()
                    self._run_training(group, h, catcher)
                continue
            part = (
                self._run_fossil(group, h)
                if group.mode is Mode.FOSSIL
                else self._run_blended(group, h, grad_on)
            )
            if part is not None:
                total = part if total is None else total + part
        if catcher is not None:
            h.register_hook(catcher)
        return None if total is None else h + total

    def _delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out - x.unsqueeze(0) if self.config.kernel_output == "residual" else out

    def _run_training(self, group: SeedGroup, h: torch.Tensor, catcher: _GradCatcher) -> None:
        """Detached input, own loss later (``train_seeds``); nothing reaches the host.
        The copy keeps the seed's saved input intact if the host later edits ``h``
        in place (``out += identity``): ``h`` itself is what the host gets back."""
        x = h.detach().clone()
        out = self._guarded(group, x, group.run)
        if out is None:
            return
        delta = self._delta(out, x)
        self.faults.flag([[s] for s in group.seeds], all_finite_rows(delta), "output")
        self._records.append(_TrainRecord(group, x, delta, catcher))

    def _run_blended(
        self, group: SeedGroup, h: torch.Tensor, grad_on: bool
    ) -> torch.Tensor | None:
        """``Σ alpha·delta`` over the group, NaN rows zeroed on device, behind an
        autograd node that keeps a broken backward out of the host."""
        shape = (-1,) + (1,) * h.dim()

        def branch(x: torch.Tensor) -> torch.Tensor:
            delta = self._delta(group.run(x), x)
            ok = all_finite_rows(delta)
            self.faults.flag([[s] for s in group.seeds], ok, "output")
            return torch.where(ok.view(shape), delta, 0.0)

        def report(ok: torch.Tensor | None, exc: BaseException | None) -> None:
            if exc is not None:
                self.faults.add(group.seeds, f"backward raised {type(exc).__name__}: {exc}")
                self._plan_dirty = True
            elif ok is not None:
                self.faults.flag([list(group.seeds)], ok.view(1), "input gradient")

        if grad_on and (h.requires_grad or group.params):

            def run(x: torch.Tensor) -> torch.Tensor:
                return isolate(x, branch, report, group.params)

        else:
            run = branch
        masked = self._guarded(group, h, run)
        if masked is None:
            return None
        alpha = self.state.alpha.index_select(0, group.index).to(h.dtype).view(shape)
        return (alpha * masked).sum(dim=0)

    def _run_fossil(self, group: SeedGroup, h: torch.Tensor) -> torch.Tensor:
        """Fossils are host: no isolation, no masking; their errors are the host's."""
        return self._delta(group.run(h), h).sum(dim=0)

    def _guarded(
        self, group: SeedGroup, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor | None:
        """``fn(x)``, or None if a seed raised or (on CPU) ran over the latency
        budget; culprits are logged and left out of later forwards at once."""
        budget = self.config.max_seed_latency_s
        timer = SeedTimer(x.device, budget is not None)
        timer.start()
        try:
            out = fn(x)
        except Exception as exc:
            culprits = group.culprits(x.detach()) if len(group) > 1 else {}
            if not culprits and group.batched:
                # Every seed runs alone: the kernel only can't be vmapped. Loop from now on.
                group.batched = False
                self._unbatchable.add(group.kernel_slot)
                return self._guarded(group, x, fn)
            for seed in culprits or group.seeds:
                err = culprits.get(seed, exc)
                self.faults.add([seed], f"forward raised {type(err).__name__}: {err}")
            self._plan_dirty = True
            return None
        if budget is not None and timer.stop(self.faults, list(group.seeds), budget):
            self._plan_dirty = True
            return None
        return out

    # --- after the host's backward ------------------------------------------------

    def train_seeds(self, objective: SeedObjective) -> None:
        """Backward each TRAINING group's own loss (seed parameters only)."""
        records, self._records = self._records, []
        for rec in records:
            g = rec.catcher.grad
            if g is None or any(s in self.faults.found for s in rec.group.seeds):
                continue
            try:
                losses = objective(rec.x, g, rec.delta)
                losses.sum().backward()
            except Exception as exc:
                self.faults.add(rec.group.seeds, f"seed loss raised {type(exc).__name__}: {exc}")
                self._plan_dirty = True
                continue
            for i, seed in enumerate(rec.group.seeds):
                self.seed_losses[seed] = losses[i].detach()

    def drop_records(self) -> None:
        self._records.clear()


def _index(seeds: list[int], device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.tensor(seeds, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(seeds, dtype=torch.int64, device=device)
