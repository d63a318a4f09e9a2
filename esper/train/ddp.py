"""``esper train --ddp``: data-parallel training under torchrun (one process per GPU,
or per CPU process with gloo) where every rank hot-loads and grows in lockstep.

- The host is wrapped in ``DistributedDataParallel``; seed parameters (live seeds
  and fossils, which DDP never saw) are averaged in one extra flat all-reduce
  before the optimizers step. Each rank trains on its own batches.
- Only rank 0 consumes ``esper.kernel.ready``/``retired`` (its ``TrainerLink``),
  runs the controller and records seed events. At every evaluation it broadcasts
  a ``SyncMessage`` (``ddp_sync``): kernels to load, retirements, decisions; every
  rank applies it at the same step boundary.
- Whatever a rank could decide alone is agreed: fault culls (an all-reduced flag
  per seed slot, and whether the step must re-run without the culled seeds), a
  failed kernel build (kernels are installed at the first boundary where every
  rank's build has finished, agreed by an all-reduced flag, then its culls are
  agreed), and a new seed's random init (broadcast from rank 0 when it is
  installed).
- ``verify``: after every step with a transition, all ranks hash their whole model
  state (host + seeds + seed slots) and all-gather the digests; a mismatch raises
  ``ReplicaDivergenceError``. The end of training is always checked."""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esper.artifacts.signing import load_public_key
from esper.kasmina import LIVE_STATES, SeedEvent, SeedState
from esper.kasmina.plane import rng_state, set_rng_state
from esper.train.catalog import KernelCatalog
from esper.train.controller import Controller, Decision, Observation
from esper.train.ddp_comm import Comm, state_digest
from esper.train.ddp_sync import (
    KernelOutbox,
    Shipments,
    ShippingFetcher,
    SyncMessage,
    broadcast_sync,
    decode_decision,
    encode_decision,
    receive_kernels,
)
from esper.train.loop import EventHook, Progress, TrainConfig, Trainer, TrainResult
from esper.train.run import TrainRun
from esper.train.task import TeacherStudentTask

log = logging.getLogger(__name__)

S = SeedState
SlotKey = tuple[str, int]


class _Held:
    """Rank 0's controller, held back: its decisions are broadcast first, then
    applied by every rank (the trainer's own loop applies none)."""

    def __init__(self, inner: Controller) -> None:
        self.inner = inner
        self.pending: list[Decision] = []

    def decide(self, obs: Observation) -> Sequence[Decision]:
        self.pending.extend(self.inner.decide(obs))
        return []

    def take(self) -> list[Decision]:
        out, self.pending = self.pending, []
        return out


class _Follower:
    """Ranks other than 0 never decide."""

    def decide(self, obs: Observation) -> Sequence[Decision]:
        return []


@dataclass
class DDPStats:
    rank: int
    world: int
    checks: list[tuple[int, str]] = field(default_factory=list)
    """(step, state digest) at every cross-rank check, all ranks' digests equal."""
    hot_load_ms: list[float] = field(default_factory=list)
    """Steps whose boundary installed a kernel (agrees builds done, broadcasts inits)."""
    sync_ms: list[float] = field(default_factory=list)
    """Each evaluation's broadcast and apply, kernels loaded included."""
    step_ms: list[float] = field(default_factory=list)
    """Every training step (evaluations and syncs excluded)."""
    check_ms: list[float] = field(default_factory=list)
    """Each cross-rank state check (hash + all-gather)."""
    kernels_shipped: int = 0


class DDPTrainer(Trainer):
    """One rank of a data-parallel run; see the module docstring."""

    def __init__(
        self,
        task: TeacherStudentTask,
        catalog: KernelCatalog,
        comm: Comm,
        *,
        config: TrainConfig | None = None,
        controller: Controller | None = None,
        on_event: EventHook | None = None,
        on_eval: Progress | None = None,
        public_key: Ed25519PublicKey | None = None,
        outbox: KernelOutbox | None = None,
        link_catalog: KernelCatalog | None = None,
        verify: bool = False,
    ) -> None:
        super().__init__(task, catalog, config=config,
                         controller=controller if comm.leader else _Follower(),
                         on_event=on_event, on_eval=on_eval if comm.leader else None)
        self.comm = comm
        self.public_key = public_key
        self.outbox = outbox
        self.link_catalog = link_catalog
        self.verify = verify
        self.held = _Held(self.controller) if comm.leader else None
        if self.held is not None:
            self.controller = self.held
        cuda = task.device.type == "cuda"
        self.net: nn.Module = DistributedDataParallel(
            self.host, device_ids=[task.device] if cuda else None)
        self.slots: list[SlotKey] = [
            (name, k) for name, layer in self.kasmina.sites.items() for k in range(len(layer.state))
        ]
        self.stats = DDPStats(comm.rank, comm.world)
        self._step_events: list[SeedEvent] = []

    def _sink(self, event: SeedEvent) -> None:
        super()._sink(event)
        self._step_events.append(event)

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, task, comm = self.config, self.task, self.comm
        pending: list[torch.Tensor] = []
        step_s: list[float] = []
        started = time.perf_counter()
        try:
            self._sync(-1)  # the kernels rank 0 holds before the first step
            for step in range(cfg.steps):
                t0 = time.perf_counter()
                self._step_events.clear()
                x, y = task.batch(step * comm.world + comm.rank)  # each rank its own data

                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = task.loss(self.net(x), y)
                    loss.backward()
                    return loss

                loss, installed = self.train_step(closure, step)
                pending.append(loss.detach())
                dt = time.perf_counter() - t0
                step_s.append(dt)
                self.stats.step_ms.append(dt * 1e3)
                if installed:
                    self.stats.hot_load_ms.append(dt * 1e3)
                if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
                    self.result.train_loss.extend(torch.stack(pending).float().tolist())
                    pending.clear()
                    self._evaluate(step)  # every rank: same params, same validation loss
                    self._sync(step)
                if self.verify:
                    self._verify(step)
            self.check(cfg.steps - 1, "at the end of training")
        finally:
            self.result.wall_s = time.perf_counter() - started
            self.kasmina.close()
            # Drop the DDP wrapper now: a reducer still alive when the process group
            # is destroyed can abort the process at exit (seen with gloo).
            self.net = self.host
        self.result.params_final = self.params_in_use()
        if step_s:
            self.result.step_ms_median = statistics.median(step_s) * 1e3
            self.result.step_ms_max = max(step_s) * 1e3
        return self.result

    def train_step(self, closure: Callable[[], torch.Tensor],
                   step: int) -> tuple[torch.Tensor, bool]:
        """``Kasmina.train_step`` with every local verdict agreed across ranks, seed
        gradients averaged, and kernel installs in lockstep. Returns (loss, whether
        this step's boundary installed a kernel)."""
        kas, comm = self.kasmina, self.comm
        kas.bind_optimizer(self.optimizer)
        running = kas.running()  # the same on every rank: the seed states are
        if running:
            kas.seed_optimizer.zero_grad()
        rng = rng_state() if running else None
        # The same tensors on every rank, even after a local cull drops a seed.
        params = list(kas.parameters())
        loss = closure()
        for _ in range(1 + len(self.slots)):
            culled, rerun = [], False
            if running:
                kas.train_seeds()
                report = kas.check_faults(step)
                culled, rerun = report.culled, report.needs_rerun
            # One all-reduce: seed gradients, and every rank's culls riding along.
            mine = {(e.site, e.seed) for e in culled}
            flags = comm.average_grads(params,
                                       [key in mine for key in self.slots] + [rerun]
                                       if running else [])
            if not running or not self._cull_agreed(flags, mine, step):
                break
            # Some rank's host saw a culled seed: every rank redoes the step without it.
            set_rng_state(rng)
            kas.seed_optimizer.zero_grad()
            for layer in kas.sites.values():
                layer.drop_records()
            loss = closure()
        self.optimizer.step()
        kas.seed_optimizer.step()
        loading = any(kas.state_of(site, k) is S.GERMINATED for site, k in self.slots)
        # Install at the first boundary where every rank's build is done, all ranks
        # together. Waiting for the build instead stalled the step ~180 ms on GPUs
        # (the loader thread's first CUDA work), every rank idle meanwhile.
        ready = comm.agree([kas.loads_done()], any_rank=False)[0] if loading else True
        before = len(self._step_events)
        kas.step_boundary(step, install=ready)
        if not loading:
            return loss, False
        moved = self._step_events[before:]
        mine = {(e.site, e.seed) for e in moved if e.to_state is S.CULLED}
        self._cull_agreed(self.comm.agree([key in mine for key in self.slots], any_rank=True),
                          mine, step)
        installed = False
        for e in moved:
            if e.from_state is S.GERMINATED and e.to_state is S.TRAINING \
                    and kas.state_of(e.site, e.seed) is S.TRAINING:
                module = kas.site(e.site).module_of(e.seed)
                assert module is not None
                comm.broadcast_module(module)  # rank 0's random init everywhere
                installed = True
        return loss, installed

    def _cull_agreed(self, flags: Sequence[bool], mine: set[SlotKey], step: int) -> bool:
        """``flags``: per slot, culled on some rank (then one more: some rank must
        re-run the step). Cull here what another rank culled; return the last flag."""
        for key, flag in zip(self.slots, flags, strict=False):
            if flag and key not in mine and self.kasmina.state_of(*key) in LIVE_STATES:
                self._cull(key, step, "fault on another rank")
        return len(flags) > len(self.slots) and flags[-1]

    def _cull(self, key: SlotKey, step: int, reason: str) -> None:
        kas = self.kasmina
        was = kas.step
        kas.step = step  # the event belongs to this step, as a local fault cull's does
        try:
            kas.cull(key[0], key[1], reason)
        finally:
            kas.step = was

    # --- rank 0 → every rank ----------------------------------------------------------

    def _sync(self, step: int) -> None:
        t0 = time.perf_counter()
        comm = self.comm
        msg: SyncMessage | None = None
        blobs: list[bytes] = []
        if self.held is not None:
            specs, blobs, retired = self.outbox.take() if self.outbox else ([], [], [])
            msg = SyncMessage(step=step, kernels=tuple(specs), retired=tuple(retired),
                              decisions=tuple(encode_decision(d) for d in self.held.take()))
        got, blobs = broadcast_sync(comm, msg, blobs)
        if got.kernels or got.retired:
            receive_kernels(comm, got, blobs, self.catalog, public_key=self.public_key,
                            link_catalog=self.link_catalog)
            self.stats.kernels_shipped += len(got.kernels)
        for d in got.decisions:
            self._apply(decode_decision(d))
        self.stats.sync_ms.append((time.perf_counter() - t0) * 1e3)

    # --- replica identity -------------------------------------------------------------

    def _verify(self, step: int) -> None:
        if self.comm.max_int(len(self._step_events)):
            self.check(step, f"after the transitions of step {step}")

    def check(self, step: int, what: str) -> str:
        """All ranks' model states are bit-identical, or ReplicaDivergenceError."""
        t0 = time.perf_counter()
        kas = self.kasmina
        mirror = [[name, k, kas.state_of(name, k).name,
                   kas.site(name).state.slots[k].steps, kas.site(name).state.slots[k].cache_key]
                  for name, k in self.slots]
        digest = state_digest([self.host, kas], extra=mirror)
        self.comm.check_identical(digest, what)
        self.stats.checks.append((step, digest.hex()))
        self.stats.check_ms.append((time.perf_counter() - t0) * 1e3)
        return digest.hex()



# --- one rank's process -----------------------------------------------------------------


@dataclass
class DDPTrainRun:
    """``TrainRun``'s data-parallel twin: the same settings and hooks (rank 0 alone
    calls them), the same ``run(task) -> (result, catalog)``."""

    base: TrainRun
    comm: Comm
    verify: bool = False
    stats: DDPStats | None = None
    """Set by ``run``."""

    def run(self, task: TeacherStudentTask) -> tuple[TrainResult, KernelCatalog]:
        base, comm = self.base, self.comm
        run_id = comm.broadcast_bytes(base.config.run_id.encode() if comm.leader else None)
        config = replace(base.config, run_id=run_id.decode())
        public_key = load_public_key(base.public_key) if base.public_key is not None else None
        catalog = KernelCatalog()  # the kernels every rank has loaded
        if not comm.leader:
            follower = DDPTrainer(task, catalog, comm, config=config, public_key=public_key,
                                  verify=self.verify)
            self.stats = follower.stats
            return follower.run(), catalog
        link_catalog, shipments = KernelCatalog(), Shipments()
        trainer = DDPTrainer(
            task, catalog, comm, config=config, controller=base.controller,
            on_eval=base.on_eval, public_key=public_key,
            outbox=KernelOutbox(link_catalog, shipments), link_catalog=link_catalog,
            verify=self.verify,
        )
        self.stats = trainer.stats
        link = base.make_link(
            task, link_catalog, trainer, run_id=config.run_id,
            make_fetcher=functools.partial(ShippingFetcher, shipments=shipments),
        )
        return base.train_linked(trainer, link, link_catalog), link_catalog

