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
from esper.workers import sqltext

_inbox = cast(Table, InboxEntry.__table__)
# The claim's unique constraint: a violation of it means "already claimed".
CLAIM_CONSTRAINT = str(_inbox.primary_key.name)


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


def claim_literal(stage: str, events: Sequence[tuple[uuid.UUID, str]]) -> str | None:
    """``claim`` as one self-contained statement for the runtime to send with
    its BEGIN (esper.workers.txn), for a group it expects to be all new: a plain
    INSERT, so an event already claimed fails it with a unique violation (after
    waiting, like ``claim``, for a transaction that holds its row) and the
    group is claimed again with ``claim``. None where it cannot serve: no
    events, an event twice in the group, a value no literal can carry."""
    if not events or len({e for e, _ in events}) < len(events):
        return None
    try:
        st = sqltext.text_literal(stage)
        values = ",".join(
            f"({st},{sqltext.uuid_literal(e)},{sqltext.text_literal(s)})" for e, s in events
        )
    except (TypeError, ValueError):
        return None
    return f"INSERT INTO inbox (stage, event_id, subject) VALUES {values};"


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
