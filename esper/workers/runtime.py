"""The worker runtime: one stage, one typed async handler, exactly-once effects.

Lifecycle (like arq's): connect → ensure the stage's stream and consumer →
pull → handle → commit → ack, with an outbox relay, heartbeats and a lag
probe running beside it; ``stop()`` (or SIGTERM/SIGINT) stops pulling,
finishes everything in hand, flushes the outbox and drains the connection.

Per message: decode (malformed → dead letter + term at once); in ONE
transaction claim the inbox row (a redelivery of a committed event is
skipped), run the handler, write the events it emitted to the outbox; commit;
only then ack. A fetched batch is split over ``concurrency`` transactions of
up to ``batch`` messages each: one commit per group instead of per message.
If a handler fails, the transaction is rolled back, that message alone is
nak'ed with a delay (transient) or dead-lettered (permanent, or after
``max_deliver``), and the rest of its group is run again without it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.pull import PullConsumer
from esper.bus.topology import Topology, consumer_spec, ensure_topology
from esper.errors import Retry
from esper.workers import deadletter, inbox, outbox
from esper.workers.failures import (
    Verdict,
    classify,
    describe,
    is_database_outage,
    is_transient,
)
from esper.workers.logging import log_context
from esper.workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

E = TypeVar("E", bound=ev.EsperEvent)


class HandlerContext(Generic[E]):
    """What a handler gets beside its event: the session of the one transaction
    that also records the inbox row and the outbox rows (never commit it
    yourself), ``emit`` to publish after commit, ``heartbeat`` for long work."""

    def __init__(self, session: AsyncSession, msg: Msg, stage: str, num_delivered: int) -> None:
        self.session = session
        self.stage = stage
        self.num_delivered = num_delivered
        self.emitted: list[ev.EsperEvent] = []
        self._msg = msg

    def emit(self, event: ev.EsperEvent) -> None:
        """Queue ``event`` in the outbox; it is published only if this commits."""
        ev.encode(event)  # fail now, in the handler, if it cannot go on the wire
        self.emitted.append(event)

    async def heartbeat(self) -> None:
        """Tell JetStream this message is still being worked on (resets ack_wait)."""
        with contextlib.suppress(Exception):
            await self._msg.in_progress()


Handler = Callable[[Any, HandlerContext[Any]], Awaitable[None]]


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
    def __init__(self, delivery: _Delivery, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.delivery = delivery
        self.exc = exc


@dataclass(eq=False)
class _Outcome:
    ack: list[_Delivery] = field(default_factory=list)
    dead: list[tuple[_Delivery, str]] = field(default_factory=list)
    nak: list[tuple[_Delivery, float]] = field(default_factory=list)


class Worker:
    """Runs ``handler`` for every event the stage's durable consumer delivers.

    ``concurrency`` transactions run at once, each over up to ``batch``
    messages; at most ``prefetch`` messages are held unacked (default
    ``2 * concurrency * batch``). A long handler wants ``batch=1``."""

    def __init__(
        self,
        stage: str,
        handler: Handler,
        *,
        nats_url: str,
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
    ) -> None:
        self.spec = consumer_spec(stage)
        self.stage = stage
        self.handler = handler
        self.nats_url = nats_url
        self.concurrency = concurrency
        self.batch = batch
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
        self._sf = session_factory
        self._stop = asyncio.Event()
        self._processing: dict[int, Msg] = {}
        self._nc: NATS | None = None
        self._puller: PullConsumer | None = None
        self.relay: outbox.OutboxRelay | None = None

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
        nc = self._nc = await connect(
            self.nats_url, name=self.name, on_reconnected=self._on_reconnected
        )
        js = nc.jetstream()
        background: list[asyncio.Task[Any]] = []
        try:
            await self._ensure_topology(js)
            if self.metrics_port is not None:
                self.metrics.serve(self.metrics_port)
            if self.run_relay:
                self.relay = outbox.OutboxRelay(self._sf, js, metrics=self.metrics)
                relay_task = asyncio.create_task(self.relay.run(), name="outbox-relay")
            puller = self._puller = PullConsumer(
                nc, self.spec.stream, self.stage, max_in_hand=self.prefetch
            )
            await puller.start()
            processors = [
                asyncio.create_task(self._process_loop(), name=f"{self.stage}-proc-{i}")
                for i in range(self.concurrency)
            ]
            background = [
                asyncio.create_task(self._heartbeat_loop(), name="heartbeats"),
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
                await relay_task
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await asyncio.wait_for(nc.drain(), 5.0)
            except Exception:
                await nc.close()
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
    async def _process_loop(self) -> None:
        assert self._puller is not None
        queue = self._puller.queue
        while True:
            first = await queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self.batch and not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    queue.put_nowait(nxt)  # leave the stop signal for this loop's next turn
                    break
                group.append(nxt)
            for m in group:
                self._processing[id(m)] = m
            try:
                await self._process_group(group)
            except Exception:
                log.exception("unexpected failure processing a batch; naking it")
                await self._settle(_Outcome(nak=[(self._delivery(m), 1.0) for m in group]))
            finally:
                for m in group:
                    self._processing.pop(id(m), None)
                self._puller.release(len(group))

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
        out = _Outcome(dead=[(d, describe(d.error)) for d in deliveries if d.event is None])
        outage = 0
        while True:
            try:
                await self._transaction(work, out.dead)
                break
            except _HandlerFailed as failed:
                # Inside a handler only SQLAlchemy's own errors speak for Postgres;
                # an OSError there may be the handler's disk or network.
                if not (isinstance(failed.exc, DBAPIError) and is_database_outage(failed.exc)):
                    work.remove(failed.delivery)
                    self._judge(failed.delivery, failed.exc, out)
                    continue
                exc: Exception = failed
            except Exception as caught:
                exc = caught
            # The transaction itself failed; nothing was recorded.
            self.metrics.failed("transaction")
            cause = exc.exc if isinstance(exc, _HandlerFailed) else exc
            if is_database_outage(cause) and not self._stop.is_set():
                # Postgres is away: hold the batch (heartbeats keep it ours) and
                # try again, so an outage burns no deliveries of innocent messages.
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
        if self.relay is not None and work:
            self.relay.trigger()

    def _judge(self, d: _Delivery, exc: BaseException, out: _Outcome) -> None:
        verdict = classify(exc)
        self.metrics.failed(verdict.value)
        with log_context(stage=self.stage, event_id=d.event and d.event.event_id,
                         correlation_id=d.event and d.event.correlation_id):
            if verdict is Verdict.REJECT:
                log.warning("rejected: %s", describe(exc))
                out.dead.append((d, describe(exc)))
            elif d.num_delivered >= self.policy.max_deliver:
                log.warning("giving up after %d deliveries: %s", d.num_delivered, describe(exc))
                out.dead.append(
                    (d, f"gave up after {d.num_delivered} deliveries: {describe(exc)}")
                )
            else:
                delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
                delay = delay if delay is not None else self.policy.nak_delay(d.num_delivered)
                log.info("will retry in %.1fs: %s", delay, describe(exc))
                out.nak.append((d, delay))

    async def _transaction(
        self, work: list[_Delivery], dead: list[tuple[_Delivery, str]]
    ) -> None:
        async with self._sf() as session, session.begin():
            claimed = [(d.event.event_id, d.subject) for d in work if d.event is not None]
            fresh = await inbox.claim(session, self.stage, claimed)
            emitted: list[ev.EsperEvent] = []
            for d in work:
                event = d.event
                assert event is not None
                d.duplicate = event.event_id not in fresh
                if d.duplicate:
                    continue
                fresh.discard(event.event_id)  # the same event twice in one batch
                emitted.extend(await self._handle(session, d, event))
            await outbox.write(session, emitted)
            for d, reason in dead:
                await deadletter.record(session, self._dead_letter_info(d, reason))

    async def _handle(
        self, session: AsyncSession, d: _Delivery, event: ev.EsperEvent
    ) -> list[ev.EsperEvent]:
        ctx: HandlerContext[Any] = HandlerContext(session, d.msg, self.stage, d.num_delivered)
        started = time.perf_counter()
        with log_context(stage=self.stage, event_id=event.event_id,
                         correlation_id=event.correlation_id):
            try:
                async with asyncio.timeout(self.handler_timeout):
                    await self.handler(event, ctx)
                await session.flush()  # a handler's bad row fails here, not at commit
            except Exception as exc:
                raise _HandlerFailed(d, exc) from exc
            finally:
                self.metrics.observe_latency(time.perf_counter() - started)
        return ctx.emitted

    def _dead_letter_info(self, d: _Delivery, reason: str) -> deadletter.DeadLetterInfo:
        data = d.msg.data or b""
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
        """Ack, term and nak after the commit; a lost ack only means a
        redelivery, which the inbox skips."""
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
    async def _heartbeat_loop(self) -> None:
        """Keep every held message (queued or in a handler) from timing out."""
        assert self._puller is not None
        while True:
            await asyncio.sleep(self.policy.ack_wait / 3)
            for msg in [*self._processing.values(), *self._puller.queued()]:
                if msg is not None and not msg._ackd:
                    await _quietly(msg.in_progress())

    async def _lag_loop(self, js: Any) -> None:
        while True:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(self.spec.stream, self.stage, timeout=2.0)
                self.metrics.set_lag(info.num_pending or 0, info.num_ack_pending or 0)
            await asyncio.sleep(self.lag_interval)

    async def _watch_max_deliveries(self, nc: NATS, js: Any) -> None:
        """A message whose last delivery was never settled (the worker died on
        it) stops being delivered; the server's advisory names it, and one
        worker of the stage dead-letters it unless it was in fact committed."""
        subject = (
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.spec.stream}.{self.stage}"
        )

        async def on_advisory(msg: Msg) -> None:
            try:
                seq = int(json.loads(msg.data)["stream_seq"])
                raw = await js.get_msg(self.spec.stream, seq)
                await self._dead_letter_exhausted(raw.subject, raw.data or b"", seq)
            except Exception as exc:
                log.warning("could not dead-letter an exhausted message: %s", exc)

        await nc.subscribe(subject, queue=f"esper-{self.stage}-advisories", cb=on_advisory)

    async def _dead_letter_exhausted(self, subject: str, data: bytes, seq: int) -> None:
        event_id, correlation = ev.peek_ids(data)
        for attempt in range(10):
            try:
                async with self._sf() as session, session.begin():
                    if event_id is not None:
                        done = await inbox.is_processed(session, self.stage, event_id)
                        if done:
                            return
                    reason = (
                        f"not acked after {self.policy.max_deliver} deliveries "
                        "(a worker died or hung while handling it)"
                    )
                    info = deadletter.DeadLetterInfo(
                        self.stage, subject, data, reason, self.policy.max_deliver, seq,
                        event_id, correlation,
                    )
                    if await deadletter.record(session, info):
                        self.metrics.dead_lettered()
                if self.relay is not None:
                    self.relay.trigger()
                return
            except Exception as exc:
                if not is_transient(exc) or attempt == 9:
                    raise
                await asyncio.sleep(min(2**attempt * 0.5, 10.0))


async def _quietly(coro: Awaitable[None]) -> None:
    try:
        await coro
    except Exception as exc:  # connection gone: the server will redeliver
        log.debug("settling a message failed: %s", exc)
