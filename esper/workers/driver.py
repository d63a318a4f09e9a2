"""The asyncpg connection under an AsyncSession, for the runtime's own hot
statements (inbox claim, outbox write) and the pass-through handlers'.

A statement through ``AsyncSession.execute`` crosses the ORM session, Core's
execution context, result proxies and a greenlet switch: at a low event rate,
where each message has its transaction to itself, that was a fair share of a
worker's CPU. These statements run on the SAME connection and in the SAME
transaction as the session's (the transaction is begun here if the session
has not sent anything yet), so they commit or roll back with it.

Errors come back as SQLAlchemy's (``OperationalError`` for a lost connection,
``DBAPIError`` with the driver's ``sqlstate`` otherwise), so the runtime
classifies them as it does the session's."""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

_LOST = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
)

_KEY = "esper_driver"  # session.info: (SQLAlchemy transaction, adapted connection, driver)


async def connection(session: AsyncSession) -> Any:
    """The session's asyncpg connection, inside the session's transaction."""
    tx = session.sync_session.get_transaction()
    known = session.info.get(_KEY)
    if known is not None and tx is not None and known[0] is tx and known[1]._transaction:
        return known[2]
    conn = await session.connection()
    raw = await conn.get_raw_connection()
    adapted = raw.dbapi_connection
    driver = getattr(adapted, "_connection", None)
    if not isinstance(driver, asyncpg.Connection):
        raise TypeError(f"not an asyncpg connection: {type(adapted).__name__}")
    if adapted._transaction is None:  # SQLAlchemy begins lazily, at the first statement
        async with adapted._execute_mutex:
            if adapted._transaction is None:
                try:
                    await adapted._start_transaction()
                except Exception as exc:
                    raise _translate("BEGIN", exc) from exc
                if adapted._transaction is None:
                    raise OperationalError("BEGIN", None, RuntimeError("no transaction begun"))
    session.info[_KEY] = (session.sync_session.get_transaction(), adapted, driver)
    return driver


async def fetch(session: AsyncSession, sql: str, *args: Any) -> list[Any]:
    """Run one statement in the session's transaction; its rows."""
    driver = await connection(session)
    try:
        return await driver.fetch(sql, *args)  # type: ignore[no-any-return]
    except Exception as exc:
        raise _translate(sql, exc) from exc


async def execute(session: AsyncSession, sql: str, *args: Any) -> None:
    """Run one statement (no rows wanted) in the session's transaction."""
    driver = await connection(session)
    try:
        await driver.execute(sql, *args)
    except Exception as exc:
        raise _translate(sql, exc) from exc


def _translate(sql: str, exc: Exception) -> Exception:
    if isinstance(exc, DBAPIError):
        return exc
    if isinstance(exc, _LOST):
        return OperationalError(sql, None, exc, connection_invalidated=True)
    if isinstance(exc, asyncpg.PostgresError):
        return DBAPIError(sql, None, exc)
    return exc
