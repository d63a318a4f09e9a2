"""Kasmina: the seed sites of one host, and everything decided at step boundaries.

A training step with seeds::

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = kasmina.train_step(closure, optimizer, step)

``train_step`` runs the closure, trains TRAINING seeds on their own loss, reads
the step's fault flags (the one host sync, only while seeds run), culls faulty
seeds — re-running the closure without them if the host saw their output, so
the host's update is exactly the seedless one — then steps the host and seed
optimizers and calls ``step_boundary``, where loads finish, offers germinate
and the schedule moves seeds along. Controllers call ``transition``/``cull``
between steps, on the training thread; ``offer_kernel`` is thread-safe.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from esper.kasmina.config import KasminaConfig
from esper.kasmina.faults import grads_finite
from esper.kasmina.kernels import (
    KernelLoader,
    KernelOffer,
    LoadedKernel,
    ModuleFactory,
    OfferQueue,
)
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.lifecycle import (
    BLENDED_STATES,
    LIVE_STATES,
    EventSink,
    SeedEvent,
    SeedState,
    check_transition,
)
from esper.kasmina.objective import GradientResidual, SeedObjective
from esper.kasmina.optim import OptimizerFactory, SeedKey, SeedOptimizer
from esper.kasmina.schema import SiteSchema

log = logging.getLogger(__name__)

S = SeedState
_RESTING = (S.DORMANT, S.FOSSILIZED)


@dataclass(frozen=True, slots=True)
class FaultReport:
    """What ``check_faults`` culled, and whether the host saw any of them."""

    culled: list[SeedEvent] = field(default_factory=list)
    needs_rerun: bool = False


def site_key(name: str) -> str:
    """A site name as a ModuleDict key (no dots allowed there)."""
    return name.replace(".", "__")


class Kasmina(nn.Module):
    """The execution plane for one host model. Its parameters are the seeds'
    (the host's stay the host's); ``state_dict`` holds seed params and the
    sites' state tensors. Build it with ``esper.kasmina.add_seed_sites``."""

    host: nn.Module

    def __init__(
        self,
        host: nn.Module,
        sites: Mapping[str, Any],
        *,
        seeds_per_site: int,
        config: KasminaConfig | None = None,
        sink: EventSink | None = None,
        seed_optimizer: OptimizerFactory | None = None,
        objective: SeedObjective | None = None,
    ) -> None:
        super().__init__()
        self.config = config or KasminaConfig()
        object.__setattr__(self, "host", host)  # not a submodule: host params stay the host's
        self.sink = sink
        self.events: deque[SeedEvent] = deque(maxlen=10_000)
        self.objective = objective or GradientResidual(self.config.residual_step)
        self.seed_optimizer = SeedOptimizer(seed_optimizer)
        self.host_optimizer: Optimizer | None = None
        self.fossil_order: list[SeedKey] = []
        """Fossils in the order their params joined the host optimizer."""
        self.step = -1
        """The last step boundary passed."""
        self._offers = OfferQueue()
        self._loader: KernelLoader | None = KernelLoader(self.config.loader_workers)
        self._loading: dict[SeedKey, Future[LoadedKernel]] = {}
        self._checked = False
        self._live = 0  # seeds neither DORMANT nor FOSSILIZED: what a boundary must visit
        self.layers = nn.ModuleDict()
        self._by_name: dict[str, KasminaLayer] = {}
        for name, schema in sites.items():
            module = host.get_submodule(name)
            layer = KasminaLayer(
                name, SiteSchema.of(schema), seeds_per_site, self.config, self._offers.put
            )
            layer.attach(module)
            self.layers[site_key(name)] = layer
            self._by_name[name] = layer
        self.to(self._host_device())

    # --- lookup ----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(iter(self._by_name.values())).state.alpha.device

    def _host_device(self) -> torch.device:
        for p in self.host.parameters():
            return p.device
        for b in self.host.buffers():
            return b.device
        return torch.device("cpu")

    def site(self, name: str) -> KasminaLayer:
        return self._by_name[name]

    @property
    def sites(self) -> dict[str, KasminaLayer]:
        return dict(self._by_name)

    def state_of(self, site: str, seed: int) -> SeedState:
        return self._by_name[site].state.slots[seed].state

    def running(self) -> bool:
        """Some seed runs in the forward pass and may fault (fossils aren't counted)."""
        return any(
            g.mode.value != "fossil" for layer in self._by_name.values() for g in layer.running
        )

    def busy(self) -> bool:
        """Anything for a boundary to do beyond the fast path (O(1))."""
        return self._live > 0 or bool(self._loading) or not self._offers.empty()

    def recount(self) -> None:
        """Recompute the count of seeds a boundary must visit (after a restore)."""
        self._live = sum(
            slot.state not in _RESTING for layer in self._by_name.values()
            for slot in layer.state.slots
        )

    # --- the controller's verbs (training thread, between steps) -------------------

    def offer_kernel(
        self, site: str, seed: int | None, cache_key: str, factory: ModuleFactory
    ) -> None:
        """Thread-safe: germinate ``cache_key`` at the next boundary (see KasminaLayer)."""
        self._by_name[site].offer_kernel(seed, cache_key, factory)

    def transition(self, site: str, seed: int, to: SeedState, reason: str) -> SeedEvent:
        """Move a seed now (e.g. TRAINING → GRAFTING). Raises IllegalTransition."""
        layer = self._by_name[site]
        event = self._move(layer, seed, to, self.step, reason)
        layer.refresh()
        return event

    def cull(self, site: str, seed: int, reason: str) -> SeedEvent:
        return self.transition(site, seed, S.CULLED, reason)

    def bind_optimizer(self, optimizer: Optimizer) -> None:
        """The host optimizer fossils join; fossils made before binding join now."""
        if optimizer is self.host_optimizer:
            return
        self.host_optimizer = optimizer
        for site, seed in self.fossil_order:
            if (site, seed) in self.seed_optimizer:
                self.seed_optimizer.move_to((site, seed), optimizer)

    # --- one training step -----------------------------------------------------------

    def train_step(
        self, closure: Callable[[], torch.Tensor], optimizer: Optimizer, step: int
    ) -> torch.Tensor:
        """One step of host and seeds with the fault guarantees (module docstring).
        The closure must zero the host optimizer's grads, run forward and backward
        and return the loss, and be repeatable (it is re-run after a cull)."""
        self.bind_optimizer(optimizer)
        running = self.running()
        if running:
            self.seed_optimizer.zero_grad()
        rng = rng_state() if running else None
        loss = closure()
        if running:
            for _ in range(1 + sum(len(layer.state) for layer in self._by_name.values())):
                self.train_seeds()
                report = self.check_faults(step)
                if not report.needs_rerun:
                    break
                # The host saw a culled seed's output: redo the step without it.
                set_rng_state(rng)
                self.seed_optimizer.zero_grad()
                for layer in self._by_name.values():
                    layer.drop_records()
                loss = closure()
        optimizer.step()
        self.seed_optimizer.step()
        self.step_boundary(step)
        return loss

    def train_seeds(self) -> None:
        """After the host's backward: each TRAINING seed's own loss, backward."""
        for layer in self._by_name.values():
            layer.train_seeds(self.objective)

    def check_faults(self, step: int) -> FaultReport:
        """Read every fault flag of this step in ONE device→host copy, cull the
        faulty seeds. Call after backward, before ``optimizer.step``."""
        self._checked = True
        flags: list[torch.Tensor] = []
        owners: list[tuple[KasminaLayer, list[int], str]] = []
        for layer in self._by_name.values():
            for own, ok, what in layer.faults.flags:
                flags.append(ok.reshape(-1))
                owners.extend((layer, o, f"non-finite {what}") for o in own)
            for group in layer.running:
                if group.mode.value == "fossil":
                    continue
                checked = grads_finite(group.seeds, group.seed_params)
                if checked is not None:
                    flags.append(checked[1])
                    owners.extend((layer, o, "non-finite gradient") for o in checked[0])
        if flags:
            ok_all = torch.cat(flags).cpu().tolist()  # the step's one host sync
            failed = [o for ok, o in zip(ok_all, owners, strict=True) if not ok]
            for layer, seeds, reason in failed:
                if len(seeds) == 1:
                    layer.faults.add(seeds, reason)
            # A group-level flag (the batched input gradient) blames the group's own
            # faulty seeds when there are any, else every seed of the group.
            for layer, seeds, reason in failed:
                if len(seeds) > 1 and not any(s in layer.faults.found for s in seeds):
                    layer.faults.add(seeds, reason)
        budget = self.config.max_seed_latency_s
        for layer in self._by_name.values():
            for seeds, start, end in layer.faults.timings:
                end.synchronize()  # done already when the flags were read
                elapsed = start.elapsed_time(end) / 1e3
                if budget is not None and elapsed > budget:
                    layer.faults.add(
                        seeds, f"latency {elapsed * 1e3:.1f} ms over budget {budget * 1e3:.1f} ms"
                    )
        culled: list[SeedEvent] = []
        rerun = False
        for layer in self._by_name.values():
            for seed, reason in sorted(layer.faults.found.items()):
                state = layer.state.slots[seed].state
                if state in LIVE_STATES:
                    rerun |= state in BLENDED_STATES
                    culled.append(self._move(layer, seed, S.CULLED, step, reason))
            layer.faults.clear()
            layer.refresh()
        return FaultReport(culled, rerun)

    # --- the step boundary ------------------------------------------------------------

    def step_boundary(self, step: int, *, install: bool = True) -> None:
        """Apply what waits for a boundary: fault culls, finished loads, offers, the
        schedule. Never waits for a load. Cheap when every seed is dormant.
        ``install=False`` leaves finished loads for a later boundary (replicas that
        must install together hold them until every one has its build)."""
        if not self._checked and self.running():
            self.check_faults(step)
        self._checked = False
        self.step = step
        if not self.busy():
            return
        cfg = self.config
        for layer in self._by_name.values():
            counting = False
            for k, slot in enumerate(layer.state.slots):
                if slot.state in _RESTING:
                    continue
                slot.steps += 1
                counting = True
                if slot.state is S.GERMINATED:
                    if install:
                        self._finish_load(layer, k, step)
                elif slot.state is S.TRAINING and cfg.train_steps is not None:
                    if slot.steps >= cfg.train_steps:
                        self._move(layer, k, S.GRAFTING, step, f"trained {slot.steps} steps")
                elif slot.state is S.GRAFTING and slot.steps >= cfg.graft_steps:
                    self._move(layer, k, S.STABILIZATION, step, "alpha reached 1")
                elif slot.state is S.STABILIZATION and cfg.stabilize_steps is not None:
                    if slot.steps >= cfg.stabilize_steps:
                        self._move(layer, k, S.FOSSILIZED, step, f"stable {slot.steps} steps")
                elif slot.state is S.CULLED and slot.steps >= cfg.embargo_steps:
                    self._move(layer, k, S.DORMANT, step, "embargo over")
            if counting and not layer.changed:
                layer.state.tick()
            layer.faults.clear()
            layer.drop_records()
        for offer in self._offers.drain():
            self._germinate(offer, step)
        for layer in self._by_name.values():
            layer.refresh()

    def _germinate(self, offer: KernelOffer, step: int) -> None:
        layer = self._by_name[offer.site]
        slots = layer.state.slots
        free = [k for k, s in enumerate(slots) if s.state is S.DORMANT]
        seed = offer.seed if offer.seed is not None else (free[0] if free else None)
        if seed is None or slots[seed].state is not S.DORMANT:
            log.warning(
                "offer of %s to %s[%s] dropped: no dormant seed slot",
                offer.cache_key, offer.site, offer.seed if offer.seed is not None else "any",
            )
            return
        slot = slots[seed]
        slot.kernel_slot = layer.kernels.slot_for(offer.cache_key, offer.factory)
        slot.cache_key = offer.cache_key
        self._move(layer, seed, S.GERMINATED, step, "kernel offered")
        self.start_load(layer, seed)

    def start_load(self, layer: KasminaLayer, seed: int) -> None:
        """Build a GERMINATED seed's kernel on the loader pool (also used on resume)."""
        entry = layer.kernels[layer.state.slots[seed].kernel_slot]
        self._loading[(layer.name, seed)] = self._get_loader().submit(
            entry.factory, self.device, layer.schema
        )

    def _finish_load(self, layer: KasminaLayer, seed: int, step: int) -> None:
        future = self._loading.get((layer.name, seed))
        if future is None or not future.done():
            return  # never wait: try again at the next boundary
        del self._loading[(layer.name, seed)]
        try:
            loaded = future.result()
        except Exception as exc:
            self._move(layer, seed, S.CULLED, step, f"load failed: {type(exc).__name__}: {exc}")
            return
        if loaded.ready is not None:
            # Built on the loader's stream: order the training stream after it, and
            # tell the allocator the training stream uses these tensors from now on.
            stream = torch.cuda.current_stream()
            stream.wait_event(loaded.ready)
            for t in (*loaded.module.parameters(), *loaded.module.buffers()):
                t.record_stream(stream)
        self._install(layer, seed, loaded.module)
        self._move(layer, seed, S.TRAINING, step, "kernel loaded")

    def _install(self, layer: KasminaLayer, seed: int, module: nn.Module) -> None:
        module.train()
        layer.install(seed, module)
        self.seed_optimizer.add((layer.name, seed), module.parameters())

    def loads_done(self) -> bool:
        """Every pending build has finished (built or failed): the next boundary
        installs (or culls) them all."""
        return all(f.done() for f in self._loading.values())

    def wait_for_loads(self, timeout: float | None = None) -> None:
        """Block until every pending load is done (tests, resume; not the training loop)."""
        for future in list(self._loading.values()):
            try:
                future.result(timeout=timeout)
            except Exception:
                pass  # the boundary that installs it culls it, with the reason

    # --- transitions ----------------------------------------------------------------

    def _move(
        self, layer: KasminaLayer, seed: int, to: SeedState, step: int, reason: str
    ) -> SeedEvent:
        slot = layer.state.slots[seed]
        check_transition(layer.name, seed, slot.state, to)
        event = SeedEvent(layer.name, seed, slot.state, to, step, reason, slot.cache_key)
        key = (layer.name, seed)
        if to is S.CULLED:
            layer.remove(seed)
            self.seed_optimizer.remove(key)
            pending = self._loading.pop(key, None)
            if pending is not None:
                pending.cancel()
            slot.kernel_slot, slot.cache_key = -1, None
        elif to is S.FOSSILIZED:
            self.fossil_order.append(key)
            if self.host_optimizer is not None:
                self.seed_optimizer.move_to(key, self.host_optimizer)
        self._live += (to not in _RESTING) - (slot.state not in _RESTING)
        slot.state, slot.steps = to, 0
        layer.changed = True
        self.events.append(event)
        if self.sink is not None:
            self.sink(event)
        return event

    def _get_loader(self) -> KernelLoader:
        if self._loader is None:
            self._loader = KernelLoader(self.config.loader_workers)
        return self._loader

    def close(self) -> None:
        """Unhook every site and stop the loader threads."""
        for layer in self._by_name.values():
            layer.detach_from_host()
        if self._loader is not None:
            self._loader.shutdown()
            self._loader = None


def rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """CPU (and, once initialised, CUDA) RNG state: a step re-run replays its draws."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None] | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
