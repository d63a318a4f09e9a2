"""What a failure means for the message that caused it: retry later, or give
up now. Infrastructure trouble (Postgres or NATS unreachable, a timeout, a
serialisation conflict) is transient; a Reject or a bad value is permanent."""

from __future__ import annotations

import asyncio
import enum

import asyncpg
import nats.errors
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from esper.errors import MalformedEvent, Reject, Retry

# SQLSTATE classes that say "try again": connection exception, transaction
# rollback (serialisation, deadlock), insufficient resources, operator
# intervention (shutdown, starting up).
_TRANSIENT_SQLSTATE = ("08", "40", "53", "57")


class Verdict(enum.Enum):
    RETRY = "retry"  # nak with a delay; dead-letter once max_deliver is reached
    REJECT = "reject"  # dead-letter and term now


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a Postgres error, raised by asyncpg (statements sent
    around SQLAlchemy, see esper.workers.txn) or wrapped by SQLAlchemy."""
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate
    if isinstance(exc, DBAPIError):
        code = getattr(exc.orig, "sqlstate", None)
        return code if isinstance(code, str) else None
    return None


def _database_outage(exc: BaseException) -> bool | None:
    """For a database error (asyncpg's or SQLAlchemy's): whether Postgres is
    away or aborted us; None for any other exception."""
    if isinstance(exc, asyncpg.InterfaceError):
        # Bad parameter values are the message's fault; the rest (connection
        # closed, in the middle of an operation...) are the connection's.
        return not isinstance(exc, ValueError)
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, asyncpg.PostgresError | DBAPIError):
        return (sqlstate(exc) or "")[:2] in _TRANSIENT_SQLSTATE
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures of the infrastructure rather than of the message."""
    if isinstance(exc, Retry):
        return True
    database = _database_outage(exc)
    if database is not None:
        return database
    return isinstance(
        exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError | nats.errors.Error
    )


def is_database_outage(exc: BaseException) -> bool:
    """Postgres unreachable, restarting or aborting us for reasons not of the
    message's making (connection lost, shutdown, deadlock): worth waiting out."""
    database = _database_outage(exc)
    if database is not None:
        return database
    # asyncpg raises plain OSErrors while connecting to a server that is down.
    return isinstance(exc, ConnectionError | OSError) and not isinstance(exc, TimeoutError)


def classify(exc: BaseException) -> Verdict:
    """Reject, malformed events and bad values (ValueError, TypeError, KeyError:
    IRValidationError and pydantic's ValidationError among them) are permanent;
    everything else is retried with backoff until ``max_deliver``."""
    if isinstance(exc, Reject | MalformedEvent):
        return Verdict.REJECT
    if is_transient(exc):
        return Verdict.RETRY
    if isinstance(exc, ValueError | TypeError | KeyError | LookupError):
        return Verdict.REJECT
    return Verdict.RETRY


def describe(exc: BaseException) -> str:
    """The reason stored with a dead letter: type and message, bounded."""
    if isinstance(exc, Reject):
        return exc.reason[:4000]
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:4000]
