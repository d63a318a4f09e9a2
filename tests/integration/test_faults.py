"""Faults, each followed by an audit that nothing was lost or duplicated: a
worker SIGKILLed mid-message, nats-server killed and restarted, PostgreSQL
killed and restarted, the relay dying between publish and mark, and a node of
a 3-node JetStream cluster killed under replicated streams."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus import events as ev
from esper.bus.publish import make_submission
from esper.bus.topology import Topology, ensure_streams
from esper.db.engine import create_engine, session_factory
from esper.db.migrate import upgrade
from esper.infra.embedded import NatsServer, PostgresServer
from esper.workers.outbox import OutboxRelay
from tests.integration.runtime_helpers import (
    FAST,
    FAST_POLICY,
    audit_pipeline,
    js_client,
    mlp_blueprint,
    pipeline,
    publish_all,
    running_worker,
    scalar,
    spawn_worker,
    terminate,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="session"),
]




def submissions(n: int, offset: int = 0) -> list[ev.BlueprintSubmitted]:
    return [make_submission(mlp_blueprint(offset + i)) for i in range(n)]


async def all_ready(engine: AsyncEngine, n: int, timeout: float) -> None:
    async def done() -> bool:
        return await scalar(engine, "SELECT count(*) FROM kernels WHERE status = 'ready'") == n

    await wait_for(done, timeout, f"{n} kernels ready", every=0.1)


async def test_worker_sigkilled_mid_message_is_redelivered_and_processed_once(
    bus: str, database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    marker = tmp_path / "handling"
    subs = submissions(5)
    proc = spawn_worker(
        "compile", bus, database_url,
        "--handler", "tests.integration.runtime_handlers:slow_compile",
        "--concurrency", "1", "--batch", "1",
        env={"ESPER_TEST_MARKER": str(marker), "ESPER_TEST_DELAY": "60"},
        log_path=tmp_path / "killed-worker.log",
    )
    try:
        async with js_client(bus) as js:
            await ensure_streams(js, FAST)
            await publish_all(js, subs)

        async def handling() -> bool:
            return marker.exists() and marker.read_text().strip() != ""

        await wait_for(handling, 20, "the worker to be inside a handler")
    finally:
        proc.kill()  # SIGKILL: its transaction dies with it
        proc.wait()
    in_flight = marker.read_text().split()[0]
    # The handler had written its blueprint and kernel rows; none survived.
    assert await scalar(engine, "SELECT count(*) FROM kernels") == 0
    assert await scalar(engine, "SELECT count(*) FROM blueprints") == 0

    async with pipeline(bus, database_url), js_client(bus) as js:
        await all_ready(engine, 5, 20)
        info = await js.consumer_info("ESPER_BLUEPRINTS", "compile")
        # More deliveries than messages: what the dead worker held came back.
        assert info.delivered.consumer_seq > info.delivered.stream_seq == len(subs)
    await audit_pipeline(engine, subs)
    assert any(str(s.event_id) == in_flight for s in subs)


async def test_worker_killed_at_random_instants_loses_and_duplicates_nothing(
    bus: str, database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    subs = submissions(40)
    rng = random.Random(7)
    async with js_client(bus) as js:
        await ensure_streams(js, FAST)
        await publish_all(js, subs)
    async with running_worker("validate", bus, database_url), running_worker(
        "deploy", bus, database_url
    ):
        for round_ in range(3):
            proc = spawn_worker(
                "compile", bus, database_url,
                "--handler", "tests.integration.runtime_handlers:slow_compile",
                "--concurrency", "2", "--batch", "4",
                env={"ESPER_TEST_DELAY": "0.05"},
                log_path=tmp_path / f"worker-{round_}.log",
            )

            async def compiled_more(before: int) -> bool:
                return await scalar(engine, "SELECT count(*) FROM kernels") > before

            before = await scalar(engine, "SELECT count(*) FROM kernels")
            await wait_for(lambda b=before: compiled_more(b), 20, "progress", every=0.02)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            proc.kill()  # anywhere: in a handler, between commit and ack, in the relay
            proc.wait()
        proc = spawn_worker("compile", bus, database_url, log_path=tmp_path / "last.log")
        try:
            await all_ready(engine, len(subs), 25)
        finally:
            assert terminate(proc) == 0  # SIGTERM: a clean, drained exit
    await audit_pipeline(engine, subs)


async def test_nats_killed_and_restarted_mid_stream_loses_nothing(
    nats_factory: Callable[..., NatsServer], database_url: str, engine: AsyncEngine
) -> None:
    server = nats_factory()
    subs = submissions(60)
    async with pipeline(server.url, database_url), js_client(server.url) as js:
        publisher = asyncio.create_task(publish_all(js, subs, pace=0.02))
        await asyncio.sleep(0.4)
        server.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.restart)
        await asyncio.wait_for(publisher, 30)
        await all_ready(engine, len(subs), 25)
    await audit_pipeline(engine, subs)


async def test_postgres_killed_and_restarted_mid_stream_loses_nothing(
    bus: str, pg_factory: Callable[..., PostgresServer]
) -> None:
    pg = pg_factory()
    await upgrade(pg.url)
    engine = create_engine(pg.url)
    subs = submissions(60)
    try:
        async with pipeline(bus, pg.url), js_client(bus) as js:
            publisher = asyncio.create_task(publish_all(js, subs, pace=0.02))
            await asyncio.sleep(0.4)
            await asyncio.to_thread(pg.kill)  # a crash: backends die mid-transaction
            await asyncio.sleep(1.0)
            await asyncio.to_thread(pg.restart)
            await asyncio.wait_for(publisher, 30)
            await all_ready(engine, len(subs), 25)
        await audit_pipeline(engine, subs)
    finally:
        await engine.dispose()


class _Died(BaseException):
    """The relay's process vanishing (BaseException: nothing on the way catches it)."""


class DyingRelay(OutboxRelay):
    async def _after_publish(self, ids: list[uuid.UUID]) -> None:
        raise _Died


async def test_relay_killed_between_publish_and_mark_causes_no_duplicate_downstream(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    subs = submissions(20)
    async with js_client(bus) as js:
        # Compile with no relay: its KernelCompiled events wait in the outbox.
        async with running_worker("compile", bus, database_url, run_relay=False):
            await publish_all(js, subs)

            async def queued() -> bool:
                unsent = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
                return await scalar(engine, unsent) == 20

            await wait_for(queued, 15, "20 compiled events in the outbox")

        dying = DyingRelay(session_factory(engine), js)
        with pytest.raises(_Died):
            await dying.flush_once()
        # Published, yet not marked: a restarted relay will send them again.
        assert await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 20
        compiled = await js.stream_info("ESPER_KERNELS", subjects_filter=ev.KERNEL_COMPILED)
        assert compiled.state.subjects == {ev.KERNEL_COMPILED: 20}

        async with pipeline(bus, database_url) as workers:
            await all_ready(engine, 20, 20)
            resent = sum(w.relay.duplicates_total for w in workers.values() if w.relay)
        assert resent == 20  # every row went out again, and JetStream dropped each copy
        compiled = await js.stream_info("ESPER_KERNELS", subjects_filter=ev.KERNEL_COMPILED)
        assert compiled.state.subjects == {ev.KERNEL_COMPILED: 20}
    await audit_pipeline(engine, subs)


async def test_cluster_node_killed_mid_run_loses_nothing(
    nats_cluster: list[NatsServer], database_url: str, engine: AsyncEngine
) -> None:
    urls = [node.url for node in nats_cluster]
    topology = Topology(replicas=3, policy=FAST_POLICY)
    subs = submissions(60)
    async with pipeline(urls, database_url, topology=topology), js_client(urls) as js:
        info = await js.stream_info("ESPER_KERNELS")
        assert info.config.num_replicas == 3
        publisher = asyncio.create_task(publish_all(js, subs, pace=0.02))
        await asyncio.sleep(0.4)
        # Kill the node that leads the kernel stream: the worst one to lose.
        leader = (info.cluster.leader if info.cluster else None) or "esper-node-0"
        victim = nats_cluster[int(leader.rsplit("-", 1)[1])]
        victim.kill()
        await asyncio.wait_for(publisher, 30)
        await all_ready(engine, len(subs), 25)
    await audit_pipeline(engine, subs)

