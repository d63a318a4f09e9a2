"""The transactional outbox: events are written as rows in the transaction that
caused them, and a relay publishes unsent rows to JetStream in id order.

A relay that dies after publishing but before marking rows sent publishes them
again on restart; the ``Nats-Msg-Id`` header makes JetStream drop the copy
(and a downstream inbox would skip it anyway). Several relays cooperate
through ``FOR UPDATE SKIP LOCKED``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta

from nats.js import JetStreamContext
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.bus import events as ev
from esper.bus.publish import msg_headers
from esper.db.models import OutboxEntry
from esper.workers import inbox
from esper.workers.failures import is_transient
from esper.workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

_outbox = OutboxEntry.__table__


async def write(session: AsyncSession, events: Sequence[ev.EsperEvent]) -> None:
    """Queue ``events`` for publication, in the caller's transaction."""
    if not events:
        return
    rows = [
        {"event_id": e.event_id, "subject": e.subject, "payload": ev.encode(e)} for e in events
    ]
    await session.execute(insert(_outbox), rows)


class OutboxRelay:
    """Publishes unsent outbox rows: woken by ``trigger()`` right after a commit,
    and every ``poll_interval`` seconds regardless, so nothing is stranded by a
    worker that died between commit and publish."""

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        js: JetStreamContext,
        *,
        batch: int = 500,
        poll_interval: float = 0.2,
        publish_timeout: float = 5.0,
        metrics: WorkerMetrics | None = None,
        keep_sent: timedelta = timedelta(hours=1),
        keep_inbox: timedelta = timedelta(days=7),
        prune_every: float = 600.0,
    ) -> None:
        self._sf = session_factory
        self._js = js
        self.batch = batch
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self._metrics = metrics
        self._keep_sent = keep_sent
        self._keep_inbox = keep_inbox
        self._prune_every = prune_every
        self._wake = asyncio.Event()
        self._stopping = False
        self.published_total = 0
        # Rows JetStream already had: a relay died between publish and mark.
        self.duplicates_total = 0

    def trigger(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Relay until ``stop()``; then one last flush (best effort)."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self._prune_every
        failures = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                await self.flush()
                if loop.time() >= next_prune:
                    await self.prune()
                    next_prune = loop.time() + self._prune_every
                failures = 0
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("outbox relay failed")
                else:
                    log.warning("outbox relay: %s; retrying", exc)
                failures += 1
                await asyncio.sleep(min(0.1 * 2**failures, 2.0))
        with contextlib.suppress(Exception):
            await self.flush()

    async def flush(self) -> int:
        """Publish until no unsent rows are left (or only failing ones)."""
        total = 0
        while True:
            sent, seen = await self.flush_once()
            total += sent
            if seen < self.batch or sent < seen:
                return total

    async def flush_once(self) -> tuple[int, int]:
        """One batch: lock up to ``batch`` unsent rows, publish them pipelined,
        mark those the stream acknowledged. Returns (published, locked)."""
        async with self._sf() as session, session.begin():
            rows = (
                await session.execute(
                    select(_outbox.c.id, _outbox.c.event_id, _outbox.c.subject, _outbox.c.payload)
                    .where(_outbox.c.sent_at.is_(None))
                    .order_by(_outbox.c.id)
                    .limit(self.batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0, 0
            acked = await self._publish(rows)
            await self._after_publish(acked)
            if acked:
                await session.execute(
                    update(_outbox).where(_outbox.c.id.in_(acked)).values(sent_at=func.now())
                )
        self.published_total += len(acked)
        if self._metrics is not None:
            self._metrics.published(len(acked))
        return len(acked), len(rows)

    async def _publish(self, rows: Sequence[tuple[int, uuid.UUID, str, bytes]]) -> list[int]:
        futures = []
        for _id, event_id, subject, payload in rows:
            futures.append(
                await self._js.publish_async(subject, payload, headers=msg_headers(event_id))
            )
        results = await asyncio.gather(
            *(asyncio.wait_for(f, self.publish_timeout) for f in futures), return_exceptions=True
        )
        pairs = zip(rows, results, strict=True)
        acked = [row[0] for row, r in pairs if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        dups = sum(bool(getattr(r, "duplicate", False)) for r in results)
        if dups:
            self.duplicates_total += dups
            if self._metrics is not None:
                self._metrics.duplicate_publishes(dups)
        if failed:
            log.warning(
                "outbox relay: %d of %d publishes failed: %s", len(failed), len(rows), failed[0]
            )
            if not acked:
                raise ConnectionError(f"outbox publish failed: {failed[0]!r}")
        return acked

    async def _after_publish(self, ids: list[int]) -> None:
        """Between publish and mark: a seam for fault-injection tests."""

    async def prune(self) -> None:
        """Drop rows nobody needs any more: old sent outbox rows and old inbox rows."""
        async with self._sf() as session, session.begin():
            await session.execute(
                delete(_outbox).where(
                    _outbox.c.sent_at.is_not(None), _outbox.c.sent_at < func.now() - self._keep_sent
                )
            )
            await inbox.prune(session, self._keep_inbox)
