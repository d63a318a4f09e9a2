"""Submit → compile → validate → deploy with the pass-through handlers, on real
servers: every blueprint ends ready, its journey recorded in order; invalid
blueprints are dead-lettered with the IR's reason."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus import events as ev
from esper.bus.publish import make_submission, publish_event, submit_blueprints
from esper.db.engine import session_factory
from esper.errors import IRValidationError, MalformedEvent
from esper.workers import passthrough
from esper.workers.handler import HandlerContext
from tests.integration.runtime_helpers import (
    js_client,
    mlp_blueprint,
    pipeline,
    rows,
    scalar,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]




async def ready_count(engine: AsyncEngine) -> int:
    return await scalar(engine, "SELECT count(*) FROM kernels WHERE status = 'ready'")


async def test_n_blueprints_become_n_ready_kernels_in_journey_order(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    n = 40
    async with pipeline(bus, database_url), js_client(bus) as js:
        submitted = await submit_blueprints(bus, [mlp_blueprint(i) for i in range(n)])

        async def all_ready() -> bool:
            return await ready_count(engine) == n

        await wait_for(all_ready, 20, f"{n} kernels ready")
        info = await js.stream_info("ESPER_KERNELS", subjects_filter=ev.KERNEL_READY)
        assert (info.state.subjects or {}).get(ev.KERNEL_READY) == n

    history = await rows(
        engine,
        "SELECT blueprint_hash, blueprint_name, event, status, correlation_id, backend "
        "FROM kernel_history ORDER BY event_seq",
    )
    by_hash: dict[str, list[str]] = {}
    for h in history:
        by_hash.setdefault(h.blueprint_hash, []).append(h.event)
        assert h.backend == "passthrough"
    assert {s.blueprint_hash for s in submitted} == set(by_hash)
    assert all(events == ["compiled", "validated", "ready"] for events in by_hash.values())
    journeys = {s.blueprint_hash: s.correlation_id for s in submitted}
    assert all(h.correlation_id == journeys[h.blueprint_hash] for h in history)
    assert await scalar(engine, "SELECT count(*) FROM deployments") == n
    assert await scalar(engine, "SELECT count(*) FROM validations WHERE passed") == n
    assert await scalar(engine, "SELECT sum(submit_count) FROM blueprints") == n
    assert await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0


async def test_a_resubmitted_blueprint_is_a_cache_hit_and_walks_every_stage(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    async with pipeline(bus, database_url), js_client(bus) as js:
        first, second = (make_submission(mlp_blueprint(1)) for _ in range(2))
        assert first.blueprint_hash == second.blueprint_hash
        assert first.correlation_id != second.correlation_id
        await publish_event(js, first)

        async def ready() -> bool:
            return await ready_count(engine) == 1

        await wait_for(ready, 10, "the first journey")
        await publish_event(js, second)

        async def second_done() -> bool:
            return await scalar(
                engine, "SELECT count(*) FROM kernel_history WHERE correlation_id = :c "
                "AND event = 'ready'", c=second.correlation_id,
            ) == 1

        await wait_for(second_done, 10, "the second journey")
        hit = await scalar(
            engine, "SELECT detail->>'cache_hit' FROM kernel_history WHERE correlation_id = :c "
            "AND event = 'compiled'", c=second.correlation_id,
        )
        assert hit == "true"
    assert await scalar(engine, "SELECT count(*) FROM kernels") == 1
    assert await scalar(engine, "SELECT count(*) FROM deployments") == 1
    assert await scalar(engine, "SELECT submit_count FROM blueprints") == 2


async def test_invalid_blueprints_are_dead_lettered_with_the_ir_reason(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    broken = mlp_blueprint(0)
    broken["nodes"][1]["inputs"] = ["nowhere"]
    huge = mlp_blueprint(3)
    huge["metadata"]["description"] = "x" * ev.MAX_EVENT_BYTES
    # The submit path validates locally and publishes nothing.
    with pytest.raises(IRValidationError):
        await submit_blueprints(bus, [mlp_blueprint(5), broken])
    with pytest.raises(MalformedEvent, match="byte limit"):
        await submit_blueprints(bus, [mlp_blueprint(6), huge])

    good = make_submission(mlp_blueprint(2))
    # A publisher that skipped validation: an invalid IR, and a valid IR under a false hash.
    invalid = good.model_copy(update={"event_id": uuid.uuid4(), "ir": broken})
    liar = good.model_copy(update={"event_id": uuid.uuid4(), "blueprint_hash": "0" * 64})
    async with pipeline(bus, database_url) as workers, js_client(bus) as js:
        for event in (invalid, liar, good):
            await publish_event(js, event)

        async def settled() -> bool:
            return await ready_count(engine) == 1 and (
                await scalar(engine, "SELECT count(*) FROM dead_letters") == 2
            )

        await wait_for(settled, 15, "one ready kernel and two dead letters")
        assert workers["compile"].metrics.value("esper_worker_dead_lettered_total") == 2
        info = await js.stream_info("ESPER_BLUEPRINTS")
        assert info.state.messages == 3  # the refused submissions never reached the stream
    found = await rows(engine, "SELECT stage, event_id, reason FROM dead_letters ORDER BY id")
    by_id = {r.event_id: r for r in found}
    assert by_id[str(invalid.event_id)].stage == "compile"
    assert "invalid blueprint" in by_id[str(invalid.event_id)].reason
    assert "nowhere" in by_id[str(invalid.event_id)].reason
    assert "hash mismatch" in by_id[str(liar.event_id)].reason
    # Nothing of theirs reached the tables a user reads.
    assert await scalar(engine, "SELECT count(*) FROM kernels") == 1


async def test_one_compile_batch_claims_each_kernel_once_and_records_in_order(
    engine: AsyncEngine,
) -> None:
    """The pass-through compile's single statement: a blueprint twice in one
    batch is a miss then a hit; two dtypes are two kernels; one kernel_events
    row per (event, dtype) in input order."""
    first = make_submission(mlp_blueprint(7), dtypes=("float32", "bfloat16"))
    again = make_submission(mlp_blueprint(7))
    other = make_submission(mlp_blueprint(8))
    handler = passthrough.compile_handler()
    async with session_factory(engine)() as session, session.begin():
        ctx: HandlerContext[ev.BlueprintSubmitted] = HandlerContext(session, [], "compile", 1)
        await handler.handle_many([first, again, other], ctx)
    out = [e for e in ctx.emitted if isinstance(e, ev.KernelCompiled)]
    assert [(e.correlation_id, e.dtype, e.cache_hit) for e in out] == [
        (first.correlation_id, "float32", False),
        (first.correlation_id, "bfloat16", False),
        (again.correlation_id, "float32", True),
        (other.correlation_id, "float32", False),
    ]
    assert out[0].kernel_id == out[2].kernel_id != out[1].kernel_id
    history = await rows(
        engine, "SELECT kernel_id, correlation_id, detail FROM kernel_events ORDER BY id"
    )
    assert [(h.kernel_id, h.correlation_id) for h in history] == [
        (e.kernel_id, e.correlation_id) for e in out
    ]
    assert [h.detail["cache_hit"] for h in history] == [False, False, True, False]
    assert history[2].detail == {
        "stage": "compile", "cache_hit": True, "event_id": str(again.event_id)
    }
    assert await scalar(engine, "SELECT count(*) FROM kernels") == 3
    assert await scalar(engine, "SELECT submit_count FROM blueprints WHERE hash = :h",
                        h=first.blueprint_hash) == 2


async def test_an_event_for_an_unknown_kernel_is_rejected_at_validate_and_spares_the_rest(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    """The pass-through validate's statement rides with the COMMIT; for an
    unknown kernel it fails there, and the runtime finds the event at fault
    (the statement sent at once, one event at a time): it is dead-lettered
    on its first delivery, naming the kernel, and the others go on."""
    stray = ev.KernelCompiled(
        correlation_id="stray", kernel_id=uuid.uuid4(), cache_key="nowhere",
        blueprint_hash="b" * 64, target="cpu", dtype="float32", backend="passthrough",
    )
    async with pipeline(bus, database_url), js_client(bus) as js:
        await submit_blueprints(bus, [mlp_blueprint(i) for i in range(3)])
        await publish_event(js, stray)
        await submit_blueprints(bus, [mlp_blueprint(i) for i in range(3, 6)])

        async def settled() -> bool:
            dead = await scalar(engine, "SELECT count(*) FROM dead_letters")
            return dead == 1 and await ready_count(engine) == 6

        await wait_for(settled, 20, "six kernels ready and the stray dead-lettered")
    (dl,) = await rows(engine, "SELECT stage, reason, delivery_count FROM dead_letters")
    assert (dl.stage, dl.delivery_count) == ("validate", 1)
    assert dl.reason == f"unknown kernel(s): {stray.kernel_id}"
    assert await scalar(engine, "SELECT count(*) FROM validations") == 6
    assert await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = 'validate'") == 6
