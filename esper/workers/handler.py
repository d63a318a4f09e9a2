"""The contract between a stage's handler and the runtime.

A handler is ``async def handle(event, ctx) -> None``. It does its work through
``ctx.session`` — the one transaction that also records the inbox row and the
outbox rows — and ``ctx.emit``s the events that follow; it never commits. To
redeliver later it raises ``Retry(delay)``; to give up, ``Reject(reason)``.

A handler may also offer ``handle_many(events, ctx)`` for a whole batch (set-
based SQL: a few statements per batch instead of a few per event). If it
raises, the runtime rolls back and runs the batch again one event at a time,
so the event at fault is isolated and the others still commit.

The runtime claims a group's events (the inbox) before the handler runs, so
a redelivery of an event already committed never reaches it. A handler whose
only effects are its statements may set ``late_claim = True``: the claim then
goes with its first statement (or, if it sends none before the commit, with
the commit: one round trip for the whole transaction). A redelivered event
then runs the handler's Python, but its statements still roll back; if the
handler fails before the claim was sent, the group runs again claimed first,
so only events not yet committed are judged. Such a handler lets the errors
of ``fetch`` and of its session statements propagate (they may be the
claim's, which the runtime deals with).

``execute_at_commit`` statements run after everything else in the
transaction (other events' statements, the runtime's rows): nothing before
the commit sees their effects."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession

from esper.bus import events as ev
from esper.workers.txn import StageTxn

E = TypeVar("E", bound=ev.EsperEvent)
E_contra = TypeVar("E_contra", bound=ev.EsperEvent, contravariant=True)


class HandlerContext(Generic[E]):
    """What a handler gets beside its event(s): the transaction (``session``
    for SQLAlchemy, ``fetch`` for plain SQL with asyncpg's ``$n`` placeholders,
    cheaper per statement), ``emit`` for the events that follow."""

    def __init__(
        self,
        txn: StageTxn | AsyncSession,
        msgs: Sequence[Msg],
        stage: str,
        num_delivered: int,
        *,
        defer: bool = True,
    ) -> None:
        self._txn = txn
        self._defer = defer and isinstance(txn, StageTxn)
        self.stage = stage
        # The highest delivery count among the events being handled (1: first try).
        self.num_delivered = num_delivered
        self.emitted: list[ev.EsperEvent] = []
        self.payloads: list[bytes] = []  # their encodings, made once
        self._msgs = msgs

    @property
    def session(self) -> AsyncSession:
        """The transaction as a SQLAlchemy session (made on first use)."""
        return self._txn if isinstance(self._txn, AsyncSession) else self._txn.session

    async def fetch(self, sql: str, *args: Any) -> Sequence[Any]:
        """Run ``sql`` (``$1``, ``$2``... placeholders) in the transaction;
        its rows, by position."""
        if isinstance(self._txn, AsyncSession):
            conn = await self._txn.connection()
            return (await conn.exec_driver_sql(sql, args)).all()
        await self._txn.open()
        return await self._txn.raw.fetch(sql, *args)  # type: ignore[no-any-return]

    async def execute_at_commit(self, sql: str) -> None:
        """Run ``sql`` in the transaction, sent with its COMMIT (one round trip
        fewer): a self-contained statement (values inline, see
        esper.workers.sqltext) whose result nobody reads. Should it fail there,
        the runtime runs the group again with such statements sent at once."""
        if not self._defer:
            if isinstance(self._txn, AsyncSession):
                conn = await self._txn.connection()
                await conn.exec_driver_sql(sql)
            else:
                await self._txn.open()
                await self._txn.raw.execute(sql)
            return
        assert isinstance(self._txn, StageTxn)
        self._txn.defer(sql)

    def emit(self, event: ev.EsperEvent) -> None:
        """Queue ``event`` in the outbox; it is published only if this commits."""
        data = ev.encode(event)  # fails now, in the handler, if it cannot go on the wire
        self.emitted.append(event)
        self.payloads.append(data)

    async def heartbeat(self) -> None:
        """Tell JetStream the message(s) are still being worked on (resets
        ack_wait). The runtime also does this every ack_wait/3 on its own."""
        for msg in self._msgs:
            with contextlib.suppress(Exception):
                await msg.in_progress()


Handler = Callable[[Any, HandlerContext[Any]], Awaitable[None]]


@runtime_checkable
class BatchHandler(Protocol[E_contra]):
    """A handler that can also take a whole batch at once."""

    async def __call__(self, event: E_contra, ctx: HandlerContext[Any], /) -> None: ...

    async def handle_many(self, events: Sequence[E_contra], ctx: HandlerContext[Any], /) -> None:
        ...


def late_claim(handler: Any) -> bool:
    """Whether ``handler`` lets the claim ride with its first statement."""
    return bool(getattr(handler, "late_claim", False))


def batch_capable(handler: Any) -> bool:
    return callable(getattr(handler, "handle_many", None))
