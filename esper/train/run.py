"""One training process wired to Esper: the link (kernels in, seed events out)
around a Trainer. What ``esper train`` and ``esper demo`` run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.artifacts.signing import default_private_key_path, public_key_path
from esper.infra.endpoints import Endpoints
from esper.kasmina import SeedEvent
from esper.settings import Settings
from esper.train.catalog import KernelCatalog, KernelInfo, device_target
from esper.train.controller import Controller
from esper.train.loop import Progress, TrainConfig, Trainer, TrainResult
from esper.train.task import TeacherStudentTask
from esper.train.worker import LinkConfig, TrainerLink

log = logging.getLogger(__name__)


def public_key_of(settings: Settings) -> Path | None:
    """``ESPER_PUBLIC_KEY``, else the public half of ``ESPER_SIGNING_KEY``, else the
    embedded default under ``ESPER_HOME`` (made by ``esper up``); None if absent."""
    if settings.public_key is not None:
        return settings.public_key
    if settings.signing_key is not None:
        return public_key_path(settings.signing_key)
    path = public_key_path(default_private_key_path(settings.home))
    return path if path.exists() else None


@dataclass
class TrainRun:
    """Everything one training process needs beyond its task."""

    endpoints: Endpoints
    home: Path
    public_key: Path | None
    config: TrainConfig
    controller: Controller | None = None
    replay_timeout: float = 30.0
    wait_for_kernels: int = 0
    """Before step 0, wait (up to ``wait_timeout``) until this many kernels are loaded."""
    wait_timeout: float = 60.0
    on_eval: Progress | None = None
    on_event: Callable[[SeedEvent, dict[str, Any]], None] | None = None
    on_kernel: Callable[[KernelInfo], None] | None = None
    waited_s: float = 0.0
    """Set by ``run``: seconds from start to step 0 (connect, replay, kernel wait)."""

    def run(self, task: TeacherStudentTask) -> tuple[TrainResult, KernelCatalog]:
        catalog = KernelCatalog()
        trainer = Trainer(task, catalog, config=self.config, controller=self.controller,
                          on_eval=self.on_eval)
        link = self.make_link(task, catalog, trainer, run_id=self.config.run_id)
        return self.train_linked(trainer, link, catalog), catalog

    def make_link(self, task: TeacherStudentTask, catalog: KernelCatalog, trainer: Trainer,
                  *, run_id: str, **kw: Any) -> TrainerLink:
        """The trainer's connection to NATS and PostgreSQL (``kw`` as TrainerLink's)."""
        return TrainerLink(
            LinkConfig(
                nats_url=self.endpoints.nats_url, database_url=self.endpoints.database_url,
                public_key=self.public_key, cache_dir=self.home / "artifacts",
                run_id=run_id, target=device_target(task.device),
            ),
            catalog, trainer.site_schemas, on_kernel=self.on_kernel, **kw,
        )

    def train_linked(self, trainer: Trainer, link: TrainerLink,
                     catalog: KernelCatalog) -> TrainResult:
        """Record seed events through ``link``, replay the kernel history, wait for
        kernels if asked, then train; the link stops whatever happens."""
        user_hook = self.on_event

        def on_event(event: SeedEvent, detail: dict[str, Any]) -> None:
            link.record(event, detail)
            if user_hook is not None:
                user_hook(event, detail)

        trainer.on_event = on_event
        started = time.monotonic()
        link.start()
        try:
            if not link.wait_replayed(self.replay_timeout):
                log.warning("kernel history not replayed within %.0fs; training anyway",
                            self.replay_timeout)
            if self.wait_for_kernels:
                wait_for_kernels(catalog, trainer, self.wait_for_kernels, self.wait_timeout)
            self.waited_s = time.monotonic() - started
            return trainer.run()
        finally:
            link.stop()


def wait_for_kernels(catalog: KernelCatalog, trainer: Trainer, n: int, timeout: float) -> None:
    """Until ``n`` distinct kernels fit the trainer's sites (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = {k.cache_key for s in trainer.site_schemas for k in catalog.usable(s)}
        if len(keys) >= n:
            return
        time.sleep(0.05)
    log.warning("fewer than %d kernels loaded within %.0fs; training anyway", n, timeout)
