"""Seed lifecycle events from a trainer into Postgres and onto the bus.

Who writes what: the trainer writes each ``seed_events`` row AND its outbox row
in ONE transaction (so the SQL history and the bus can never disagree), then
publishes the events at once (``Nats-Msg-Id`` = event_id) and marks the rows
sent. A publish that fails leaves its row unsent: ``flush`` at shutdown, or any
stage worker's outbox relay, sends it later; JetStream drops duplicates, and
``seed_events.event_id`` is unique, so nothing is ever recorded twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.bus import events as ev
from esper.db.models import SeedEvent as SeedEventRow
from esper.kasmina import SeedEvent
from esper.stages.announce import publish_committed
from esper.workers import outbox
from esper.workers.failures import is_transient

log = logging.getLogger(__name__)


def seed_message(
    run_id: str, event: SeedEvent, detail: dict[str, Any], at: datetime | None = None
) -> ev.SeedEventMsg:
    """The wire event for one Kasmina transition of run ``run_id`` (``at``: when)."""
    return ev.SeedEventMsg(
        occurred_at=at or datetime.now(UTC),
        correlation_id=run_id, run_id=run_id, site=event.site, seed=event.seed,
        event=event.event, from_state=event.from_state.name, to_state=event.to_state.name,
        step=event.step, kernel_cache_key=event.cache_key,
        detail={"reason": event.reason, **detail},
    )


async def store(session: AsyncSession, messages: Sequence[ev.SeedEventMsg]) -> None:
    """``seed_events`` rows + outbox rows, in the caller's transaction (idempotent)."""
    if not messages:
        return
    await session.execute(
        insert(SeedEventRow)
        .values([
            {
                "event_id": m.event_id, "run_id": m.run_id, "site": m.site, "seed": m.seed,
                "event": m.event, "from_state": m.from_state, "to_state": m.to_state,
                "kernel_cache_key": m.kernel_cache_key, "step": m.step, "detail": m.detail,
                "at": m.occurred_at,
            }
            for m in messages
        ])
        .on_conflict_do_nothing(index_elements=[SeedEventRow.event_id])
    )
    await outbox.write(session, list(messages))


class SeedLog:
    """Writes batches of seed events (``write``) and publishes them."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], js: JetStreamContext) -> None:
        self._sessions = sessions
        self._js = js
        self.written = 0
        self.published = 0
        self.unsent = False

    async def write(self, messages: Sequence[ev.SeedEventMsg], *, attempts: int = 30) -> None:
        """Commit, then publish. A database outage is waited out (with backoff, up to
        ``attempts`` tries): the events are the run's history and must not be lost."""
        for attempt in range(attempts):
            try:
                async with self._sessions() as session, session.begin():
                    await store(session, messages)
                break
            except Exception as exc:
                if attempt == attempts - 1 or not is_transient(exc):
                    raise
                log.warning("seed events not stored yet (%s); retrying", exc)
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        self.written += len(messages)
        try:
            sent = await publish_committed(self._js, self._sessions, messages)
        except Exception as exc:
            log.warning("seed events stored but not published yet: %s", exc)
            sent = 0
        self.published += sent
        self.unsent |= sent < len(messages)

    async def flush(self) -> None:
        """Publish whatever is still unsent in the outbox (best effort)."""
        if not self.unsent:
            return
        relay = outbox.OutboxRelay(self._sessions, self._js)
        try:
            await relay.flush()
            self.unsent = False
        except Exception as exc:
            log.warning("could not flush the outbox: %s", exc)
