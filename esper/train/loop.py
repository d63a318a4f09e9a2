"""The training loop: a task's host with seed sites, stepped by Kasmina, with a
controller consulted at every evaluation. Single-threaded and never blocked by
Esper: kernels arrive through the catalog (loaded by the link's thread), offers
are taken at step boundaries, modules are built on Kasmina's loader threads,
seed events leave through a sink that only enqueues."""

from __future__ import annotations

import logging
import math
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from esper.errors import IllegalTransition
from esper.kasmina import Kasmina, KasminaConfig, SeedEvent, SeedState, SiteSchema, add_seed_sites
from esper.train.catalog import KernelCatalog, KernelStatus, device_target, prefer_native
from esper.train.controller import (
    Controller,
    Germinate,
    Observation,
    PlateauController,
    SeedView,
    Transition,
)
from esper.train.task import TeacherStudentTask, count_params

log = logging.getLogger(__name__)

S = SeedState

DEFAULT_KASMINA = KasminaConfig(
    train_steps=80, graft_steps=40, stabilize_steps=None, embargo_steps=150
)
"""TRAINING and GRAFTING run on Kasmina's schedule; the controller ends STABILIZATION."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    lr: float = 3e-3
    eval_every: int = 50
    seeds_per_site: int = 2
    kasmina: KasminaConfig = DEFAULT_KASMINA
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    probe_size: int = 512
    """Validation examples used to measure each site's gradient signal."""


@dataclass(frozen=True)
class EventRecord:
    """A seed transition as the run saw it (for reports and plots)."""

    step: int
    site: str
    seed: int
    event: str
    kernel: str | None
    cache_key: str | None
    reason: str


@dataclass
class TrainResult:
    run_id: str
    steps: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    params_start: int = 0
    params_final: int = 0
    param_steps: float = 0.0
    """Sum over steps of the parameters in use (host + installed seeds): a compute
    measure comparable with a static model's ``params * steps``."""
    fossils: list[tuple[str, str, str]] = field(default_factory=list)
    """(site, cache key, kernel name) of every fossilized seed, in order."""
    wall_s: float = 0.0
    step_ms_median: float = 0.0
    step_ms_max: float = 0.0

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1][1] if self.val_loss else math.nan

    def count(self, event: str) -> int:
        return sum(e.event == event for e in self.events)


Progress = Callable[[Observation, "Trainer"], None]
EventHook = Callable[[SeedEvent, dict[str, Any]], None]


class Trainer:
    """One run of ``task`` with growth. ``on_event`` receives every seed transition
    (with detail for the wire) on the training thread; make it cheap."""

    def __init__(
        self,
        task: TeacherStudentTask,
        catalog: KernelCatalog,
        *,
        config: TrainConfig | None = None,
        controller: Controller | None = None,
        on_event: EventHook | None = None,
        on_eval: Progress | None = None,
    ) -> None:
        self.task = task
        self.catalog = catalog
        self.config = config or TrainConfig()
        self.controller = controller or PlateauController()
        self.on_event = on_event
        self.on_eval = on_eval
        self.host = task.make_host()
        self.kasmina: Kasmina = add_seed_sites(
            self.host, task.site_schemas, seeds_per_site=self.config.seeds_per_site,
            config=self.config.kasmina, sink=self._sink,
            seed_optimizer=lambda groups: torch.optim.Adam(groups, lr=self.config.lr),
        )
        self.optimizer = torch.optim.Adam(self.host.parameters(), lr=self.config.lr)
        self.result = TrainResult(self.config.run_id, self.config.steps,
                                  params_start=count_params(self.host))
        self._since_eval: list[SeedEvent] = []
        self._schemas = {name: layer.schema for name, layer in self.kasmina.sites.items()}
        self.target = device_target(task.device)

    @property
    def site_schemas(self) -> list[SiteSchema]:
        return list(self._schemas.values())

    # --- seed events ---------------------------------------------------------------

    def _sink(self, event: SeedEvent) -> None:
        info = self.catalog.get(event.cache_key) if event.cache_key else None
        name = info.label if info is not None else None
        self._since_eval.append(event)
        self.result.events.append(EventRecord(event.step, event.site, event.seed, event.event,
                                              name, event.cache_key, event.reason))
        if event.to_state is S.FOSSILIZED and event.cache_key is not None:
            self.result.fossils.append((event.site, event.cache_key, name or event.cache_key))
        if self.on_event is not None:
            detail: dict[str, Any] = {}
            if info is not None:
                detail = {"blueprint": info.name, "blueprint_hash": info.blueprint_hash,
                          "kernel_source": info.source}
            self.on_event(event, detail)

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config
        task, host, kas = self.task, self.host, self.kasmina
        pending: list[torch.Tensor] = []
        step_s: list[float] = []
        started = time.perf_counter()
        try:
            for step in range(cfg.steps):
                t0 = time.perf_counter()
                x, y = task.batch(step)

                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = task.loss(host(x), y)
                    loss.backward()
                    return loss

                pending.append(kas.train_step(closure, self.optimizer, step).detach())
                step_s.append(time.perf_counter() - t0)
                if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
                    # The loop's only host syncs: the losses since the last evaluation.
                    self.result.train_loss.extend(torch.stack(pending).float().tolist())
                    pending.clear()
                    self._evaluate(step)
        finally:
            self.result.wall_s = time.perf_counter() - started
            kas.close()
        self.result.params_final = self.params_in_use()
        if step_s:
            self.result.step_ms_median = statistics.median(step_s) * 1e3
            self.result.step_ms_max = max(step_s) * 1e3
        return self.result

    def params_in_use(self) -> int:
        return count_params(self.host) + sum(
            count_params(m) for layer in self.kasmina.sites.values() for m in layer.seeds.values()
        )

    def _evaluate(self, step: int) -> None:
        last = self.result.val_loss[-1][0] if self.result.val_loss else -1
        self.result.param_steps += self.params_in_use() * (step - last)
        val = self.task.val_loss(self.host)
        self.result.val_loss.append((step, val))
        recent = self.result.train_loss[-self.config.eval_every:]
        obs = Observation(
            step=step,
            val_loss=val,
            train_loss=sum(recent) / max(len(recent), 1),
            site_signal=self.site_signals(),
            seeds=self._seeds(),
            free_slots={
                name: sum(s.state is S.DORMANT for s in layer.state.slots)
                for name, layer in self.kasmina.sites.items()
            },
            kernels={name: prefer_native(self.catalog.usable(schema), self.target)
                     for name, schema in self._schemas.items()},
            events=tuple(self._since_eval),
        )
        self._since_eval.clear()
        for decision in self.controller.decide(obs):
            self._apply(decision)
        if self.on_eval is not None:
            self.on_eval(obs, self)

    def _seeds(self) -> list[SeedView]:
        return [
            SeedView(name, k, slot.state, slot.steps, slot.cache_key)
            for name, layer in self.kasmina.sites.items()
            for k, slot in enumerate(layer.state.slots)
            if slot.state not in (S.DORMANT, S.FOSSILIZED)
        ]

    def _apply(self, decision: Germinate | Transition) -> None:
        if isinstance(decision, Germinate):
            info = self.catalog.get(decision.cache_key)
            if info is None or info.status is not KernelStatus.LOADED or info.factory is None:
                log.info("not germinating %s: it is %s", decision.cache_key[:12],
                         "unknown" if info is None else info.status.value)
                return
            log.info("germinate %s at %s: %s", info.label, decision.site, decision.reason)
            self.kasmina.offer_kernel(decision.site, None, decision.cache_key, info.factory)
            return
        try:
            self.kasmina.transition(decision.site, decision.seed, decision.to, decision.reason)
        except IllegalTransition as exc:  # the seed moved (a fault cull) since it was seen
            log.warning("controller decision not applied: %s", exc)

    def site_signals(self) -> dict[str, float]:
        """Per site, the mean per-example norm of the host loss's gradient at the
        site's activation, on a validation probe (parameters' grads untouched)."""
        task, host = self.task, self.host
        names = list(self._schemas)
        acts: dict[str, torch.Tensor] = {}
        hooks = [
            host.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, name=name: acts.__setitem__(name, out)
            )
            for name in names
        ]
        x = task.val_x[: self.config.probe_size]
        y = task.val_y[: self.config.probe_size]
        was = host.training
        host.eval()  # TRAINING seeds stay out of it (they train in train mode only)
        try:
            with torch.enable_grad():
                loss = task.loss(host(x), y)
                grads = torch.autograd.grad(loss, [acts[n] for n in names], allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
            host.train(was)
        scale = x.shape[0]  # the loss is a batch mean: undo it per example
        return {
            n: 0.0 if g is None else float((g * scale).flatten(1).norm(dim=1).mean())
            for n, g in zip(names, grads, strict=True)
        }
