"""A training process's link to Esper: everything that is not training, on a
thread of its own with its own asyncio loop, so the training loop never waits
for the network, Postgres, a fetch or a load.

- **Kernels in**: an ordered JetStream consumer over ``esper.kernel.>`` with
  ``DeliverPolicy.ALL`` replays the stream's history at start (a late trainer
  learns every kernel made ready before it — and every retirement, in order),
  then follows it live. ``kernel.ready``: a kernel that fits one of the
  trainer's sites and serves its device is fetched, verified and loaded
  (``fetch.ArtifactFetcher``) and becomes LOADED in the catalog; others are
  IGNORED. ``kernel.retired``: RETIRED at once — the controller never offers it
  again (seeds already running it are left to the lifecycle).
- **Seed events out**: ``record`` (thread-safe, never blocks) queues Kasmina's
  transitions; the link writes them to ``seed_events`` + outbox in one
  transaction and publishes them on ``esper.seed.<event>`` (``seedlog``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from esper.artifacts.signing import load_public_key
from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.topology import Topology, ensure_streams
from esper.db.engine import create_engine, session_factory
from esper.kasmina import SeedEvent, SiteSchema
from esper.stages.deploy import serves_target
from esper.train.catalog import KernelCatalog, KernelInfo, KernelStatus, fits
from esper.train.fetch import ArtifactFetcher
from esper.train.seedlog import SeedLog, seed_message

log = logging.getLogger(__name__)

KERNELS_STREAM = "ESPER_KERNELS"


@dataclass(frozen=True)
class LinkConfig:
    nats_url: str | list[str]
    database_url: str
    public_key: Path | None
    """The artifacts' verification key (trainers never hold the private key); without
    one, every artifact is refused (pass-through kernels still load)."""
    cache_dir: Path
    """The trainer's local disk tier of verified artifacts."""
    run_id: str
    target: str
    """This trainer's device as a compile target: ``cpu`` or ``cuda:sm_90``."""
    fetch_concurrency: int = 4


class TrainerLink:
    """See the module docstring. ``start`` → use → ``stop``; or ``with link:``."""

    def __init__(
        self,
        config: LinkConfig,
        catalog: KernelCatalog,
        sites: Sequence[SiteSchema],
        *,
        on_kernel: Callable[[KernelInfo], None] | None = None,
        make_fetcher: Callable[..., ArtifactFetcher] = ArtifactFetcher,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.sites = list(sites)
        self.on_kernel = on_kernel
        """Called (on the link's thread) each time a kernel's status changes."""
        self.make_fetcher = make_fetcher
        """``(sessions, nc, public_key, cache_dir) -> ArtifactFetcher`` (``--ddp``: one
        that also keeps what the other ranks need)."""
        self.seedlog: SeedLog | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[SeedEvent, dict[str, Any], datetime] | None] | None = None
        self._started = threading.Event()
        self._replayed = threading.Event()
        self._error: BaseException | None = None
        self._replay_until = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_records = 0
        self._lock = threading.Lock()

    # --- the training thread's side ------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Connect, subscribe and start replaying; returns once subscribed."""
        self._thread = threading.Thread(target=self._run, name="esper-trainer-link", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"trainer link did not start within {timeout}s")
        if self._error is not None:
            raise self._error

    def wait_replayed(self, timeout: float) -> bool:
        """Until the kernel history present at start has been read (not loaded)."""
        return self._replayed.wait(timeout)

    def wait_loaded(self, timeout: float) -> bool:
        """Until no announced kernel is still loading (tests, demo start-up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._replayed.is_set() and not self.catalog.count([KernelStatus.LOADING]):
                return True
            time.sleep(0.02)
        return False

    def record(self, event: SeedEvent, detail: dict[str, Any]) -> None:
        """Queue a seed transition for Postgres and the bus. Thread-safe, never blocks."""
        if self._loop is None or self._queue is None:
            raise RuntimeError("the trainer link is not running")
        with self._lock:
            self._pending_records += 1
        at = datetime.now(UTC)  # when it happened, not when the link got to it
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (event, detail, at))
        except RuntimeError:  # the link's loop is gone (it failed): training goes on
            with self._lock:
                self._pending_records -= 1
            log.error("trainer link is down: seed event %s of %s[%d] not recorded",
                      event.event, event.site, event.seed)

    def wait_recorded(self, timeout: float) -> bool:
        """Until every recorded event is stored (tests; ``stop`` does this too)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending_records == 0:
                    return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """Store and publish what is queued, then disconnect."""
        if self._loop is not None and self._queue is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be gone already
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> TrainerLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the link's thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to whoever waits on us
            log.exception("trainer link failed")
            self._error = exc
        finally:
            self._started.set()
            self._replayed.set()

    async def _main(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        public_key = load_public_key(cfg.public_key) if cfg.public_key is not None else None
        nc = await connect(cfg.nats_url, name=f"esper-trainer-{cfg.run_id[:12]}")
        engine = create_engine(cfg.database_url, pool_size=3)
        fetcher: ArtifactFetcher | None = None
        try:
            js = nc.jetstream()
            await ensure_streams(js, Topology(), update=False)
            sessions = session_factory(engine)
            fetcher = self.make_fetcher(sessions, nc, public_key, cfg.cache_dir)
            self.seedlog = SeedLog(sessions, js)
            limit = asyncio.Semaphore(cfg.fetch_concurrency)
            info = await js.stream_info(KERNELS_STREAM)
            self._replay_until = info.state.last_seq
            if self._replay_until == 0:
                self._replayed.set()

            async def on_msg(msg: Msg) -> None:
                self._on_kernel_msg(msg, fetcher, limit)

            sub = await js.subscribe(
                "esper.kernel.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL,
                cb=on_msg,
            )
            self._started.set()
            await self._write_seed_events()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.seedlog.flush()
        finally:
            if fetcher is not None:
                with contextlib.suppress(Exception):
                    await fetcher.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5.0)
            await engine.dispose()

    def _on_kernel_msg(self, msg: Msg, fetcher: ArtifactFetcher, limit: asyncio.Semaphore) -> None:
        try:
            seq = msg.metadata.sequence.stream
        except Exception:
            seq = 0
        try:
            event = ev.decode(msg.subject, msg.data)
        except Exception as exc:
            log.warning("ignoring a malformed message on %s: %s", msg.subject, exc)
            event = None
        if isinstance(event, ev.KernelReady):
            self._on_ready(event, fetcher, limit)
        elif isinstance(event, ev.KernelRetired):
            info = self.catalog.retire(event.cache_key, event.reason)
            log.info("kernel %s retired (%s): no more germinations", event.cache_key[:12],
                     event.reason)
            if info is not None:
                self._notify(info)
        if seq >= self._replay_until:
            self._replayed.set()

    def _on_ready(self, ready: ev.KernelReady, fetcher: ArtifactFetcher,
                  limit: asyncio.Semaphore) -> None:
        info = KernelInfo.of(ready)
        why = self._ignore_reason(info)
        if why is not None:
            info = replace(info, status=KernelStatus.IGNORED, error=why)
        if not self.catalog.announce(info):
            return  # re-announced (a resubmission walked the pipeline again)
        if why is not None:
            self._spawn(self._name_only(info, fetcher))
            return
        self._spawn(self._load(info, fetcher, limit))

    def _ignore_reason(self, info: KernelInfo) -> str | None:
        if not serves_target(info.target, info.backend, self.config.target):
            return f"built for {info.target} ({info.backend}), this trainer is {self.config.target}"
        if info.seed_schema is None:
            return "not a seed kernel (one input, the same schema out)"
        if not any(fits(info.seed_schema, site) for site in self.sites):
            sites = ", ".join(sorted({str(s) for s in self.sites}))
            shape = ", ".join(map(str, info.seed_schema.shape))
            return f"no site takes {info.seed_schema.dtype}[{shape}] (sites: {sites})"
        return None

    async def _name_only(self, info: KernelInfo, fetcher: ArtifactFetcher) -> None:
        found = await fetcher.blueprint(info.blueprint_hash)
        if found is not None:
            self._notify(self.catalog.update(info.cache_key, name=found[0]))

    async def _load(self, info: KernelInfo, fetcher: ArtifactFetcher,
                    limit: asyncio.Semaphore) -> None:
        async with limit:
            started = time.perf_counter()
            try:
                found = await fetcher.blueprint(info.blueprint_hash)
                name, ir = found if found is not None else ("", None)
                self.catalog.update(info.cache_key, name=name)
                factory, source = await fetcher.factory(info, ir)
            except Exception as exc:
                log.error("kernel %s (%s) refused: %s", info.cache_key[:12], info.label, exc)
                self._notify(self.catalog.update(
                    info.cache_key, status=KernelStatus.FAILED, error=f"{type(exc).__name__}: {exc}"
                ))
                return
            ms = (time.perf_counter() - started) * 1e3
            log.info("kernel %s (%s) loaded from %s in %.1f ms", info.cache_key[:12], name,
                     source, ms)
            self._notify(self.catalog.update(info.cache_key, status=KernelStatus.LOADED,
                                             factory=factory, source=source, load_ms=ms))

    def _notify(self, info: KernelInfo | None) -> None:
        if info is not None and self.on_kernel is not None:
            try:
                self.on_kernel(info)
            except Exception:
                log.exception("on_kernel callback failed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_seed_events(self) -> None:
        """Until the stop sentinel: store and publish queued seed events in batches."""
        assert self._queue is not None and self.seedlog is not None
        stopping = False
        while not stopping:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            stopping = None in items
            batch = [i for i in items if i is not None]
            if batch:
                messages = [seed_message(self.config.run_id, e, d, at) for e, d, at in batch]
                try:
                    await self.seedlog.write(messages)
                except Exception:
                    # Training goes on; the loss of history is loud, never silent.
                    log.exception("%d seed events could not be stored", len(messages))
                finally:
                    with self._lock:
                        self._pending_records -= len(batch)
