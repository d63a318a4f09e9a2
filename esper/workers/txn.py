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
cancelled mid-statement) is invalidated, never returned to the pool.

The runtime's own statements ride with BEGIN and COMMIT: ``begin(opening)``
sends ``BEGIN; <opening>`` and the commit sends ``<closing> COMMIT;``, each one
simple-protocol round trip (inline values, esper.workers.sqltext), so a
stage transaction whose handler sends one statement costs three round trips
instead of five. Each costs two process wake-ups, and on a 2-vCPU machine
those cost more CPU than the statements (benchmarks/RESULTS.md, "Event
pipeline"). A handler's statements that return nothing may ride with the
COMMIT too (``StageTxn.defer``). If one fails there, ClosingFailed tells the
runtime, which runs the group again with them sent at once: the failure is
then the handler's, and the event at fault is isolated as usual."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from esper.workers.failures import is_database_outage

log = logging.getLogger(__name__)

__all__ = ["ClosingFailed", "OpeningConflict", "StageTransactions", "StageTxn", "engine_of"]


class OpeningConflict(Exception):
    """The statement sent with BEGIN hit a unique violation (the transaction
    was rolled back): for the inbox claim, an event already claimed."""


class ClosingFailed(Exception):
    """A statement a handler deferred to the COMMIT (``StageTxn.defer``) failed
    there; the transaction was rolled back. ``cause`` is the server's error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


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
        self.closing = ""  # the runtime's statements sent with the COMMIT
        self.deferred: list[str] = []  # handlers' statements, sent before ``closing``

    def defer(self, sql: str) -> None:
        """Send ``sql`` (self-contained, returning nothing) with the COMMIT."""
        self.deferred.append(sql if sql.rstrip().endswith(";") else sql + ";")

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
    async def begin(self, opening: str = "") -> AsyncIterator[StageTxn]:
        """An open transaction, its first statements ``opening`` (self-contained
        SQL) sent with BEGIN: committed, with ``txn.closing``, when the block
        ends; rolled back if it raises. A unique violation in ``opening``
        raises OpeningConflict."""
        async with self._engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            try:
                await raw.execute("BEGIN;" + opening)
            except asyncpg.UniqueViolationError as exc:
                await self._rollback(conn, raw, exc)
                raise OpeningConflict(str(exc)) from exc
            except BaseException as exc:
                await self._rollback(conn, raw, exc)
                raise
            txn = StageTxn(conn, raw, self._base)
            try:
                yield txn
                await txn.close_session()
                closing = "".join(txn.deferred) + txn.closing + "COMMIT;"
                try:
                    await raw.execute(closing)
                except asyncpg.PostgresError as exc:
                    if txn.deferred and not is_database_outage(exc):
                        raise ClosingFailed(exc) from exc
                    raise
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await txn.close_session()
                await self._rollback(conn, raw, exc)
                raise

    async def _rollback(
        self, conn: AsyncConnection, raw: asyncpg.Connection, exc: BaseException
    ) -> None:
        if isinstance(exc, asyncio.CancelledError) or raw.is_closed():
            await _discard(conn)  # a statement may still be running on it
            return
        try:
            async with asyncio.timeout(self._rollback_timeout):
                # Also after a failed COMMIT, which ends the transaction itself:
                # the server then only warns that none is in progress.
                await raw.execute("ROLLBACK;")
        except Exception as err:
            log.info("rollback failed (%s); discarding the connection", err)
            await _discard(conn)


async def _discard(conn: AsyncConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.invalidate()
