"""The inbox: one row per (stage, event_id) a stage has committed. Claiming an
event inserts its row in the handler's transaction; a redelivery finds the
row (or waits on the other transaction's lock) and is skipped."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import cast

import asyncpg
from sqlalchemy import Table, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from esper.db.models import InboxEntry

_inbox = cast(Table, InboxEntry.__table__)


# One statement for any batch size (arrays, not a VALUES list): prepared once
# per connection. The runtime sends it on the transaction's asyncpg connection
# (esper.workers.txn), hence asyncpg's $n placeholders.
CLAIM_SQL = """
    INSERT INTO inbox (stage, event_id, subject)
    SELECT $1, e, s FROM unnest($2::uuid[], $3::varchar[]) AS x(e, s)
    ON CONFLICT (stage, event_id) DO NOTHING
    RETURNING event_id
"""


async def claim(
    conn: asyncpg.Connection, stage: str, events: Sequence[tuple[uuid.UUID, str]]
) -> set[uuid.UUID]:
    """Insert inbox rows for ``(event_id, subject)`` pairs in ``conn``'s open
    transaction; returns the ids that were new (those the stage must handle).
    A row another transaction holds uncommitted makes this wait for it."""
    if not events:
        return set()
    rows = await conn.fetch(CLAIM_SQL, stage, [e for e, _ in events], [s for _, s in events])
    return {r[0] for r in rows}


async def prune(session: AsyncSession, older_than: timedelta) -> int:
    """Forget rows older than any redelivery can be (JetStream's backoff is far shorter)."""
    result = await session.execute(
        delete(_inbox).where(_inbox.c.processed_at < func.now() - older_than)
    )
    return result.rowcount or 0  # type: ignore[attr-defined]


async def is_processed(session: AsyncSession, stage: str, event_id: str | uuid.UUID) -> bool:
    """Whether ``stage`` committed ``event_id`` (False for an id that is not a UUID)."""
    try:
        eid = event_id if isinstance(event_id, uuid.UUID) else uuid.UUID(event_id)
    except ValueError:
        return False
    stmt = select(_inbox.c.event_id).where(_inbox.c.stage == stage, _inbox.c.event_id == eid)
    return (await session.execute(stmt)).first() is not None
