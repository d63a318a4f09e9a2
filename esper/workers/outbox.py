"""The transactional outbox: events are written as rows in the transaction that
caused them, and a relay publishes them to JetStream (``Nats-Msg-Id`` =
event_id) and marks them sent.

Fast path: right after a commit the worker hands the relay the rows it just
wrote, which are published from memory. Safety net: every ``poll_interval``
the relay also takes unsent rows older than ``stale_after`` (a worker died
between commit and publish, or NATS was down) with ``FOR UPDATE SKIP LOCKED``,
so several relays cooperate. A relay that dies after publishing but before
marking only causes a re-publish, which JetStream drops as a duplicate (and a
downstream inbox would skip anyway). Marking is committed without waiting for
fsync: losing a mark costs a harmless re-publish, never an event.

Fast-path marks are gathered for up to ``mark_delay`` (well under
``stale_after``) and written in one statement: at a low event rate one
autocommit round trip per commit was a fair share of a worker's CPU, and a
late mark only keeps a row looking unsent a little longer. The default equals
``poll_interval``, so marks mostly ride on the poll: one statement marks what
was gathered and asks whether any row is stale, one round trip per poll on a
raw asyncpg connection (two SQLAlchemy statements before; three workers made
about 30 such statements a second, each costing both ends a wake-up)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import Table, delete, func, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from esper.bus import events as ev
from esper.bus.publish import publish_pipelined
from esper.db.models import OutboxEntry
from esper.workers import inbox, sqltext
from esper.workers.failures import is_transient
from esper.workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

_outbox = cast(Table, OutboxEntry.__table__)
_ASYNC_COMMIT = text("SET LOCAL synchronous_commit TO OFF")


@dataclass(frozen=True)
class OutboxRow:
    id: int | None  # None: written by write_literal, whose statement returns nothing
    event_id: uuid.UUID
    subject: str
    payload: bytes


# asyncpg's $n placeholders (sessions send it through exec_driver_sql); the
# runtime's own transactions use write_literal instead.
WRITE_SQL = """
    INSERT INTO outbox (event_id, subject, payload)
    SELECT e, s, p FROM unnest($1::uuid[], $2::varchar[], $3::bytea[])
        WITH ORDINALITY AS x(e, s, p, n)
    ORDER BY n
    RETURNING id, event_id
"""

_WriteArgs = tuple[list[uuid.UUID], list[str], list[bytes]]


def _write_args(events: Sequence[ev.EsperEvent], payloads: Sequence[bytes] | None) -> _WriteArgs:
    if payloads is None:
        payloads = [ev.encode(e) for e in events]
    return [e.event_id for e in events], [e.subject for e in events], list(payloads)


def _rows(args: _WriteArgs, returned: Iterable[Any]) -> list[OutboxRow]:
    ids = {r[1]: r[0] for r in returned}
    return [OutboxRow(ids[e], e, s, p) for e, s, p in zip(*args, strict=True)]


async def write(
    session: AsyncSession,
    events: Sequence[ev.EsperEvent],
    payloads: Sequence[bytes] | None = None,
) -> list[OutboxRow]:
    """Queue ``events`` (``payloads``: their encodings, if already made) for
    publication in the caller's transaction; returns the rows (with ids) for
    the relay's fast path once that commits."""
    if not events:
        return []
    args = _write_args(events, payloads)
    conn = await session.connection()
    return _rows(args, (await conn.exec_driver_sql(WRITE_SQL, args)).all())


def write_literal(
    events: Sequence[ev.EsperEvent], payloads: Sequence[bytes] | None = None
) -> tuple[str, list[OutboxRow]]:
    """``write`` as one self-contained statement (values inline, nothing
    returned), for the runtime to send in the same round trip as its COMMIT;
    and the rows the relay's fast path publishes once that commits. Relay
    marks go by event_id, so the rows need no id from the server."""
    if not events:
        return "", []
    ids, subjects, data = _write_args(events, payloads)
    values = ",".join(
        f"({sqltext.uuid_literal(e)},{sqltext.text_literal(s)},{sqltext.bytea_literal(p)})"
        for e, s, p in zip(ids, subjects, data, strict=True)
    )
    sql = f"INSERT INTO outbox (event_id, subject, payload) VALUES {values};"
    return sql, [OutboxRow(None, e, s, p) for e, s, p in zip(ids, subjects, data, strict=True)]


# The rows of $1 (event ids) not yet marked: marked sent now. Every path
# marks with it (asyncpg's placeholders; sessions send it by exec_driver_sql).
_MARK = "UPDATE outbox SET sent_at = now() WHERE event_id = ANY($1::uuid[]) AND sent_at IS NULL"
# _MARK, and whether the poll path has work: an unsent row older than $2
# seconds, not counting those just marked (the statement's snapshot still
# sees them unsent).
_MARK_AND_LOOK = f"""
    WITH marked AS ({_MARK})
    SELECT EXISTS (
        SELECT 1 FROM outbox
        WHERE sent_at IS NULL
          AND created_at < now() - $2::float8 * interval '1 second'
          AND NOT (event_id = ANY($1::uuid[]))
    )
"""


def mark_engine_for(engine: AsyncEngine) -> AsyncEngine:
    """A small autocommit pool on the same database whose commits do not wait
    for fsync, for marking rows sent (a lost mark is only a re-publish).

    Custom plans, as on the workers' own connections (esper.workers.run_stage):
    the poll's statement is prepared once and takes an array of any length,
    and a generic plan made while the outbox was nearly empty would scan the
    whole table, which keeps an hour of sent rows, five times a second."""
    return create_async_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        pool_size=1,
        max_overflow=1,
        connect_args={
            "server_settings": {
                "synchronous_commit": "off",
                "plan_cache_mode": "force_custom_plan",
            }
        },
    )


class OutboxRelay:
    """Publishes outbox rows; see the module docstring for the two paths."""

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        js: JetStreamContext,
        *,
        batch: int = 500,
        poll_interval: float = 0.2,
        stale_after: float = 1.0,
        publish_timeout: float = 5.0,
        metrics: WorkerMetrics | None = None,
        keep_sent: timedelta = timedelta(hours=1),
        keep_inbox: timedelta = timedelta(days=7),
        prune_every: float = 600.0,
        mark_engine: AsyncEngine | None = None,
        mark_delay: float = 0.2,
        nc: NATS | None = None,
    ) -> None:
        self._sf = session_factory
        # With the connection, runs of rows go as atomic batches (publish_pipelined).
        self._nc = nc
        self._mark_engine = mark_engine
        self._js = js
        self.batch = batch
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self.publish_timeout = publish_timeout
        self._metrics = metrics
        self._keep_sent = keep_sent
        self._keep_inbox = keep_inbox
        self._prune_every = prune_every
        self.mark_delay = mark_delay
        # Fast path: rows published right after their commit, acks pending.
        self._inflight: list[tuple[OutboxRow, asyncio.Future[Any]]] = []
        # Event ids of fast-path rows the stream acked, to be marked sent by ``_mark_due``.
        self._unmarked: list[uuid.UUID] = []
        self._mark_due: float | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.published_total = 0
        # Rows JetStream already had: a relay died between publish and mark.
        self.duplicates_total = 0

    async def publish_now(self, rows: Sequence[OutboxRow]) -> None:
        """Fast path: publish just-committed rows at once (no round trip to
        Postgres first); the relay task collects the acks and marks them."""
        if not rows:
            return
        try:
            # One transaction's rows: tagged as a burst for the next stage.
            self._inflight += await self._start(rows, burst=True)
        except Exception as exc:  # disconnected, stalled: the poll path will send them
            log.info("outbox fast path skipped: %s", exc)
        self._wake.set()

    def trigger(self) -> None:
        """Look for unsent rows now, whatever their age."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Relay until ``stop()``; then publish what is still queued (best effort)."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        next_prune = loop.time() + self._prune_every
        failures = 0
        while not self._stopping:
            wake_at = next_poll if self._mark_due is None else min(next_poll, self._mark_due)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - loop.time()))
            self._wake.clear()
            try:
                await self._collect_inflight()
                if self._mark_due is not None and loop.time() >= self._mark_due:
                    await self._mark_unmarked()
                if loop.time() >= next_poll:
                    # Marked first, so the poll below does not publish them again.
                    if await self._mark_and_look():
                        await self.flush(min_age=self.stale_after)
                    next_poll = loop.time() + self.poll_interval
                if loop.time() >= next_prune:
                    await self.prune()
                    next_prune = loop.time() + self._prune_every
                failures = 0
            except Exception as exc:
                log_ = log.warning if is_transient(exc) else log.exception
                log_("outbox relay: %s; retrying", exc)
                failures += 1
                await asyncio.sleep(min(0.1 * 2**failures, 2.0))
        with contextlib.suppress(Exception):
            await self._collect_inflight()
        with contextlib.suppress(Exception):
            await self._mark_unmarked()

    async def _collect_inflight(self) -> None:
        while self._inflight:
            pairs, self._inflight = self._inflight, []
            # Unacked rows stay unsent in Postgres: the poll path retries them.
            acked = await self._collect(pairs)
            self._count(len(acked))
            if not acked:
                continue
            self._unmarked += acked
            if self._mark_due is None:
                self._mark_due = asyncio.get_running_loop().time() + self.mark_delay
            if len(self._unmarked) >= self.batch or self.mark_delay <= 0:
                await self._mark_unmarked()

    async def _mark_unmarked(self, leave: int = 0) -> None:
        """Mark the gathered fast-path rows sent, a batch at a time, until at
        most ``leave`` are left (they stay gathered if it fails)."""
        while len(self._unmarked) > leave:
            ids = self._unmarked[: self.batch]
            await self._mark(ids)
            del self._unmarked[: len(ids)]
        if not self._unmarked:
            self._mark_due = None

    async def _mark_and_look(self) -> bool:
        """Mark the gathered fast-path rows sent and say whether the poll path
        may find work: with the mark pool, one autocommit round trip for both,
        five times a second per worker, for rows that are nearly always all sent."""
        if self._mark_engine is None:
            await self._mark_unmarked()
            return True
        await self._mark_unmarked(leave=self.batch)  # a backlog: all but the last batch
        ids = list(self._unmarked)
        async with self._raw_mark_connection() as raw:
            stale = bool(await raw.fetchval(_MARK_AND_LOOK, ids, float(self.stale_after)))
        del self._unmarked[: len(ids)]
        self._mark_due = None
        return stale

    async def _mark(self, ids: list[uuid.UUID]) -> None:
        if self._mark_engine is not None:
            # One round trip: autocommit, and the connection never waits for fsync.
            async with self._raw_mark_connection() as raw:
                await raw.execute(_MARK, ids)
            return
        async with self._sf() as session, session.begin():
            await session.execute(_ASYNC_COMMIT)
            await (await session.connection()).exec_driver_sql(_MARK, (ids,))

    @contextlib.asynccontextmanager
    async def _raw_mark_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """The mark pool's asyncpg connection. Its failures bypass SQLAlchemy,
        which would have dropped a connection the server closed (a Postgres
        restart): so any failure drops it here, and the next call reconnects."""
        assert self._mark_engine is not None
        async with self._mark_engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            try:
                yield raw
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise

    async def flush(self, min_age: float = 0.0) -> int:
        """Poll path: publish unsent rows at least ``min_age`` seconds old until
        none are left (or only failing ones)."""
        total = 0
        while True:
            sent, seen = await self.flush_once(min_age)
            total += sent
            if seen < self.batch or sent < seen:
                return total

    async def flush_once(self, min_age: float = 0.0) -> tuple[int, int]:
        """One batch: lock up to ``batch`` unsent rows, publish them pipelined,
        mark those the stream acknowledged. Returns (published, locked)."""
        async with self._sf() as session, session.begin():
            await session.execute(_ASYNC_COMMIT)
            query = (
                select(_outbox.c.id, _outbox.c.event_id, _outbox.c.subject, _outbox.c.payload)
                .where(_outbox.c.sent_at.is_(None))
                .order_by(_outbox.c.id)
                .limit(self.batch)
                .with_for_update(skip_locked=True)
            )
            if min_age > 0:
                query = query.where(
                    _outbox.c.created_at < func.now() - timedelta(seconds=min_age)
                )
            rows = [OutboxRow(*r) for r in (await session.execute(query)).all()]
            if not rows:
                return 0, 0
            acked = await self._publish(rows)
            await self._after_publish(acked)
            if acked:
                await (await session.connection()).exec_driver_sql(_MARK, (acked,))
        self._count(len(acked))
        return len(acked), len(rows)

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[uuid.UUID]:
        """Publish pipelined (async acks); the event ids of rows the stream acked."""
        return await self._collect(await self._start(rows))

    async def _start(
        self, rows: Sequence[OutboxRow], *, burst: bool = False
    ) -> list[tuple[OutboxRow, Any]]:
        items = [(r.subject, r.payload, r.event_id) for r in rows]
        futures = await publish_pipelined(self._js, items, nc=self._nc, burst=burst)
        return list(zip(rows, futures, strict=True))

    async def _collect(self, pairs: Sequence[tuple[OutboxRow, Any]]) -> list[uuid.UUID]:
        rows = [r for r, _ in pairs]
        futures = [f for _, f in pairs]
        # One wait for the whole batch (a wait_for per future would be a task each).
        _done, pending = await asyncio.wait(futures, timeout=self.publish_timeout)
        for f in pending:
            f.cancel()
        results: list[Any] = [
            TimeoutError("no publish ack") if f in pending else (f.exception() or f.result())
            for f in futures
        ]
        acked = [
            row.event_id
            for row, r in zip(rows, results, strict=True)
            if not isinstance(r, BaseException)
        ]
        failed = [r for r in results if isinstance(r, BaseException)]
        dups = sum(bool(getattr(r, "duplicate", False)) for r in results)
        if dups:
            self.duplicates_total += dups
            if self._metrics is not None:
                self._metrics.duplicate_publishes(dups)
        if failed:
            log.warning(
                "outbox relay: %d of %d publishes failed: %r", len(failed), len(rows), failed[0]
            )
        return acked

    def _count(self, n: int) -> None:
        self.published_total += n
        if self._metrics is not None and n:
            self._metrics.published(n)

    async def _after_publish(self, ids: list[uuid.UUID]) -> None:
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
