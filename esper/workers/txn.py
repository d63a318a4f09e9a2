"""A stage's transaction, run on the raw asyncpg connection under SQLAlchemy.

BEGIN, COMMIT and the runtime's own statements (the inbox claim, the outbox
write) go straight to asyncpg, as do handlers' statements sent through
``HandlerContext.fetch``; a handler that asks for ``ctx.session`` gets an
``AsyncSession`` bound to the same pooled connection, made on first use, so
everything shares one server-side transaction. Why: a pass-through stage's
transaction is five statements, and at 200 events/s the SQLAlchemy session
machinery around them was about half of a worker's busy samples (py-spy);
one statement through a session costs about 0.1 ms more CPU than through
asyncpg (benchmarks/RESULTS.md, "Event pipeline").

SQLAlchemy sees the connection in AUTOCOMMIT mode, so it never sends a BEGIN
or COMMIT of its own; the transaction is asyncpg's. A connection whose
transaction could not be closed cleanly (the server went away, the task was
cancelled mid-statement) is invalidated, never returned to the pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

log = logging.getLogger(__name__)

__all__ = ["StageTransactions", "StageTxn", "engine_of"]

_ENGINE = "esper.engine"


def engine_of(session: AsyncSession) -> Any:
    """The engine behind ``session``, for a handler's own separate transactions:
    a stage transaction's session is bound to its (autocommit-mode) connection,
    and carries the worker's engine in ``info``."""
    return session.info.get(_ENGINE) or session.bind


class StageTxn:
    """One open stage transaction: ``raw`` (asyncpg) and, on demand, a session."""

    def __init__(
        self, conn: AsyncConnection, raw: asyncpg.Connection, engine: AsyncEngine
    ) -> None:
        self.raw = raw
        self._conn = conn
        self._engine = engine
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            self._session = AsyncSession(
                bind=self._conn, expire_on_commit=False, info={_ENGINE: self._engine}
            )
        return self._session

    async def flush(self) -> None:
        """Send a session's pending ORM changes (a bad row fails here)."""
        if self._session is not None:
            await self._session.flush()

    async def close_session(self) -> None:
        if self._session is not None:
            await self._session.close()  # no round trip: SQLAlchemy is in autocommit mode


class StageTransactions:
    """Opens stage transactions on ``engine``'s pool."""

    def __init__(self, engine: AsyncEngine, *, rollback_timeout: float = 5.0) -> None:
        self._base = engine
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._rollback_timeout = rollback_timeout

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[StageTxn]:
        """An open transaction: committed when the block ends, rolled back if
        it raises."""
        async with self._engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            tx = raw.transaction()
            try:
                await tx.start()
            except BaseException:
                await _discard(conn)
                raise
            txn = StageTxn(conn, raw, self._base)
            try:
                yield txn
                await txn.close_session()
                await tx.commit()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await txn.close_session()
                await self._rollback(conn, raw, tx, exc)
                raise

    async def _rollback(
        self,
        conn: AsyncConnection,
        raw: asyncpg.Connection,
        tx: asyncpg.transaction.Transaction,
        exc: BaseException,
    ) -> None:
        if isinstance(exc, asyncio.CancelledError) or raw.is_closed():
            await _discard(conn)  # a statement may still be running on it
            return
        try:
            async with asyncio.timeout(self._rollback_timeout):
                await tx.rollback()
        except Exception as err:
            log.info("rollback failed (%s); discarding the connection", err)
            await _discard(conn)


async def _discard(conn: AsyncConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.invalidate()
