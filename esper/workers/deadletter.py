"""Dead letters: a message a stage gave up on, kept whole in SQL with the
reason, and announced on ``esper.dlq.<stage>`` through the outbox."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from esper.bus import events as ev
from esper.db.models import DeadLetter
from esper.workers import inbox, outbox

_dead = cast(Table, DeadLetter.__table__)

_EXCERPT = 512


@dataclass(frozen=True)
class DeadLetterInfo:
    stage: str
    subject: str
    payload: bytes
    reason: str
    delivery_count: int
    stream_seq: int | None
    event_id: str | None = None
    correlation_id: str | None = None


async def record(session: AsyncSession, info: DeadLetterInfo) -> list[outbox.OutboxRow]:
    """Insert the dead letter (once per stage and stream sequence) and queue its
    notice in the outbox, in the caller's transaction. Returns the outbox rows
    (none if this message was dead-lettered before)."""
    stmt = (
        insert(_dead)
        .values(
            subject=info.subject[:200],
            stage=info.stage,
            event_id=info.event_id,
            payload=info.payload,
            reason=info.reason,
            delivery_count=info.delivery_count,
            stream_seq=info.stream_seq,
        )
        .on_conflict_do_nothing(index_elements=["stage", "stream_seq"])
        .returning(_dead.c.id)
    )
    if (await session.execute(stmt)).scalar() is None:
        return []
    notice = ev.DeadLettered(
        correlation_id=info.correlation_id or info.event_id or "unknown",
        stage=info.stage,
        subject_of_message=info.subject,
        original_event_id=info.event_id,
        reason=info.reason[:2000],
        delivery_count=info.delivery_count,
        stream_seq=info.stream_seq,
        payload_size=len(info.payload),
        payload_excerpt=info.payload[:_EXCERPT].decode("utf-8", errors="replace"),
    )
    return await outbox.write(session, [notice])


async def record_exhausted(
    session: AsyncSession, stage: str, subject: str, data: bytes, *, seq: int, max_deliver: int
) -> list[outbox.OutboxRow]:
    """Dead-letter a message the server stopped delivering (its last delivery
    was never settled: a worker died or hung on it) unless the stage had in
    fact committed it and only the ack was lost."""
    event_id, correlation = ev.peek_ids(data)
    if event_id is not None and await inbox.is_processed(session, stage, event_id):
        return []
    reason = f"not acked after {max_deliver} deliveries (a worker died or hung while handling it)"
    info = DeadLetterInfo(stage, subject, data, reason, max_deliver, seq, event_id, correlation)
    return await record(session, info)
