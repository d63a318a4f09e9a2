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

The runtime's own statements ride with BEGIN and COMMIT, each pair one
simple-protocol round trip (inline values, esper.workers.sqltext):
``BEGIN; <opening>`` (the inbox claim) is sent by ``StageTxn.open``, and
``<closing> COMMIT;`` (the outbox rows) by the commit. So a stage
transaction whose handler sends one statement costs three round trips
instead of five. Each costs two process wake-ups, and on a 2-vCPU machine
those cost more CPU than the statements (benchmarks/RESULTS.md, "Event
pipeline").

A handler's statements that return nothing may ride with the COMMIT too
(``StageTxn.defer``). If one fails there, ClosingFailed tells the runtime,
which runs the group again with them sent at once: the failure is then the
handler's, and the event at fault is isolated as usual. Nothing is sent
before it is needed: the runtime opens at once (the claim before the
handler) unless the handler allows a late claim, in which case the opening
goes with the handler's first statement, or with the COMMIT if it sends
none: then the whole transaction is one round trip."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.util import await_only

from esper.workers.failures import is_database_outage

log = logging.getLogger(__name__)

__all__ = [
    "ClosingFailed",
    "OpeningConflict",
    "OpeningFailed",
    "StageTransactions",
    "StageTxn",
    "TransactionLeftOpen",
    "engine_of",
]


class OpeningConflict(Exception):
    """The opening statements (sent with BEGIN, or with the COMMIT when nothing
    went before) hit a unique violation: for the inbox claim, an event already
    claimed. The transaction is rolled back when the ``begin`` block ends."""


class _Caused(Exception):
    """A failure the runtime judges by its ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class OpeningFailed(_Caused):
    """Sending BEGIN and the opening statements failed otherwise (``cause``):
    not the fault of a handler that happened to need the server first."""


class ClosingFailed(_Caused):
    """A statement a handler deferred to the COMMIT (``StageTxn.defer``) failed
    there (``cause``, the server's error). The transaction is rolled back when
    the ``begin`` block ends."""


class TransactionLeftOpen(Exception):
    """The COMMIT round trip ended inside a transaction: something in it kept
    the COMMIT from running (it is rolled back, never returned to the pool open)."""


_ENGINE = "esper.engine"


def engine_of(session: AsyncSession) -> Any:
    """The engine behind ``session``, for a handler's own separate transactions:
    a stage transaction's session is bound to its (autocommit-mode) connection,
    and carries the worker's engine in ``info``."""
    return session.info.get(_ENGINE) or session.bind


class StageTxn:
    """One stage transaction: ``raw`` (asyncpg) and, on demand, a session.

    Nothing reaches the server until the handler first needs it (``open``: a
    ``fetch``, or a statement through the session): a handler that only
    defers statements gets its transaction in one round trip at the commit."""

    def __init__(
        self,
        conn: AsyncConnection,
        raw: asyncpg.Connection,
        engine: AsyncEngine,
        opening: str,
        conflict: str | None,
    ) -> None:
        self.raw = raw
        self._conn = conn
        self._engine = engine
        self._session: AsyncSession | None = None
        self._opening = "BEGIN;" + opening
        self._conflict = conflict
        self.opened = False  # BEGIN and the opening statements were sent
        self.sent = False  # anything was sent (a failure then needs a ROLLBACK)
        self.closing = ""  # the runtime's statements sent with the COMMIT
        self.deferred: list[str] = []  # handlers' statements, sent before ``closing``

    def defer(self, sql: str) -> None:
        """Send ``sql`` (self-contained, returning nothing) with the COMMIT,
        after everything else the transaction does."""
        # On a line of its own and closed on the next: a trailing comment in
        # ``sql`` cannot swallow the statements after it (an empty one is fine).
        self.deferred.append(sql + "\n;")

    async def open(self) -> None:
        """Send BEGIN and the opening statements, if not yet sent. A unique
        violation among them raises OpeningConflict; any other failure,
        OpeningFailed."""
        if self.opened:
            return
        self.sent = True
        try:
            await self.raw.execute(self._opening)
        except asyncpg.UniqueViolationError as exc:
            raise OpeningConflict(str(exc)) from exc
        except Exception as exc:
            raise OpeningFailed(exc) from exc
        self.opened = True

    async def commit(self) -> None:
        """The deferred statements, ``closing`` and COMMIT in one round trip
        (after BEGIN and the opening, if not yet sent)."""
        await self.close_session()
        sql = "".join(self.deferred) + self.closing + "COMMIT;"
        first = not self.opened
        self.sent = True
        try:
            await self.raw.execute(self._opening + sql if first else sql)
        except asyncpg.PostgresError as exc:
            if (
                first
                and isinstance(exc, asyncpg.UniqueViolationError)
                and exc.constraint_name == self._conflict
            ):
                raise OpeningConflict(str(exc)) from exc
            if self.deferred and not is_database_outage(exc):
                raise ClosingFailed(exc) from exc
            raise
        if self.raw.is_in_transaction():
            raise TransactionLeftOpen("the COMMIT did not run: " + sql[-200:])

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            self._session = AsyncSession(
                bind=self._conn, expire_on_commit=False, info={_ENGINE: self._engine}
            )
            if not self.opened:
                event.listen(self._conn.sync_connection, "before_cursor_execute", self._opens)
        return self._session

    def _opens(self, *_: Any) -> None:
        # Runs inside SQLAlchemy's greenlet, before the session's first
        # statement: the transaction must be open by then.
        if not self.opened:
            await_only(self.open())

    async def flush(self) -> None:
        """Send a session's pending ORM changes (a bad row fails here)."""
        if self._session is not None:
            await self._session.flush()

    async def close_session(self) -> None:
        if self._session is not None:
            await self._session.close()  # no round trip: SQLAlchemy is in autocommit mode
            sync = self._conn.sync_connection
            if sync is not None and event.contains(sync, "before_cursor_execute", self._opens):
                event.remove(sync, "before_cursor_execute", self._opens)
            self._session = None


class StageTransactions:
    """Opens stage transactions on ``engine``'s pool."""

    def __init__(self, engine: AsyncEngine, *, rollback_timeout: float = 5.0) -> None:
        self._base = engine
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._rollback_timeout = rollback_timeout

    @contextlib.asynccontextmanager
    async def begin(
        self, opening: str = "", *, conflict: str | None = None
    ) -> AsyncIterator[StageTxn]:
        """A transaction whose first statements are ``opening`` (self-contained
        SQL), sent with BEGIN when the block first needs the server
        (``StageTxn.open``) or else with the commit; committed when the block
        ends, rolled back if it raises. A unique violation in ``opening`` (on
        the constraint named ``conflict``, when sent with the commit) raises
        OpeningConflict."""
        async with self._engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            txn = StageTxn(conn, raw, self._base, opening, conflict)
            try:
                yield txn
                await txn.commit()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await txn.close_session()
                if txn.sent:
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
