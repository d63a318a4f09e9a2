"""The worker runtime against a real nats-server and PostgreSQL: effects once,
retries with delay, dead letters with reasons, graceful stop."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
import uuid
from collections import Counter
from typing import Any

import nats.errors
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus import events as ev
from esper.bus.publish import BURST_HEADER, msg_headers, publish_event
from esper.bus.topology import DeliveryPolicy, Topology, ensure_topology
from esper.errors import Reject, Retry
from esper.workers.runtime import HandlerContext
from tests.integration.runtime_helpers import (
    FAST,
    FAST_POLICY,
    js_client,
    rows,
    running_worker,
    scalar,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]




def compiled(i: int = 0, **kw: Any) -> ev.KernelCompiled:
    return ev.KernelCompiled(
        correlation_id=f"journey-{i}", kernel_id=uuid.uuid4(), cache_key=f"k{i}",
        blueprint_hash="a" * 64, target="cpu", dtype="float32", backend="test", **kw,
    )


class Recorder:
    """A handler with an observable effect: one counter row per event (a second
    run for the same event would bump ``submit_count`` to 2) and one emitted
    KernelValidated. ``plan`` maps a cache_key to what to do on each delivery."""

    def __init__(self, plan: dict[str, Any] | None = None, sleep: float = 0.0) -> None:
        self.calls: Counter[str] = Counter()
        self.plan = plan or {}
        self.sleep = sleep

    async def __call__(self, event: ev.KernelCompiled, ctx: HandlerContext[Any]) -> None:
        self.calls[event.cache_key] += 1
        if self.sleep:
            await asyncio.sleep(self.sleep)
        await ctx.session.execute(
            text(
                "INSERT INTO blueprints (hash, name, ir) VALUES (:h, :n, '{}') "
                "ON CONFLICT (hash) DO UPDATE SET submit_count = blueprints.submit_count + 1"
            ),
            {"h": hashlib.sha256(event.cache_key.encode()).hexdigest(), "n": event.cache_key},
        )
        action = self.plan.get(event.cache_key)
        if action is not None:
            action(ctx)  # after the effect: a failure must roll it back
        ctx.emit(
            ev.KernelValidated(
                correlation_id=event.correlation_id, kernel_id=event.kernel_id,
                cache_key=event.cache_key, blueprint_hash=event.blueprint_hash,
                target=event.target, dtype=event.dtype, backend=event.backend, device="none",
            )
        )


async def effects(engine: AsyncEngine) -> dict[str, int]:
    found = await rows(engine, "SELECT name, submit_count FROM blueprints")
    return {r.name: r.submit_count for r in found}


async def validated_in_stream(js: Any) -> int:
    info = await js.stream_info("ESPER_KERNELS", subjects_filter=ev.KERNEL_VALIDATED)
    return (info.state.subjects or {}).get(ev.KERNEL_VALIDATED, 0)


async def test_each_event_has_its_effects_once_and_its_emits_published(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = Recorder()
    async with (
        running_worker("validate", bus, database_url, handler) as worker,
        js_client(bus) as js,
    ):
        for i in range(50):
            await publish_event(js, compiled(i))

        await until_sent(engine, 50, "50 outbox rows published")
        assert await effects(engine) == {f"k{i}": 1 for i in range(50)}
        assert await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = 'validate'") == 50
        assert await validated_in_stream(js) == 50
        assert worker.metrics.value("esper_worker_processed_total") == 50
        assert worker.metrics.value("esper_worker_dead_lettered_total") == 0


async def test_messages_arriving_within_the_linger_share_one_transaction(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = Recorder()
    async with (
        running_worker(
            "validate", bus, database_url, handler, batch=32, concurrency=2, linger=1.0
        ) as worker,
        js_client(bus) as js,
    ):
        for i in range(10):  # one at a time, a little apart: each arrives alone
            await publish_event(js, compiled(i))
            await asyncio.sleep(0.01)

        await until_processed(worker, 10, "10 events processed")
        assert worker.metrics.value("esper_worker_transactions_total") <= 2
        assert await effects(engine) == {f"k{i}": 1 for i in range(10)}
        await until_sent(engine, 10, "10 outbox rows published")


async def test_a_message_after_a_quiet_spell_is_not_held_for_the_linger(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    """Lingering only pays while the arrival rate promises company within the
    linger; a lone message goes at once."""
    handler = Recorder()
    async with (
        running_worker("validate", bus, database_url, handler, linger=5.0) as worker,
        js_client(bus) as js,
    ):
        started = time.monotonic()
        await publish_event(js, compiled(1))

        await until_processed(worker, 1, "the event processed")
        assert time.monotonic() - started < 4.0  # a held message would take 5 s
        assert await effects(engine) == {"k1": 1}


async def test_a_burst_from_one_transaction_is_handled_in_one(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    """No linger, messages 50 ms apart: only their Esper-Burst tag (what a
    relay sets on one transaction's rows) keeps them in one transaction."""
    handler = Recorder()
    async with (
        running_worker(
            "validate", bus, database_url, handler, concurrency=2, linger=0.0, burst_wait=2.0
        ) as worker,
        js_client(bus) as js,
    ):
        for i in range(5):
            event = compiled(200 + i)
            headers = {**msg_headers(event.event_id), BURST_HEADER: "5"}
            await js.publish(event.subject, ev.encode(event), headers=headers)
            await asyncio.sleep(0.05)

        await until_processed(worker, 5, "5 events processed")
        assert worker.metrics.value("esper_worker_transactions_total") == 1
        assert await effects(engine) == {f"k{200 + i}": 1 for i in range(5)}


async def until_processed(worker: Any, n: int, what: str) -> None:
    async def done() -> bool:
        return worker.metrics.value("esper_worker_processed_total") == n

    await wait_for(done, 15, what)


async def until_sent(engine: AsyncEngine, n: int, what: str) -> None:
    async def done() -> bool:
        return await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL") == n

    await wait_for(done, 15, what)


async def test_the_same_event_twice_in_the_stream_is_handled_once(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = Recorder()
    event = compiled(7)
    async with (
        running_worker("validate", bus, database_url, handler) as worker,
        js_client(bus) as js,
    ):
        # Two stream messages, one event (as if published again after the
        # duplicate window): distinct Nats-Msg-Ids, same event_id.
        for _ in range(3):
            await js.publish(event.subject, ev.encode(event), headers=msg_headers(uuid.uuid4()))

        async def settled() -> bool:
            return worker.metrics.value("esper_worker_duplicates_total") == 2

        await wait_for(settled, 15, "two duplicates skipped")
        assert handler.calls["k7"] == 1
        assert await effects(engine) == {"k7": 1}
        assert worker.metrics.value("esper_worker_processed_total") == 1


async def redelivered_among_new(
    js: Any, bus: str, database_url: str, handler: Any, new: tuple[int, ...]
) -> tuple[float, float]:
    """A worker commits compiled(0). Then, while no worker runs, compiled(0) is
    queued again (another message, the same event) with compiled(i) for each
    of ``new``, so the next worker takes them as one group; it runs until the
    new ones are processed. That worker's (duplicates, transactions)."""
    seen = compiled(0)
    await ensure_topology(js, FAST, stages=("validate",))
    async with running_worker("validate", bus, database_url, handler) as worker:
        await publish_event(js, seen)
        await until_processed(worker, 1, "the first event")
    await js.publish(seen.subject, ev.encode(seen), headers=msg_headers(uuid.uuid4()))
    for i in new:
        await publish_event(js, compiled(i))
    async with running_worker("validate", bus, database_url, handler) as worker:
        await until_processed(worker, len(new), "the new events")
        return (
            worker.metrics.value("esper_worker_duplicates_total"),
            worker.metrics.value("esper_worker_transactions_total"),
        )


async def test_a_redelivered_event_in_a_group_of_new_ones_is_skipped_alone(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    """The claim sent with BEGIN fails on the event already claimed; the group
    is claimed again, and no handler ran for the failed attempt."""
    handler = Recorder()
    async with js_client(bus) as js:
        counts = await redelivered_among_new(js, bus, database_url, handler, (1, 2))
    assert counts == (1, 1)  # one duplicate, one transaction
    assert handler.calls == {"k0": 1, "k1": 1, "k2": 1}
    assert await effects(engine) == {"k0": 1, "k1": 1, "k2": 1}
    assert await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = 'validate'") == 3


class Deferring:
    """A batch handler whose only effect rides with the COMMIT
    (``execute_at_commit``): one counter row per event, as Recorder's. The
    statement for a cache_key in ``poison`` breaks a NOT NULL constraint."""

    def __init__(self, poison: frozenset[str] = frozenset(), comment: str = "") -> None:
        self.calls: Counter[str] = Counter()
        self.poison = poison
        self.comment = comment  # appended to each statement

    async def __call__(self, event: ev.KernelCompiled, ctx: HandlerContext[Any]) -> None:
        await self.handle_many([event], ctx)

    async def handle_many(self, events: list[ev.KernelCompiled], ctx: HandlerContext[Any]) -> None:
        for event in events:
            self.calls[event.cache_key] += 1
            digest = "NULL" if event.cache_key in self.poison else (
                "'" + hashlib.sha256(event.cache_key.encode()).hexdigest() + "'"
            )
            await ctx.execute_at_commit(
                f"INSERT INTO blueprints (hash, name, ir) VALUES ({digest}, "
                f"'{event.cache_key}', '{{}}') ON CONFLICT (hash) DO UPDATE "
                "SET submit_count = blueprints.submit_count + 1" + self.comment
            )
            ctx.emit(
                ev.KernelValidated(
                    correlation_id=event.correlation_id, kernel_id=event.kernel_id,
                    cache_key=event.cache_key, blueprint_hash=event.blueprint_hash,
                    target=event.target, dtype=event.dtype, backend=event.backend,
                    device="none",
                )
            )


class LateRecorder(Recorder):
    """Recorder, its claim sent with its first statement (through the session)."""

    late_claim = True


class LateDeferring(Deferring):
    """Deferring with a late claim: the whole transaction is one round trip."""

    late_claim = True


@pytest.mark.parametrize(
    ("kind", "calls"),
    [
        # One event at a time: the first (the redelivery) fails the claim at once.
        (LateRecorder, {"k0": 2, "k1": 1, "k2": 1}),
        # The whole group ran before the COMMIT failed the claim, then again without k0.
        (LateDeferring, {"k0": 2, "k1": 2, "k2": 2}),
    ],
)
async def test_a_late_claim_skips_a_redelivered_event_after_its_handler_ran(  # noqa: PLR0917
    bus: str,
    database_url: str,
    engine: AsyncEngine,
    kind: type,
    calls: dict[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With ``late_claim`` the claim goes with the handler's first statement
    (LateRecorder) or with the COMMIT (LateDeferring). The event already
    claimed fails it; the group is claimed again and the event skipped: the
    handler ran for it once more, its effects did not happen again."""
    handler = kind()
    async with js_client(bus) as js:
        counts = await redelivered_among_new(js, bus, database_url, handler, (1, 2))
        assert counts == (1, 1)  # one duplicate, one transaction
        assert await validated_in_stream(js) == 3
    assert handler.calls == calls
    # The claim's conflict was seen as such, not as a deferred statement's failure.
    assert "deferred statement failed" not in caplog.text
    assert await effects(engine) == {"k0": 1, "k1": 1, "k2": 1}
    assert await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = 'validate'") == 3


class FickleLateDeferring(LateDeferring):
    """Rejects an event it has seen before, before any statement: run on a
    redelivery of a committed event, that must not dead-letter it."""

    async def handle_many(self, events: list[ev.KernelCompiled], ctx: HandlerContext[Any]) -> None:
        if any(self.calls[e.cache_key] for e in events if e.cache_key == "k0"):
            self.calls["refused"] += 1
            raise Reject("seen k0 before")
        await super().handle_many(events, ctx)


async def test_a_late_claim_handler_failing_before_the_claim_is_run_again_claimed_first(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = FickleLateDeferring()
    async with js_client(bus) as js:
        duplicates, _ = await redelivered_among_new(js, bus, database_url, handler, (1,))
    assert duplicates == 1
    # The group failed before its claim; claimed first, k0 was skipped, k1 handled.
    assert handler.calls == {"k0": 1, "refused": 1, "k1": 1}
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0
    assert await effects(engine) == {"k0": 1, "k1": 1}


async def test_a_deferred_statement_ending_in_a_comment_still_commits(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    """Each deferred statement ends on a line of its own: a trailing comment
    cannot swallow the outbox rows and the COMMIT after it."""
    handler = LateDeferring(comment=" -- the COMMIT must not end up in here;")
    async with running_worker("validate", bus, database_url, handler) as worker, js_client(
        bus
    ) as js:
        for i in range(3):
            await publish_event(js, compiled(i))
        await until_processed(worker, 3, "three events")

        await until_sent(engine, 3, "three outbox rows published")
    assert await effects(engine) == {f"k{i}": 1 for i in range(3)}
    assert await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = 'validate'") == 3


async def test_statements_deferred_to_the_commit_take_effect_once(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = Deferring()
    async with js_client(bus) as js:
        await ensure_topology(js, FAST, stages=("validate",))
        for i in range(12):
            await publish_event(js, compiled(i))
        # Queued before the worker starts: it takes them as one group.
        async with running_worker("validate", bus, database_url, handler, batch=16) as worker:
            await until_processed(worker, 12, "twelve events")
            assert worker.metrics.value("esper_worker_transactions_total") == 1
        assert await validated_in_stream(js) == 12
    assert handler.calls == {f"k{i}": 1 for i in range(12)}
    assert await effects(engine) == {f"k{i}": 1 for i in range(12)}


async def test_a_deferred_statement_that_fails_at_commit_spares_the_rest_of_the_group(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    """The group runs again with the statements sent at once: the failure is
    then the handler's, the event at fault is found one at a time and retried
    to its last delivery, and the others commit once."""
    handler = Deferring(poison=frozenset({"k3"}))
    async with js_client(bus) as js:
        await ensure_topology(js, FAST, stages=("validate",))
        for i in range(6):
            await publish_event(js, compiled(i))
        async with running_worker("validate", bus, database_url, handler, batch=16):

            async def dead() -> bool:
                return await scalar(engine, "SELECT count(*) FROM dead_letters") == 1

            await wait_for(dead, 20, "the poisoned event dead-lettered")
    (dl,) = await rows(engine, "SELECT subject, reason, delivery_count FROM dead_letters")
    assert dl.delivery_count == FAST_POLICY.max_deliver
    assert "NotNullViolation" in dl.reason and "hash" in dl.reason, dl.reason
    assert await effects(engine) == {f"k{i}": 1 for i in range(6) if i != 3}
    assert await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = 'validate'") == 5


async def test_retry_naks_with_delay_then_succeeds_once(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    deliveries: list[int] = []
    at: list[float] = []

    def flaky(ctx: HandlerContext[Any]) -> None:
        deliveries.append(ctx.num_delivered)
        at.append(time.monotonic())
        if ctx.num_delivered < 3:
            raise Retry("not yet", delay=0.2)

    handler = Recorder({"k1": flaky})
    async with running_worker("validate", bus, database_url, handler), js_client(bus) as js:
        for i in range(5):
            await publish_event(js, compiled(i))

        async def done() -> bool:
            return len(await effects(engine)) == 5

        await wait_for(done, 15, "all five handled")
        assert deliveries == [1, 2, 3]
        # The nak delay is what the server waits (a consumer backoff list would
        # override it from the second redelivery on: see DeliveryPolicy).
        gaps = [b - a for a, b in itertools.pairwise(at)]
        assert all(0.15 < g < 1.5 for g in gaps), gaps
        assert await effects(engine) == {f"k{i}": 1 for i in range(5)}
        assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0


async def test_reject_dead_letters_with_reason_and_spares_the_rest_of_the_batch(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    def bad(ctx: HandlerContext[Any]) -> None:
        raise Reject("kernel k3 is unusable: figure 9.0 over bound 1.0")

    handler = Recorder({"k3": bad})
    async with (
        running_worker("validate", bus, database_url, handler, batch=16) as worker,
        js_client(bus) as js,
    ):
        for i in range(10):
            await publish_event(js, compiled(i))

        async def done() -> bool:
            return worker.metrics.value("esper_worker_processed_total") == 9 and (
                await scalar(engine, "SELECT count(*) FROM dead_letters") == 1
            )

        await wait_for(done, 15, "nine handled, one dead-lettered")
        assert handler.calls["k3"] == 1  # a Reject is never retried
        (dl,) = await rows(
            engine, "SELECT stage, subject, reason, delivery_count, payload FROM dead_letters"
        )
        assert (dl.stage, dl.subject, dl.delivery_count) == ("validate", ev.KERNEL_COMPILED, 1)
        assert "unusable" in dl.reason
        assert ev.decode(dl.subject, dl.payload).cache_key == "k3"
        assert set(await effects(engine)) == {f"k{i}" for i in range(10)} - {"k3"}

        async def notice() -> bool:
            info = await js.stream_info("ESPER_DLQ")
            return info.state.messages == 1

        await wait_for(notice, 5, "a dead-letter notice on esper.dlq.validate")
        msg = await js.get_last_msg("ESPER_DLQ", "esper.dlq.validate")
        assert ev.decode(msg.subject, msg.data).reason == dl.reason


async def test_a_handler_that_always_fails_is_dead_lettered_after_max_deliver(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    def broken(ctx: HandlerContext[Any]) -> None:
        raise RuntimeError("the GPU caught fire")

    handler = Recorder({"k0": broken})
    async with running_worker("validate", bus, database_url, handler), js_client(bus) as js:
        await publish_event(js, compiled(0))
        await publish_event(js, compiled(1))

        async def dead() -> bool:
            return await scalar(engine, "SELECT count(*) FROM dead_letters") == 1

        await wait_for(dead, 15, "the failing event dead-lettered")
        reason, count = (await rows(engine, "SELECT reason, delivery_count FROM dead_letters"))[0]
        assert handler.calls["k0"] == FAST_POLICY.max_deliver == count
        assert f"gave up after {FAST_POLICY.max_deliver} deliveries" in reason
        assert "RuntimeError: the GPU caught fire" in reason
        assert await effects(engine) == {"k1": 1}


async def test_malformed_messages_are_dead_lettered_at_once_and_the_worker_goes_on(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = Recorder()
    good = compiled(1)
    wrong_shape = b'{"schema_version": 1, "correlation_id": "x", "kernel_id": 5}'
    big = b'{"pad": "' + b"x" * (ev.MAX_EVENT_BYTES + 100) + b'"}'
    async with (
        running_worker("validate", bus, database_url, handler) as worker,
        js_client(bus) as js,
    ):
        await js.publish(ev.KERNEL_COMPILED, b"\xff\xfe garbage \x00")
        await js.publish(ev.KERNEL_COMPILED, wrong_shape)
        await js.publish(ev.KERNEL_COMPILED, b"[1, 2, 3]")
        await js.publish(ev.KERNEL_COMPILED, big)
        with pytest.raises(nats.errors.MaxPayloadError):  # over the server's limit: refused
            await js.publish(ev.KERNEL_COMPILED, b"x" * (2 * 1024 * 1024))
        await publish_event(js, good)

        async def done() -> bool:
            return await scalar(engine, "SELECT count(*) FROM dead_letters") == 4 and (
                worker.metrics.value("esper_worker_processed_total") == 1
            )

        await wait_for(done, 15, "four dead letters and the good event handled")
        found = await rows(
            engine, "SELECT reason, delivery_count FROM dead_letters ORDER BY stream_seq"
        )
        reasons = [r.reason for r in found]
        assert "not JSON" in reasons[0]
        assert "kernel_id" in reasons[1] and "KernelCompiled" in reasons[1]
        assert "not a JSON object" in reasons[2]
        assert "over the" in reasons[3] and "byte limit" in reasons[3]
        assert all(r.delivery_count == 1 for r in found)
        assert await effects(engine) == {"k1": 1}
        assert not handler.calls.keys() - {"k1"}


async def test_stop_finishes_in_flight_work_and_acks_it(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = Recorder(sleep=0.3)
    async with js_client(bus) as js:
        async with running_worker(
            "validate", bus, database_url, handler, concurrency=2, batch=1
        ) as worker:
            for i in range(4):
                await publish_event(js, compiled(i))

            async def busy() -> bool:
                return sum(handler.calls.values()) >= 2

            await wait_for(busy, 10, "handlers running")
            # leaving the block stops the worker while two handlers sleep
        processed = worker.metrics.value("esper_worker_processed_total")
        assert processed >= 2
        assert sum((await effects(engine)).values()) == processed
        info = await js.consumer_info("ESPER_KERNELS", "validate")
        assert info.num_ack_pending == 0  # nothing left captured by the stopped worker
        assert info.num_pending == 4 - processed

        # A new worker picks up exactly the rest.
        async with running_worker("validate", bus, database_url, handler):
            async def rest() -> bool:
                return len(await effects(engine)) == 4

            await wait_for(rest, 10, "the rest handled")
        assert await effects(engine) == {f"k{i}": 1 for i in range(4)}


async def test_a_poisoned_emit_rolls_back_the_handler_and_its_inbox_row(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    def emit_bad(ctx: HandlerContext[Any]) -> None:
        ctx.emit(ev.KernelRetired(correlation_id="x", kernel_id=uuid.uuid4(), cache_key="k",
                                  reason="r" * (ev.MAX_EVENT_BYTES + 1)))

    handler = Recorder({"k2": emit_bad})
    async with running_worker("validate", bus, database_url, handler), js_client(bus) as js:
        await publish_event(js, compiled(2))

        async def dead() -> bool:
            return await scalar(engine, "SELECT count(*) FROM dead_letters") == 1

        await wait_for(dead, 10, "dead letter")
        assert await effects(engine) == {}
        assert await scalar(engine, "SELECT count(*) FROM inbox") == 0
        assert await scalar(engine, "SELECT count(*) FROM outbox WHERE subject = :s",
                            s=ev.KERNEL_VALIDATED) == 0


async def test_a_handler_longer_than_ack_wait_keeps_its_message(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    handler = Recorder(sleep=FAST_POLICY.ack_wait * 1.6)  # heartbeats must cover it
    async with (
        running_worker("validate", bus, database_url, handler, batch=1) as worker,
        js_client(bus) as js,
    ):
        await publish_event(js, compiled(0))

        await until_processed(worker, 1, "the slow event handled")
        info = await js.consumer_info("ESPER_KERNELS", "validate")
        assert info.delivered.consumer_seq == info.delivered.stream_seq == 1  # never redelivered
        assert handler.calls["k0"] == 1


async def test_a_message_whose_last_delivery_died_is_dead_lettered_from_the_advisory(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    # Two deliveries allowed; a "worker" (this test) takes both and never
    # settles them, as a process killed twice would. The server then stops
    # delivering and says so in an advisory, which a live worker turns into a
    # dead letter.
    topology = Topology(policy=DeliveryPolicy(ack_wait=1.5, max_deliver=2))
    event = compiled(9)
    async with js_client(bus) as js:
        await ensure_topology(js, topology, stages=("validate",))
        await publish_event(js, event)
        sub = await js.pull_subscribe_bind("validate", stream="ESPER_KERNELS")
        first = (await sub.fetch(1, timeout=5))[0]
        second = (await sub.fetch(1, timeout=5))[0]  # redelivered once ack_wait passed
        assert (first.metadata.num_delivered, second.metadata.num_delivered) == (1, 2)
        await sub.unsubscribe()
        async with running_worker(
            "validate", bus, database_url, Recorder(), topology=topology
        ) as worker:

            async def dead() -> bool:
                return await scalar(engine, "SELECT count(*) FROM dead_letters") == 1

            await wait_for(dead, 10, "the exhausted message dead-lettered")
            assert worker.metrics.value("esper_worker_processed_total") == 0
        (dl,) = await rows(engine, "SELECT event_id, reason, delivery_count FROM dead_letters")
        assert dl.event_id == str(event.event_id)
        assert "not acked after 2 deliveries" in dl.reason and dl.delivery_count == 2
