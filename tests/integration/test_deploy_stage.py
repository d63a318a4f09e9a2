"""The deploy stage on real servers: validated kernels become ready with their
seed schema, target and artifact location recorded and announced; a retired
kernel is announced (``esper kernels retire``) and never deployed again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus import events as ev
from esper.bus.publish import publish_event, submit_blueprints
from esper.cache import DurableTier
from esper.compile.pipeline import compile_blueprint
from esper.db.engine import session_factory
from esper.db.models import Blueprint, Kernel
from esper.ir import BlueprintIR, bundled
from esper.stages.deploy import DeployHandler, serves_target
from esper.workers import passthrough
from tests.integration.runtime_helpers import REPO, rows, running_worker, scalar, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]




async def stream_events(nats_url: str, subject: str) -> list[Any]:
    """Every event on ``subject`` in ESPER_KERNELS, in stream order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True)
        out = []
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                return out
            out.append(ev.decode(msg.subject, msg.data))
    finally:
        await nc.close()


def multi_output_blueprint() -> dict[str, Any]:
    return {
        "schema_version": 1, "name": "two_heads",
        "inputs": [{"name": "x", "shape": ["B", 8], "dtype": "float32"}],
        "nodes": [
            {"id": "a", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 4}},
            {"id": "b", "op": "relu", "inputs": ["x"]},
        ],
        "outputs": ["a", "b"],
    }


async def test_portable_backends_serve_every_target() -> None:
    assert serves_target("cpu", "torch", "cuda:sm_90")
    assert serves_target("cpu", "passthrough", "cpu")
    assert serves_target("cuda:sm_90", "triton", "cuda:sm_90")
    assert not serves_target("cuda:sm_90", "triton", "cpu")
    assert not serves_target("cuda:sm_80", "triton", "cuda:sm_90")


async def test_validated_kernels_are_deployed_with_their_seed_schema(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    blueprints = bundled()
    irs = [blueprints["residual_mlp"].to_dict(), blueprints["attention_softmax"].to_dict(),
           multi_output_blueprint()]
    async with (
        running_worker("compile", bus, database_url, passthrough.compile_handler()),
        running_worker("validate", bus, database_url, passthrough.validate_handler()),
        running_worker("deploy", bus, database_url, DeployHandler()),
    ):
        submitted = await submit_blueprints(bus, irs)

        async def ready() -> bool:
            return await scalar(engine, "SELECT count(*) FROM kernels WHERE status='ready'") == 3

        await wait_for(ready, 20, "three ready kernels")

        async def announced() -> bool:
            return len(await stream_events(bus, ev.KERNEL_READY)) == 3

        await wait_for(announced, 10, "three kernel.ready events")
    by_name = {s.blueprint_hash: s.name for s in submitted}
    ready_events = {by_name[e.blueprint_hash]: e for e in await stream_events(bus, ev.KERNEL_READY)}
    mlp = ready_events["residual_mlp"]
    assert [t.model_dump() for t in mlp.input_schemas] == [{"shape": ("B", 64), "dtype": "float32"}]
    assert mlp.output_schemas == mlp.input_schemas
    assert mlp.artifact_location is None and mlp.artifact_digest is None  # pass-through
    assert ready_events["attention_softmax"].input_schemas[0].shape == ("B", "T", 64)
    assert len(ready_events["two_heads"].output_schemas) == 2

    deployments = await rows(
        engine,
        "SELECT b.name, d.target, d.seed_schema, d.status, d.artifact_location FROM deployments d "
        "JOIN kernels k ON k.id = d.kernel_id JOIN blueprints b ON b.hash = k.blueprint_hash",
    )
    assert len(deployments) == 3
    seeds = {d.name: d.seed_schema["seed"] for d in deployments}
    assert seeds["residual_mlp"] == {"shape": ["B", 64], "dtype": "float32"}
    assert seeds["attention_softmax"] == {"shape": ["B", "T", 64], "dtype": "float32"}
    assert seeds["two_heads"] is None  # ready, but no site can take it
    assert all(d.seed_schema["portable"] and d.target == "cpu" and d.status == "active"
               for d in deployments)
    journeys = await rows(
        engine,
        "SELECT blueprint_name, string_agg(event, '>' ORDER BY event_seq) AS j "
        "FROM kernel_history GROUP BY blueprint_name",
    )
    assert {r.j for r in journeys} == {"compiled>validated>ready"}
    assert await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0


async def _artifact_kernel(
    engine: AsyncEngine, nats_url: str, *, store: bool = True
) -> tuple[ev.KernelValidated, str]:
    """A residual_mlp kernel compiled by the torch backend, its signed artifact in
    the durable store (unless ``store`` is False), its rows in Postgres."""
    ir = bundled()["residual_mlp"]
    result = compile_blueprint(ir, target="cpu", backend="torch",
                               private_key=Ed25519PrivateKey.generate())
    sessions = session_factory(engine)
    if store:
        nc = await nats.connect(nats_url)
        try:
            await DurableTier(sessions, nc).put(result.cache_key, result.packed,
                                                manifest=result.manifest)
        finally:
            await nc.close()
    kernel_id = uuid.uuid4()
    async with sessions() as s, s.begin():
        await s.execute(insert(Blueprint).values(hash=ir.canonical_hash(), name=ir.name,
                                                 ir=ir.to_dict()))
        await s.execute(insert(Kernel).values(
            id=kernel_id, blueprint_hash=ir.canonical_hash(), cache_key=result.cache_key,
            target="cpu", dtype="float32", backend="torch", status="validated",
            artifact_digest=result.digest,
        ))
    event = ev.KernelValidated(
        correlation_id=uuid.uuid4().hex, kernel_id=kernel_id, cache_key=result.cache_key,
        blueprint_hash=ir.canonical_hash(), target="cpu", dtype="float32", backend="torch",
        artifact_digest=result.digest, device="cpu",
    )
    return event, result.digest


async def test_a_kernel_with_an_artifact_is_announced_with_its_location(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    event, digest = await _artifact_kernel(engine, bus)
    async with running_worker("deploy", bus, database_url, DeployHandler()):
        nc = await nats.connect(bus)
        try:
            await publish_event(nc.jetstream(), event)
        finally:
            await nc.close()

        async def announced() -> bool:
            return len(await stream_events(bus, ev.KERNEL_READY)) == 1

        await wait_for(announced, 10, "kernel.ready")
    (ready,) = await stream_events(bus, ev.KERNEL_READY)
    assert ready.artifact_digest == digest
    assert ready.artifact_location == f"nats-object-store:esper-artifacts/{digest}"
    assert ready.cache_key == event.cache_key and ready.correlation_id == event.correlation_id
    row = (await rows(engine, "SELECT artifact_location FROM deployments"))[0]
    assert row.artifact_location == ready.artifact_location


async def test_a_missing_artifact_is_retried_not_announced(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    event, _ = await _artifact_kernel(engine, bus, store=False)
    async with running_worker("deploy", bus, database_url, DeployHandler()):
        nc = await nats.connect(bus)
        try:
            await publish_event(nc.jetstream(), event)
        finally:
            await nc.close()

        async def retried() -> bool:
            # FAST policy: 4 deliveries, then a dead letter naming the missing artifact.
            return await scalar(engine, "SELECT count(*) FROM dead_letters") == 1

        await wait_for(retried, 15, "the event to be dead-lettered after its retries")
    reason = await scalar(engine, "SELECT reason FROM dead_letters")
    assert "not in the durable store" in reason
    assert await stream_events(bus, ev.KERNEL_READY) == []
    assert await scalar(engine, "SELECT status FROM kernels") == "validated"


def _esper(nats_url: str, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ESPER_NATS_URL": nats_url, "ESPER_DATABASE_URL": database_url,
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "esper", *args], env=env, cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=60)


async def test_retire_announces_the_kernel_and_deploy_never_readies_it_again(
    bus: str, database_url: str, engine: AsyncEngine
) -> None:
    ir = BlueprintIR.from_dict(bundled()["residual_mlp"].to_dict())
    async with (
        running_worker("compile", bus, database_url, passthrough.compile_handler()),
        running_worker("validate", bus, database_url, passthrough.validate_handler()),
        running_worker("deploy", bus, database_url, DeployHandler()),
    ):
        await submit_blueprints(bus, [ir.to_dict()])

        async def ready() -> bool:
            return await scalar(engine, "SELECT count(*) FROM kernels WHERE status='ready'") == 1

        await wait_for(ready, 20, "a ready kernel")
        key = await scalar(engine, "SELECT cache_key FROM kernels")
        done = _esper(bus, database_url, "kernels", "retire", key[:12], "--reason", "test")
        assert done.returncode == 0, done.stderr
        assert "retired kernel" in done.stdout
        again = _esper(bus, database_url, "kernels", "retire", key)
        assert again.returncode == 0 and "retired already" in again.stdout
        missing = _esper(bus, database_url, "kernels", "retire", "f" * 64)
        assert missing.returncode == 1 and "no kernel" in missing.stderr

        # The same blueprint again walks the pipeline, but is never announced ready.
        await submit_blueprints(bus, [ir.to_dict()])

        async def skipped() -> bool:
            return await scalar(engine, "SELECT count(*) FROM kernel_events "
                                        "WHERE event = 'deploy_skipped'") == 1

        await wait_for(skipped, 20, "the retired kernel's deploy to be skipped")
    (retired,) = await stream_events(bus, ev.KERNEL_RETIRED)
    assert retired.cache_key == key and retired.reason == "test"
    assert len(await stream_events(bus, ev.KERNEL_READY)) == 1
    assert await scalar(engine, "SELECT status FROM kernels") == "retired"
    assert await scalar(engine, "SELECT status FROM deployments") == "retired"
    history = await rows(engine, "SELECT event, status FROM kernel_history ORDER BY event_seq")
    assert [h.event for h in history] == [
        "compiled", "validated", "ready", "retired", "compiled", "validated", "deploy_skipped"
    ]
    assert history[3].status == "retired"
    assert await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
    listed = _esper(bus, database_url, "kernels", "--json")
    assert json.loads(listed.stdout)[0]["status"] == "retired"
