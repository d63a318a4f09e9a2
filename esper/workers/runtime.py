"""The worker runtime: one stage, one typed async handler, exactly-once effects.

Lifecycle (like arq's): connect → ensure the stage's streams and consumer →
pull → handle → commit → ack, with an outbox relay, heartbeats and a lag
probe running beside it; ``stop()`` (or SIGTERM/SIGINT) stops pulling,
finishes everything in hand, flushes the outbox and drains the connection.

Per message: decode (malformed → dead letter + term at once); in ONE
transaction claim the inbox row (a redelivery of a committed event is
skipped), run the handler, write the events it emitted to the outbox; commit;
only then ack, and hand the new outbox rows to the relay. Messages are taken
in groups of up to ``batch``, one transaction per group, ``concurrency``
groups at a time: one commit (and one fsync) per group instead of per message.
A group is what is queued, plus the rest of its first message's burst (one
upstream transaction's events, tagged by the relay), plus, with ``linger``
while the arrival rate makes it likely to pay, what arrives meanwhile: so the
groups formed at the head of a pipeline travel through every later stage whole.

Failures: a handler's Retry or transient error rolls the group back and naks
that message with a delay (others run again without it); a Reject or bad
value dead-letters it, as does the last allowed delivery. If Postgres itself
is away the group is held (heartbeats keep it) and retried until it returns,
so an outage burns no deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.publish import burst_size
from esper.bus.pull import PullConsumer
from esper.bus.topology import Topology, consumer_spec, ensure_topology
from esper.errors import ConfigError, Retry
from esper.workers import deadletter, inbox, outbox
from esper.workers.failures import Verdict, classify, describe, is_database_outage
from esper.workers.handler import Handler, HandlerContext, batch_capable, late_claim
from esper.workers.logging import log_context
from esper.workers.metrics import WorkerMetrics
from esper.workers.txn import (
    ClosingFailed,
    OpeningConflict,
    OpeningFailed,
    StageTransactions,
    StageTxn,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_LINGER", "Handler", "HandlerContext", "Worker"]

# Seconds a group waits for company after its first message (when the batch
# allows more than one): at low rates a transaction per message is most of a
# message's CPU (see benchmarks/RESULTS.md, "Event pipeline"). A group only
# lingers while the arrival rate brings it at least _MIN_COMPANY more messages
# on average (rate * linger, from the smoothed gap between arrivals): below
# that the wait buys little CPU and costs every message in the group latency.
DEFAULT_LINGER = 0.006
_MIN_COMPANY = 1.5
# What a handler's database failure can be: through its session, or through
# HandlerContext.fetch on the asyncpg connection.
_DATABASE_ERRORS = (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError)
# The longest a group waits for the rest of a burst (see esper.bus.publish,
# BURST_HEADER): the publisher sent them together, so they normally follow
# within a millisecond or two (one store, and one fsync, each).
DEFAULT_BURST_WAIT = 0.005


@dataclass(eq=False)
class _Delivery:
    msg: Msg
    subject: str
    num_delivered: int
    stream_seq: int | None
    event: ev.EsperEvent | None = None
    error: BaseException | None = None
    duplicate: bool = False


class _HandlerFailed(Exception):
    """A handler raised; ``delivery`` is None when it was a whole-batch call.
    ``claimed``: whether the group's claim had reached the server by then."""

    def __init__(self, delivery: _Delivery | None, exc: BaseException, claimed: bool) -> None:
        super().__init__(str(exc))
        self.delivery = delivery
        self.exc = exc
        self.claimed = claimed


@dataclass
class _Mode:
    """How a group's transactions are run; narrowed after a failure, for the group."""

    late: bool  # the claim may ride with the handler's first statement (late_claim)
    defer: bool = True  # statements a handler defers ride with the COMMIT


@dataclass(eq=False)
class _Outcome:
    ack: list[_Delivery] = field(default_factory=list)
    dead: list[tuple[_Delivery, str]] = field(default_factory=list)
    nak: list[tuple[_Delivery, float]] = field(default_factory=list)
    rows: list[outbox.OutboxRow] = field(default_factory=list)


class Worker:
    """Runs ``handler`` for every event the stage's durable consumer delivers.

    ``concurrency`` transactions run at once, each over up to ``batch``
    messages; at most ``prefetch`` messages are held unacked (default
    ``2 * concurrency * batch``). A slow handler (a compile) wants ``batch=1``."""

    def __init__(
        self,
        stage: str,
        handler: Handler,
        *,
        nats_url: str | list[str],
        session_factory: async_sessionmaker[AsyncSession],
        concurrency: int = 4,
        batch: int = 32,
        prefetch: int | None = None,
        topology: Topology | None = None,
        metrics_port: int | None = None,
        handler_timeout: float = 300.0,
        run_relay: bool = True,
        handle_signals: bool = False,
        lag_interval: float = 5.0,
        name: str | None = None,
        linger: float = DEFAULT_LINGER,
        atomic_batches: bool = True,
        burst_wait: float = DEFAULT_BURST_WAIT,
    ) -> None:
        self.spec = consumer_spec(stage)
        self.stage = stage
        self.handler = handler
        self.nats_url = nats_url
        self.concurrency = concurrency
        self.batch = batch
        self.linger = linger
        self.burst_wait = burst_wait
        # The relay publishes runs of rows as atomic batches (esper.bus.publish):
        # a gain where nats-server fsyncs every message (sync_interval: always),
        # a loss where it does not (a batch costs ~3 fsyncs regardless).
        self.atomic_batches = atomic_batches
        self.prefetch = prefetch or 2 * concurrency * batch
        self.topology = topology or Topology()
        self.policy = self.topology.policy
        self.metrics_port = metrics_port
        self.handler_timeout = handler_timeout
        self.run_relay = run_relay
        self.handle_signals = handle_signals
        self.lag_interval = lag_interval
        self.name = name or f"esper-{stage}-{uuid.uuid4().hex[:8]}"
        self.metrics = WorkerMetrics(stage)
        self.started = asyncio.Event()
        self.relay: outbox.OutboxRelay | None = None
        self._sf = session_factory
        self._txns: StageTransactions | None = None
        self._stop = asyncio.Event()
        self._processing: dict[int, Msg] = {}
        self._puller: PullConsumer | None = None
        # One processor at a time gathers a group (so a lingering group is not
        # raced by idle processors taking each new message alone).
        self._gather = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------
    def stop(self) -> None:
        """Stop pulling, finish what is in hand, flush, drain (idempotent)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until ``stop()`` (or SIGTERM/SIGINT with ``handle_signals``)."""
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        bind = self._sf.kw.get("bind")
        if not isinstance(bind, AsyncEngine):
            raise ConfigError("a Worker's session factory must be bound to an AsyncEngine")
        self._txns = StageTransactions(bind)
        nc = await connect(self.nats_url, name=self.name, on_reconnected=self._on_reconnected)
        js = nc.jetstream()
        background: list[asyncio.Task[Any]] = []
        mark_engine = None
        try:
            await self._ensure_topology(js)
            if self.metrics_port is not None:
                self.metrics.serve(self.metrics_port)
            if self.run_relay:
                mark_engine = outbox.mark_engine_for(bind)
                self.relay = outbox.OutboxRelay(
                    self._sf, js, metrics=self.metrics, mark_engine=mark_engine,
                    nc=nc if self.atomic_batches else None,
                )
                background.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
            puller = self._puller = PullConsumer(
                nc, self.spec.stream, self.stage, max_in_hand=self.prefetch
            )
            await puller.start()
            processors = [
                asyncio.create_task(self._process_loop(puller), name=f"{self.stage}-{i}")
                for i in range(self.concurrency)
            ]
            background += [
                asyncio.create_task(self._heartbeat_loop(puller), name="heartbeats"),
                asyncio.create_task(self._lag_loop(js), name="lag"),
            ]
            await self._watch_max_deliveries(nc, js)
            self.started.set()
            log.info("worker started", extra={"stage": self.stage, "worker": self.name})
            await self._stop.wait()

            log.info("worker stopping", extra={"stage": self.stage})
            await puller.stop()
            for _ in processors:
                puller.queue.put_nowait(None)
            await asyncio.gather(*processors)
            if self.relay is not None:
                self.relay.stop()
                await background.pop(0)  # the relay's last publish
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await asyncio.wait_for(nc.drain(), 5.0)
            except Exception:
                await nc.close()
            if mark_engine is not None:
                await mark_engine.dispose()
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            log.info("worker stopped", extra={"stage": self.stage})

    async def _ensure_topology(self, js: Any) -> None:
        # A cluster may still be electing its meta leader: keep trying a while.
        for attempt in range(60):
            try:
                await ensure_topology(js, self.topology, stages=(self.stage,))
                return
            except Exception as exc:
                if attempt == 59:
                    raise
                log.info("JetStream not ready (%s); retrying", exc)
                await asyncio.sleep(0.5)

    async def _on_reconnected(self) -> None:
        if self._puller is not None:
            self._puller.reset()  # the server forgot our pull requests

    # -- processing ----------------------------------------------------------
    async def _process_loop(self, puller: PullConsumer) -> None:
        while True:
            group = await self._take_group(puller)
            if group is None:
                return
            try:
                await self._process_group(group)
            except Exception:
                log.exception("unexpected failure processing a batch; naking it")
                await self._settle(_Outcome(nak=[(self._delivery(m), 1.0) for m in group]))
            finally:
                for m in group:
                    self._processing.pop(id(m), None)
                puller.release(len(group))

    async def _take_group(self, puller: PullConsumer) -> list[Msg] | None:
        """Up to ``batch`` messages: the first to arrive, whatever is queued,
        the rest of the first's burst (the messages its publisher sent with it,
        waited for up to ``burst_wait``) and, with ``linger`` while the arrival
        rate promises company, what arrives within ``linger`` seconds of the
        first: messages close together share one transaction and one commit.
        None: stop."""
        queue = puller.queue
        async with self._gather:
            first = await queue.get()
            if first is None:
                return None
            group = [first]
            self._processing[id(first)] = first  # heartbeats cover it from now on
            loop = asyncio.get_running_loop()
            now = loop.time()
            linger = self.linger if puller.gaps.mean(now) * _MIN_COMPANY < self.linger else 0.0
            lingering = now + linger
            burst = min(burst_size(first), self.batch)
            burst_until = max(lingering, now + self.burst_wait)
            while len(group) < self.batch:
                if not queue.empty():
                    nxt = queue.get_nowait()
                else:
                    until = burst_until if len(group) < burst else lingering
                    if until <= loop.time():
                        break
                    try:
                        async with asyncio.timeout_at(until):
                            nxt = await queue.get()
                    except TimeoutError:
                        break
                if nxt is None:
                    queue.put_nowait(nxt)  # the stop signal: a loop sees it next turn
                    break
                group.append(nxt)
                self._processing[id(nxt)] = nxt
            return group

    def _delivery(self, msg: Msg) -> _Delivery:
        try:
            meta = msg.metadata
            num, seq = meta.num_delivered, meta.sequence.stream
        except Exception:
            num, seq = 1, None
        d = _Delivery(msg, msg.subject, num, seq)
        try:
            d.event = ev.decode(msg.subject, msg.data)
        except Exception as exc:
            d.error = exc
        return d

    async def _process_group(self, msgs: list[Msg]) -> None:
        deliveries = [self._delivery(m) for m in msgs]
        work = [d for d in deliveries if d.event is not None]
        out = _Outcome(
            dead=[(d, describe(d.error)) for d in deliveries if d.error is not None]
        )
        whole_batch = batch_capable(self.handler)
        mode = _Mode(late=late_claim(self.handler))
        outage = 0
        while True:
            cause: BaseException
            try:
                out.rows = await self._transaction(work, out.dead, whole_batch, mode)
                self.metrics.transaction()
                break
            except ClosingFailed as failed:
                if mode.defer:
                    # A statement a handler deferred to the COMMIT failed: from
                    # now on they are sent at once, so the failure happens inside
                    # the handler, where the event at fault can be found.
                    log.info("a deferred statement failed (%s); running the group again", failed)
                    mode.defer = False
                    continue
                cause = failed.cause
            except OpeningFailed as failed:
                cause = failed.cause
            except _HandlerFailed as failed:
                if mode.late and not failed.claimed:
                    # The handler failed before the claim reached the server: run
                    # the group again claimed first, so that an event already
                    # committed is skipped rather than judged.
                    mode.late = False
                    continue
                # Inside a handler only database errors (SQLAlchemy's or asyncpg's)
                # speak for Postgres; an OSError there may be the handler's own
                # disk or network.
                outage_now = isinstance(failed.exc, _DATABASE_ERRORS) and is_database_outage(
                    failed.exc
                )
                if not outage_now:
                    if failed.delivery is None:
                        whole_batch = False  # find the culprit one event at a time
                    else:
                        work.remove(failed.delivery)
                        self._judge(failed.delivery, failed.exc, out)
                    continue
                cause = failed.exc
            except Exception as exc:
                cause = exc
            self.metrics.failed("transaction")
            if is_database_outage(cause) and not self._stop.is_set():
                # Postgres is away: hold the group (heartbeats keep it ours) and
                # try again, so the outage burns no deliveries.
                outage += 1
                delay = min(0.05 * 2**outage, 2.0)
                if outage == 1 or outage % 20 == 0:
                    log.warning("database unavailable (%s); holding %d messages", cause, len(msgs))
                if self._puller is not None:
                    self._puller.pause(delay)
                await asyncio.sleep(delay)
                continue
            delay = self.policy.nak_delay(max(d.num_delivered for d in deliveries))
            log.error("transaction failed, batch back in %.1fs: %s", delay, describe(cause))
            retry = work + [d for d, _ in out.dead] + [d for d, _ in out.nak]
            await self._settle(_Outcome(nak=[(d, delay) for d in retry]))
            return
        out.ack = work
        await self._settle(out)

    def _judge(self, d: _Delivery, exc: BaseException, out: _Outcome) -> None:
        verdict = classify(exc)
        self.metrics.failed(verdict.value)
        event = d.event
        with log_context(
            stage=self.stage,
            event_id=event.event_id if event else None,
            correlation_id=event.correlation_id if event else None,
        ):
            if verdict is Verdict.REJECT:
                log.warning("rejected: %s", describe(exc))
                out.dead.append((d, describe(exc)))
            elif d.num_delivered >= self.policy.max_deliver:
                log.warning("giving up after %d deliveries: %s", d.num_delivered, describe(exc))
                out.dead.append((d, f"gave up after {d.num_delivered} deliveries: {describe(exc)}"))
            else:
                delay = exc.delay if isinstance(exc, Retry) else None
                delay = delay if delay is not None else self.policy.nak_delay(d.num_delivered)
                log.info("will retry in %.1fs: %s", delay, describe(exc))
                out.nak.append((d, delay))

    async def _transaction(
        self,
        work: list[_Delivery],
        dead: list[tuple[_Delivery, str]],
        whole_batch: bool,
        mode: _Mode,
    ) -> list[outbox.OutboxRow]:
        """Claim, handle, write the outbox, record dead letters; commit. Returns
        the committed outbox rows. While the group looks new the claim is a
        plain INSERT sent with BEGIN (or, for a late claim, with the handler's
        first statement or the COMMIT); a redelivered event fails it, and the
        group is claimed again by a statement that skips what is already
        claimed."""
        claimed = [(d.event.event_id, d.subject) for d in work if d.event is not None]
        opening = inbox.claim_literal(self.stage, claimed)
        if opening is not None:
            try:
                return await self._attempt(work, dead, whole_batch, claimed, opening, mode=mode)
            except OpeningConflict:
                pass
        return await self._attempt(work, dead, whole_batch, claimed, None, mode=mode)

    async def _attempt(
        self,
        work: list[_Delivery],
        dead: list[tuple[_Delivery, str]],
        whole_batch: bool,
        claimed: list[tuple[uuid.UUID, str]],
        opening: str | None,
        *,
        mode: _Mode,
    ) -> list[outbox.OutboxRow]:
        assert self._txns is not None
        async with self._txns.begin(opening or "", conflict=inbox.CLAIM_CONSTRAINT) as txn:
            if opening is None or not mode.late:
                await txn.open()  # the claim before the handler runs
            if opening is None:
                fresh = await inbox.claim(txn.raw, self.stage, claimed)
            else:
                fresh = {e for e, _ in claimed}
            todo: list[_Delivery] = []
            for d in work:
                assert d.event is not None
                d.duplicate = d.event.event_id not in fresh
                if not d.duplicate:
                    fresh.discard(d.event.event_id)  # the same event twice in one group
                    todo.append(d)
            emitted: list[ev.EsperEvent] = []
            payloads: list[bytes] = []
            groups = [todo] if whole_batch and len(todo) > 1 else [[d] for d in todo]
            for ds in groups:
                ctx = await self._handle(txn, ds, batch=len(ds) > 1, defer=mode.defer)
                emitted += ctx.emitted
                payloads += ctx.payloads
            rows: list[outbox.OutboxRow] = []
            for d, reason in dead:
                rows += await deadletter.record(txn.session, self._dead_letter_info(d, reason))
            txn.closing, written = outbox.write_literal(emitted, payloads)
        return written + rows

    async def _handle(
        self, txn: StageTxn, ds: list[_Delivery], *, batch: bool, defer: bool
    ) -> HandlerContext[Any]:
        events = [d.event for d in ds]
        ctx: HandlerContext[Any] = HandlerContext(
            txn, [d.msg for d in ds], self.stage, max(d.num_delivered for d in ds), defer=defer
        )
        first = events[0]
        assert first is not None
        started = time.perf_counter()
        with log_context(
            stage=self.stage,
            event_id=None if batch else first.event_id,
            correlation_id=None if batch else first.correlation_id,
        ):
            try:
                async with asyncio.timeout(self.handler_timeout):
                    if batch:
                        await self.handler.handle_many(events, ctx)  # type: ignore[attr-defined]
                    else:
                        await self.handler(first, ctx)
                await txn.flush()  # a handler's bad row fails here, not at commit
            except (OpeningConflict, OpeningFailed):
                raise  # the claim, sent with the handler's first statement: not its fault
            except Exception as exc:
                raise _HandlerFailed(None if batch else ds[0], exc, txn.opened) from exc
            finally:
                elapsed = time.perf_counter() - started
                for _ in ds:
                    self.metrics.observe_latency(elapsed / len(ds))
        return ctx

    def _dead_letter_info(self, d: _Delivery, reason: str) -> deadletter.DeadLetterInfo:
        data = d.msg.data or b""
        event_id: str | None
        correlation: str | None
        if d.event is not None:
            event_id, correlation = str(d.event.event_id), d.event.correlation_id
        else:
            event_id, correlation = ev.peek_ids(data)
        return deadletter.DeadLetterInfo(
            stage=self.stage,
            subject=d.subject,
            payload=data,
            reason=reason,
            delivery_count=d.num_delivered,
            stream_seq=d.stream_seq,
            event_id=event_id,
            correlation_id=correlation,
        )

    async def _settle(self, out: _Outcome) -> None:
        """After the commit: hand the outbox rows to the relay, then ack, term
        and nak. A lost ack only means a redelivery, which the inbox skips."""
        if self.relay is not None:
            await self.relay.publish_now(out.rows)
        for d in out.ack:
            await _quietly(d.msg.ack())
        self.metrics.processed(sum(not d.duplicate for d in out.ack))
        self.metrics.duplicate(sum(d.duplicate for d in out.ack))
        for d, reason in out.dead:
            await _quietly(d.msg.term())
            self.metrics.dead_lettered()
            log.warning(
                "dead-lettered %s (seq %s): %s", d.subject, d.stream_seq, reason,
                extra={"stage": self.stage},
            )
        for d, delay in out.nak:
            await _quietly(d.msg.nak(delay=delay))

    # -- beside the processing -----------------------------------------------
    async def _heartbeat_loop(self, puller: PullConsumer) -> None:
        """Keep every held message (queued or in a handler) from timing out."""
        while True:
            await asyncio.sleep(self.policy.ack_wait / 3)
            for msg in [*self._processing.values(), *puller.queued()]:
                if not msg._ackd:
                    await _quietly(msg.in_progress())

    async def _lag_loop(self, js: Any) -> None:
        while True:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(self.spec.stream, self.stage, timeout=2.0)
                self.metrics.set_lag(info.num_pending or 0, info.num_ack_pending or 0)
            await asyncio.sleep(self.lag_interval)

    async def _watch_max_deliveries(self, nc: NATS, js: Any) -> None:
        """A message whose last delivery was never settled (a worker died on
        it) stops being delivered; the server's advisory names it, and one
        worker of the stage dead-letters it (see deadletter.record_exhausted)."""
        stream, stage = self.spec.stream, self.stage
        subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{stage}"

        async def on_advisory(msg: Msg) -> None:
            try:
                seq = int(json.loads(msg.data)["stream_seq"])
                raw = await js.get_msg(stream, seq)
                for attempt in range(10):
                    try:
                        async with self._sf() as session, session.begin():
                            rows = await deadletter.record_exhausted(
                                session, stage, raw.subject, raw.data or b"", seq=seq,
                                max_deliver=self.policy.max_deliver,
                            )
                        break
                    except Exception as exc:
                        if not is_database_outage(exc) or attempt == 9:
                            raise
                        await asyncio.sleep(min(0.5 * 2**attempt, 10.0))
                if rows:
                    self.metrics.dead_lettered()
                    if self.relay is not None:
                        await self.relay.publish_now(rows)
            except Exception as exc:
                log.warning("could not dead-letter exhausted message: %s", exc)

        await nc.subscribe(subject, queue=f"esper-{stage}-advisories", cb=on_advisory)


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception as exc:  # connection gone: the server will redeliver
        log.debug("settling a message failed: %s", exc)
