"""The relay's poll against a real PostgreSQL: one statement marks the
gathered rows sent and says whether the poll path has work, not counting
the rows it has just marked."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from esper.workers.outbox import OutboxRelay, mark_engine_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def _insert(engine: AsyncEngine, event_id: uuid.UUID, age_s: float) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO outbox (event_id, subject, payload, created_at) "
                "VALUES (:e, 'esper.kernel.compiled', '\\x7b7d', now() - make_interval(secs => :a))"
            ),
            {"e": event_id, "a": age_s},
        )


async def _unsent(engine: AsyncEngine) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT event_id FROM outbox WHERE sent_at IS NULL"))
        return {r[0] for r in rows}


async def test_a_poll_marks_what_was_gathered_and_sees_only_other_stale_rows(
    engine: AsyncEngine,
) -> None:
    old_acked, old_lost, young = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await _insert(engine, old_acked, 5.0)  # acked late: gathered, not yet marked
    await _insert(engine, young, 0.0)
    marks = mark_engine_for(engine)
    relay = OutboxRelay(async_sessionmaker(engine), None, mark_engine=marks)  # type: ignore[arg-type]
    try:
        relay._unmarked = [old_acked]
        # The only old unsent row is the one being marked: nothing for the poll path.
        assert await relay._mark_and_look() is False
        assert relay._unmarked == []
        assert await _unsent(engine) == {young}

        await _insert(engine, old_lost, 5.0)  # a worker died before publishing it
        assert await relay._mark_and_look() is True
        assert await _unsent(engine) == {young, old_lost}
    finally:
        await marks.dispose()


async def test_a_poll_after_the_server_dropped_the_connection_reconnects(
    engine: AsyncEngine,
) -> None:
    marks = mark_engine_for(engine)
    relay = OutboxRelay(async_sessionmaker(engine), None, mark_engine=marks)  # type: ignore[arg-type]
    try:
        assert await relay._mark_and_look() is False
        async with engine.begin() as conn:  # what a restart does to the pooled connection
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        with pytest.raises(Exception):  # noqa: B017 - asyncpg's or the OS's, by timing
            await relay._mark_and_look()
        assert await relay._mark_and_look() is False  # a fresh connection
    finally:
        await marks.dispose()


async def test_without_the_mark_pool_a_mark_goes_through_a_session(engine: AsyncEngine) -> None:
    gathered, other = uuid.uuid4(), uuid.uuid4()
    await _insert(engine, gathered, 5.0)
    await _insert(engine, other, 5.0)
    relay = OutboxRelay(async_sessionmaker(engine), None)  # type: ignore[arg-type]
    relay._unmarked = [gathered]
    assert await relay._mark_and_look() is True  # no pool to ask: the poll path looks
    assert await _unsent(engine) == {other}
