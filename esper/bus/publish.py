"""Publishing events to JetStream, and the submit path that starts a journey."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header, PubAck

from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.topology import Topology, ensure_streams, stream_of
from esper.errors import IRValidationError

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
# How many messages of one subject a publisher sent together (one transaction's
# outbox rows): a consumer that has the first can wait the moment it takes for
# the rest to be stored and delivered, and handle them in one transaction
# instead of splitting the group again (esper.workers.runtime).
BURST_HEADER = "Esper-Burst"

# A run of at least ATOMIC_MIN messages bound for one stream is published as
# one atomic batch (nats-server 2.12+, streams with ``allow_atomic``). With
# ``sync_interval: always`` a stream fsyncs once per stored message, but a
# batch costs about four fsyncs whatever its size (measured with strace on
# nats-server 2.15: 1,600 messages in batches of 64 took 100 fsyncs, singly
# 1,600; in batches of 2, 3,200). But the server also stages each batch in a
# directory of its own (mkdir, index and block files, then unlink), and its
# messages reach consumers only at the commit: so only long runs, as a
# saturated stage writes (up to its batch of 32), are worth it, not the groups
# of 5-10 a stage forms at a moderate rate (benchmarks/RESULTS.md, "Event
# pipeline", 2026-12-06).
ATOMIC_MIN = 16
ATOMIC_MAX = 1000  # the server's limit on one batch
COMMIT_TIMEOUT = 3.0  # then the batch is published again singly (duplicates dropped)
_BATCH_ID = Header.BATCH_ID.value
_BATCH_SEQUENCE = Header.BATCH_SEQUENCE.value
_BATCH_COMMIT = Header.BATCH_COMMIT.value

PublishItem = tuple[str, bytes, uuid.UUID | str]  # subject, payload, event_id


def msg_headers(event_id: uuid.UUID | str) -> dict[str, str]:
    """``Nats-Msg-Id`` = event_id: JetStream drops a re-published copy."""
    return {MSG_ID_HEADER: str(event_id)}


async def publish_event(
    js: JetStreamContext, event: ev.EsperEvent, *, ack_timeout: float = 5.0
) -> PubAck:
    """Publish one event and wait for the stream's ack (``.duplicate`` is True
    when JetStream had it already)."""
    return await js.publish(
        event.subject, ev.encode(event), timeout=ack_timeout, headers=msg_headers(event.event_id)
    )


def burst_size(msg: Msg) -> int:
    """The ``Esper-Burst`` a message was published with (1 if none or garbled)."""
    value = msg.headers.get(BURST_HEADER) if msg.headers else None
    try:
        return max(1, int(value)) if value else 1
    except ValueError:
        return 1


async def publish_pipelined(
    js: JetStreamContext,
    items: Sequence[PublishItem],
    *,
    nc: NATS | None = None,
    burst: bool = False,
) -> list[asyncio.Future[PubAck]]:
    """Start publishing ``items`` in order (``Nats-Msg-Id`` = event_id); one
    future per item, resolved with the stream's ack or failed with why.
    ``burst``: tag each single message with how many of ``items`` share its
    subject (``Esper-Burst``), for the consumer to keep them together.

    With ``nc`` (the connection under ``js``), each run of ``ATOMIC_MIN`` or
    more consecutive items bound for one Esper stream goes as one atomic batch:
    all stored or none. A batch the server refuses (an older server, a stream
    without ``allow_atomic``, an event id it already has, too many batches in
    flight) is published again item by item, where JetStream drops the
    duplicates one by one as before; a refusal costs time, never an event."""
    bursts = Counter(subject for subject, _, _ in items) if burst else None
    if nc is None:
        return await _publish_singly(js, items, bursts)
    futures: list[asyncio.Future[PubAck]] = []
    i = 0
    while i < len(items):
        stream = stream_of(items[i][0])
        j = i + 1
        while j < len(items) and j - i < ATOMIC_MAX and stream is not None and (
            stream_of(items[j][0]) == stream
        ):
            j += 1
        run = items[i:j]
        if stream is not None and len(run) >= ATOMIC_MIN:
            futures += await _publish_atomic(js, nc, run)
        else:
            futures += await _publish_singly(js, run, bursts)
        i = j
    return futures


async def _publish_singly(
    js: JetStreamContext, items: Sequence[PublishItem], bursts: Counter[str] | None = None
) -> list[asyncio.Future[PubAck]]:
    futures = []
    for subject, payload, event_id in items:
        headers = msg_headers(event_id)
        if bursts is not None and bursts[subject] > 1:
            headers[BURST_HEADER] = str(bursts[subject])
        futures.append(await js.publish_async(subject, payload, headers=headers))
    return futures


# Fallback publications still running (a task must be referenced to be kept).
_fallbacks: set[asyncio.Task[None]] = set()


async def _publish_atomic(
    js: JetStreamContext, nc: NATS, run: Sequence[PublishItem]
) -> list[asyncio.Future[PubAck]]:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[PubAck]] = [loop.create_future() for _ in run]
    batch_id = uuid.uuid4().hex
    for n, (subject, payload, event_id) in enumerate(run[:-1], 1):
        headers = {**msg_headers(event_id), _BATCH_ID: batch_id, _BATCH_SEQUENCE: str(n)}
        await nc.publish(subject, payload, headers=headers)
    subject, payload, event_id = run[-1]
    # A request, not js.publish_async: nats-py leaves a publish_async future
    # pending for ever when the server answers with a 400 error, which is how
    # it refuses a batch.
    commit = asyncio.ensure_future(
        nc.request(
            subject,
            payload,
            timeout=COMMIT_TIMEOUT,
            headers={
                **msg_headers(event_id),
                _BATCH_ID: batch_id,
                _BATCH_SEQUENCE: str(len(run)),
                _BATCH_COMMIT: "1",
            },
        )
    )

    def committed(done: asyncio.Future[Msg]) -> None:
        if done.cancelled():
            for f in futures:
                f.cancel()
            return
        ack = _batch_ack(done, len(run))
        if ack is not None:
            for f in futures:
                if not f.done():
                    f.set_result(ack)
            return
        task = loop.create_task(_chain_singly(js, run, futures))
        _fallbacks.add(task)
        task.add_done_callback(_fallbacks.discard)

    def abandoned(f: asyncio.Future[PubAck]) -> None:
        if f.cancelled():  # the caller stopped waiting: so does the batch
            commit.cancel()

    commit.add_done_callback(committed)
    for f in futures:
        f.add_done_callback(abandoned)
    return futures


def _batch_ack(done: asyncio.Future[Msg], size: int) -> PubAck | None:
    """The batch's ack, or None (logged) if the server did not store it whole."""
    try:
        reply = json.loads(done.result().data)
        if "error" not in reply:
            ack = PubAck.from_response(reply)
            if ack.batch_size == size:
                return ack
    except Exception as exc:  # no answer in time, or not one we understand
        reply = exc
    log.debug("atomic batch of %d not stored (%r); publishing singly", size, reply)
    return None


async def _chain_singly(
    js: JetStreamContext, run: Sequence[PublishItem], futures: list[asyncio.Future[PubAck]]
) -> None:
    try:
        singles = await _publish_singly(js, run)
    except Exception as exc:
        for f in futures:
            if not f.done():
                f.set_exception(exc)
        return
    for single, f in zip(singles, futures, strict=True):
        single.add_done_callback(functools.partial(_copy, dst=f))
        f.add_done_callback(functools.partial(_cancel_if_cancelled, single))


def _cancel_if_cancelled(src: asyncio.Future[PubAck], dst: asyncio.Future[PubAck]) -> None:
    """``dst``'s caller stopped waiting: so does its single publication."""
    if dst.cancelled():
        src.cancel()


def _copy(src: asyncio.Future[PubAck], dst: asyncio.Future[PubAck]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())  # type: ignore[arg-type]
    else:
        dst.set_result(src.result())


Blueprintish = dict[str, Any] | str | Path


def _load_ir(ir: Blueprintish) -> dict[str, Any]:
    if isinstance(ir, Path):
        ir = ir.read_text()
    if isinstance(ir, str):
        try:
            ir = json.loads(ir)
        except json.JSONDecodeError as exc:
            raise IRValidationError(f"blueprint is not JSON: {exc}") from exc
    if not isinstance(ir, dict):
        raise IRValidationError(f"blueprint must be a JSON object, got {type(ir).__name__}")
    return ir


def make_submission(
    ir: Blueprintish,
    *,
    dtypes: tuple[str, ...] = ("float32",),
    submitted_by: str | None = None,
    correlation_id: str | None = None,
) -> ev.BlueprintSubmitted:
    """Validate a blueprint locally (IRValidationError if invalid) and build its
    submission event. The journey's ``correlation_id`` is a fresh uuid unless given."""
    from esper.ir import BlueprintIR

    raw = _load_ir(ir)
    blueprint = BlueprintIR.from_dict(raw)
    event = ev.BlueprintSubmitted(
        correlation_id=correlation_id or uuid.uuid4().hex,
        blueprint_hash=blueprint.canonical_hash(),
        name=blueprint.name,
        ir=raw,
        dtypes=dtypes,  # type: ignore[arg-type]
        submitted_by=submitted_by,
    )
    ev.encode(event)  # size check before anything is published
    return event


async def submit_events(
    js: JetStreamContext,
    submissions: Iterable[ev.BlueprintSubmitted],
    *,
    ack_timeout: float = 10.0,
    nc: NATS | None = None,
) -> list[PubAck]:
    """Publish prepared submissions, pipelined (in atomic batches with ``nc``,
    see ``publish_pipelined``), and wait for every stream ack."""
    items = [(e.subject, ev.encode(e), e.event_id) for e in submissions]
    futures = await publish_pipelined(js, items, nc=nc)
    return list(await asyncio.wait_for(asyncio.gather(*futures), ack_timeout))


async def submit_blueprints(
    nats_url: str,
    irs: Iterable[Blueprintish],
    *,
    dtypes: tuple[str, ...] = ("float32",),
    submitted_by: str | None = None,
    topology: Topology | None = None,
) -> list[ev.BlueprintSubmitted]:
    """Validate every blueprint first (nothing is published if one is invalid),
    then publish them all; returns the submission events in input order."""
    submissions = [make_submission(ir, dtypes=dtypes, submitted_by=submitted_by) for ir in irs]
    nc = await connect(nats_url, name="esper-submit", connect_timeout=10.0)
    try:
        js = nc.jetstream()
        await ensure_streams(js, topology or Topology(), update=False)
        await submit_events(js, submissions, nc=nc)
    finally:
        await nc.drain()
    return submissions
