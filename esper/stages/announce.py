"""Publish events whose outbox rows are already committed, right away, and mark
the rows sent: for processes that write the outbox but run no stage worker (the
trainer's seed events, ``esper kernels retire``). A publish that fails leaves
its row unsent for any running relay's poll path (``OutboxRelay.flush``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nats.js import JetStreamContext
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.bus import events as ev
from esper.bus.publish import msg_headers
from esper.db.models import OutboxEntry

log = logging.getLogger(__name__)


async def publish_committed(
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
    events: Sequence[ev.EsperEvent],
    *,
    timeout: float = 5.0,
) -> int:
    """Publish ``events`` (``Nats-Msg-Id`` = event_id, so a relay's later copy is
    dropped), then mark the acked ones sent. Returns how many the stream acked."""
    if not events:
        return 0
    futures = [
        await js.publish_async(e.subject, ev.encode(e), headers=msg_headers(e.event_id))
        for e in events
    ]
    results = await asyncio.gather(
        *(asyncio.wait_for(f, timeout) for f in futures), return_exceptions=True
    )
    acked = [e.event_id for e, r in zip(events, results, strict=True)
             if not isinstance(r, BaseException)]
    failed = len(events) - len(acked)
    if failed:
        log.warning("%d of %d publishes failed; the outbox keeps them for a relay",
                    failed, len(events))
    if acked:
        async with sessions() as session, session.begin():
            await session.execute(
                update(OutboxEntry)
                .where(OutboxEntry.event_id.in_(acked), OutboxEntry.sent_at.is_(None))
                .values(sent_at=func.now())
            )
    return len(acked)
