"""Shared plumbing for the worker-runtime integration tests: workers in this
process or as subprocesses, the bus wiped between tests, counting rows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.js.errors import NotFoundError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus.connect import connect
from esper.bus.topology import STREAMS, DeliveryPolicy, Topology
from esper.db.engine import create_engine, session_factory
from esper.workers.runtime import Handler, Worker
from esper.workers.stages import get_stage

REPO = Path(__file__).resolve().parents[2]

# Short enough for tests that wait on a redelivery; same shape as production.
FAST_POLICY = DeliveryPolicy(
    ack_wait=2.0, max_deliver=4, max_ack_pending=2000, nak_delays=(0.1, 0.2, 0.3, 0.5)
)
FAST = Topology(policy=FAST_POLICY)


async def wipe_bus(nats_url: str | list[str]) -> None:
    """Delete every Esper stream (and so their consumers) on a shared server."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for spec in STREAMS:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(spec.name)
    finally:
        await nc.close()


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


@contextlib.asynccontextmanager
async def running_worker(
    stage: str,
    nats_url: str | list[str],
    database_url: str,
    handler: Handler | None = None,
    *,
    topology: Topology = FAST,
    **kw: Any,
) -> AsyncIterator[Worker]:
    """A worker running in this event loop; stopped (gracefully) on exit."""
    engine = create_engine(database_url)
    if handler is None and stage == "compile":
        # These tests exercise the bus, not the compiler (test_compile_stage does).
        from esper.workers import passthrough

        handler = passthrough.compile_handler()
    if handler is None:
        from esper.settings import Settings

        handler = get_stage(stage).make_handler(Settings())
    worker = Worker(
        stage, handler, nats_url=nats_url, session_factory=session_factory(engine),
        topology=topology, **kw,
    )
    task = asyncio.create_task(worker.run())
    try:
        started = asyncio.create_task(worker.started.wait())
        done, _ = await asyncio.wait({task, started}, timeout=30, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()  # re-raise why it died
        assert started in done, "worker did not start"
        yield worker
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, 20)
        finally:
            await engine.dispose()


@contextlib.asynccontextmanager
async def js_client(nats_url: str | list[str]) -> AsyncIterator[Any]:
    nc = await connect(nats_url, name="esper-test")
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def spawn_worker(
    stage: str,
    nats_url: str,
    database_url: str,
    *extra: str,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m esper.workers.run_stage STAGE`` with the fast policy; compile is
    the pass-through unless ``env`` sets ``ESPER_PASSTHROUGH=0``."""
    args = [
        sys.executable, "-m", "esper.workers.run_stage", stage,
        "--nats-url", nats_url, "--database-url", database_url,
        "--ack-wait", str(FAST_POLICY.ack_wait), "--max-deliver", str(FAST_POLICY.max_deliver),
        *extra,
    ]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO), "ESPER_PASSTHROUGH": "1", **(env or {})},
    )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM and wait; SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def mlp_blueprint(i: int, width: int = 64) -> dict[str, Any]:
    """A residual MLP whose hidden size makes blueprint ``i`` structurally unique."""
    return {
        "schema_version": 1,
        "name": f"residual_mlp_{i}",
        "inputs": [{"name": "x", "shape": ["B", width], "dtype": "float32"}],
        "nodes": [
            {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 16 + i}},
            {"id": "a", "op": "gelu", "inputs": ["h"]},
            {"id": "y", "op": "linear", "inputs": ["a"],
             "attrs": {"out_features": width, "init": "zeros"}},
            {"id": "out", "op": "add", "inputs": ["x", "y"]},
        ],
        "outputs": ["out"],
        "metadata": {"tags": ["test"]},
    }


@contextlib.asynccontextmanager
async def pipeline(
    nats_url: str | list[str], database_url: str, **kw: Any
) -> AsyncIterator[dict[str, Worker]]:
    """compile, validate and deploy workers (pass-through) in this event loop."""
    async with contextlib.AsyncExitStack() as stack:
        workers = {}
        for stage in ("compile", "validate", "deploy"):
            workers[stage] = await stack.enter_async_context(
                running_worker(stage, nats_url, database_url, **kw)
            )
        yield workers


async def publish_all(js: Any, events: list[Any], *, pace: float = 0.0) -> None:
    """Publish each event until the stream acks it, however long the server is
    away (a re-sent copy is dropped by the Nats-Msg-Id dedupe)."""
    from esper.bus.publish import publish_event

    for event in events:
        while True:
            try:
                await publish_event(js, event, ack_timeout=1.0)
                break
            except Exception:
                await asyncio.sleep(0.1)
        if pace:
            await asyncio.sleep(pace)


async def audit_pipeline(engine: AsyncEngine, submitted: list[Any]) -> None:
    """Nothing lost, nothing twice: every submission is one ready kernel whose
    journey is exactly compiled → validated → ready, each stage's inbox holds
    each event once, nothing is dead or unsent."""
    n = len(submitted)
    hashes = {s.blueprint_hash for s in submitted}
    assert len(hashes) == n, "audit expects distinct blueprints"
    kernels = await rows(engine, "SELECT blueprint_hash, status FROM kernels")
    assert sorted(k.blueprint_hash for k in kernels) == sorted(hashes)
    assert {k.status for k in kernels} == {"ready"}
    history = await rows(
        engine, "SELECT blueprint_hash, event FROM kernel_history ORDER BY event_seq"
    )
    journeys: dict[str, list[str]] = {}
    for h in history:
        journeys.setdefault(h.blueprint_hash, []).append(h.event)
    bad = {h: j for h, j in journeys.items() if j != ["compiled", "validated", "ready"]}
    assert not bad, f"journeys out of order or repeated: {bad}"
    for stage in ("compile", "validate", "deploy"):
        got = await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = :s", s=stage)
        assert got == n, f"{stage} inbox holds {got} events, expected {n}"
    assert await scalar(engine, "SELECT sum(submit_count) FROM blueprints") == n
    assert await scalar(engine, "SELECT count(*) FROM deployments") == n
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0
    assert await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
