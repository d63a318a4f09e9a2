"""Runs of events published as atomic batches (esper.bus.publish): stored whole
with one answer, and a batch the server refuses (an event it already has, a
stream without atomic batches) is published again one by one, so nothing is
lost and nothing stored twice."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nats.aio.msg import Msg

from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.publish import ATOMIC_MIN, PublishItem, burst_size, publish_pipelined
from esper.bus.topology import Topology, ensure_streams, stream_of
from tests.integration.runtime_helpers import wait_for

pytestmark = pytest.mark.integration
async_test = pytest.mark.asyncio(loop_scope="session")


def items(n: int, subject: str = ev.KERNEL_COMPILED) -> list[PublishItem]:
    return [(subject, b'{"n": %d}' % i, uuid.uuid4()) for i in range(n)]


async def settle(futures: list[asyncio.Future]) -> list:  # type: ignore[type-arg]
    return list(await asyncio.wait_for(asyncio.gather(*futures), 10))


async def stored(js, subject: str) -> int:  # type: ignore[no-untyped-def]
    info = await js.stream_info(stream_of(subject), subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


def test_subjects_map_to_their_streams() -> None:
    assert stream_of(ev.KERNEL_READY) == "ESPER_KERNELS"
    assert stream_of(ev.BLUEPRINT_SUBMITTED) == "ESPER_BLUEPRINTS"
    assert stream_of("esper.dlq.compile") == "ESPER_DLQ"
    assert stream_of("esper.kernel") is None
    assert stream_of("elsewhere.kernel.ready") is None


@async_test
async def test_a_run_is_one_batch_and_a_refused_batch_goes_singly(bus: str) -> None:
    nc = await connect(bus, name="esper-test")
    try:
        js = nc.jetstream()
        await ensure_streams(js, Topology())
        run = items(ATOMIC_MIN + 4)
        acks = await settle(await publish_pipelined(js, run, nc=nc))
        assert {a.batch_size for a in acks} == {len(run)}  # one batch, one answer
        assert await stored(js, ev.KERNEL_COMPILED) == len(run)

        # The same events again, then half old and half new: the server refuses
        # each batch (it holds some of its ids), and singly the copies are dropped.
        again = await settle(await publish_pipelined(js, run, nc=nc))
        assert all(a.duplicate for a in again)
        mixed = run[:6] + items(6)
        acks = await settle(await publish_pipelined(js, mixed, nc=nc))
        assert [bool(a.duplicate) for a in acks] == [True] * 6 + [False] * 6
        assert await stored(js, ev.KERNEL_COMPILED) == len(run) + 6

        # A short run goes singly; runs split where the stream changes.
        short = items(ATOMIC_MIN - 1, ev.BLUEPRINT_SUBMITTED) + items(ATOMIC_MIN, ev.KERNEL_READY)
        acks = await settle(await publish_pipelined(js, short, nc=nc))
        assert [a.batch_size for a in acks] == [None] * (ATOMIC_MIN - 1) + [ATOMIC_MIN] * ATOMIC_MIN
        assert await stored(js, ev.BLUEPRINT_SUBMITTED) == ATOMIC_MIN - 1
        assert await stored(js, ev.KERNEL_READY) == ATOMIC_MIN
    finally:
        await nc.close()


@async_test
async def test_a_stream_without_atomic_batches_still_gets_every_event(bus: str) -> None:
    nc = await connect(bus, name="esper-test")
    try:
        js = nc.jetstream()
        topology = Topology()
        for spec in topology.streams:
            config = topology.stream_config(spec)
            config.allow_atomic = False
            await js.add_stream(config)
        run = items(ATOMIC_MIN * 2)
        acks = await settle(await publish_pipelined(js, run, nc=nc))
        assert not any(a.duplicate for a in acks)
        assert await stored(js, ev.KERNEL_COMPILED) == len(run)
    finally:
        await nc.close()


@async_test
async def test_the_python_client_submits_through_the_batching_path(bus: str, engine) -> None:  # type: ignore[no-untyped-def]
    """EsperClient.submit publishes as `esper submit` does, through the batching
    path (it passes its connection): every submission stored once, and the same
    events published again add nothing."""
    from pathlib import Path

    import esper
    from esper.client import EsperClient

    nc = await connect(bus, name="esper-test")
    client = EsperClient(nc, engine)
    try:
        await ensure_streams(client.js, client.topology)
        files = sorted((Path(esper.__file__).parent / "blueprints").glob("*.json"))
        blueprints = (files * ATOMIC_MIN)[: ATOMIC_MIN + 2]  # one submission each
        events = await client.submit(blueprints, dtypes=("float32", "bfloat16"))
        assert len(events) == len(blueprints)
        assert await stored(client.js, ev.BLUEPRINT_SUBMITTED) == len(events)
        # the server keeps a batch's headers on what it stored: one batch, all of them
        stream = stream_of(ev.BLUEPRINT_SUBMITTED)
        assert stream is not None
        batches = {(await client.js.get_msg(stream, seq)).headers.get("Nats-Batch-Id")
                   for seq in range(1, len(events) + 1)}
        assert len(batches) == 1 and None not in batches, batches
        from esper.bus.publish import submit_events

        acks = await submit_events(client.js, events, nc=nc)
        assert all(a.duplicate for a in acks)
        assert await stored(client.js, ev.BLUEPRINT_SUBMITTED) == len(events)
    finally:
        await nc.drain()


@async_test
async def test_a_burst_tags_each_message_with_how_many_share_its_subject(bus: str) -> None:
    nc = await connect(bus, name="esper-test")
    try:
        js = nc.jetstream()
        await ensure_streams(js, Topology())
        seen: list[tuple[str, int]] = []

        async def record(msg: Msg) -> None:
            seen.append((msg.subject, burst_size(msg)))

        for subject in (ev.KERNEL_RETIRED, ev.KERNEL_REJECTED):
            await nc.subscribe(subject, cb=record)
        burst = items(3, ev.KERNEL_RETIRED) + items(1, ev.KERNEL_REJECTED)
        await settle(await publish_pipelined(js, burst, nc=nc, burst=True))
        await settle(await publish_pipelined(js, items(2, ev.KERNEL_RETIRED), nc=nc))

        async def all_seen() -> bool:
            return len(seen) == 6

        await wait_for(all_seen, 5, "6 messages delivered")
        assert seen == (
            [(ev.KERNEL_RETIRED, 3)] * 3 + [(ev.KERNEL_REJECTED, 1)] + [(ev.KERNEL_RETIRED, 1)] * 2
        )
    finally:
        await nc.close()
