"""Training workers end to end on CPU against real servers: a submitted blueprint
becomes a ready kernel that a running trainer hot-loads, germinates, grafts and
fossilizes, with the whole journey in SQL; retired kernels are never germinated
(live or replayed); artifacts are verified before anything is loaded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.artifacts.signing import ensure_keypair, load_private_key, public_key_path
from esper.bus import events as ev
from esper.bus.publish import publish_event, submit_blueprints
from esper.bus.topology import Topology, ensure_streams
from esper.cache import DurableTier
from esper.compile.pipeline import compile_blueprint
from esper.db.engine import create_engine, session_factory
from esper.db.models import Blueprint, Kernel
from esper.infra.endpoints import Endpoints
from esper.ir import bundled
from esper.kasmina import KasminaConfig
from esper.settings import Settings
from esper.stages.announce import publish_committed
from esper.stages.deploy import DeployHandler, retire_kernel
from esper.train.catalog import KernelStatus
from esper.train.controller import Observation, PlateauController
from esper.train.loop import TrainConfig, Trainer, TrainResult
from esper.train.run import TrainRun
from esper.train.task import TaskConfig, TeacherStudentTask
from esper.workers import passthrough
from esper.workers.stages import get_stage
from tests.integration.runtime_helpers import (
    REPO,
    rows,
    running_worker,
    scalar,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

FAST_KASMINA = KasminaConfig(train_steps=30, graft_steps=20, stabilize_steps=None,
                             embargo_steps=50)


def eager(**kw: Any) -> PlateauController:
    """Grows at the first chance and keeps what it grows (the test is the plumbing)."""
    base = dict(warmup_steps=40, patience=1, min_improvement=10.0, cooldown_steps=20,
                stabilize_steps=20, cull_tolerance=10.0, abort_factor=100.0)
    return PlateauController(**{**base, **kw})




@pytest.fixture
def home(tmp_path: Path) -> Path:
    ensure_keypair(tmp_path)
    return tmp_path


def training(bus: str, database_url: str, home: Path, *, steps: int, controller: Any,
             **kw: Any) -> TrainRun:
    return TrainRun(
        endpoints=Endpoints(nats_url=bus, database_url=database_url), home=home,
        public_key=public_key_path(home / "keys" / "signing.pem"),
        config=TrainConfig(steps=steps, eval_every=10, kasmina=FAST_KASMINA,
                           run_id=uuid.uuid4().hex),
        controller=controller, **kw,
    )


def small_task() -> TeacherStudentTask:
    return TeacherStudentTask(TaskConfig(batch=64, val_size=256))


async def seed_stream(nats_url: str) -> list[ev.SeedEventMsg]:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe("esper.seed.>", ordered_consumer=True)
        out: list[ev.SeedEventMsg] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                return out
            event = ev.decode(msg.subject, msg.data)
            assert isinstance(event, ev.SeedEventMsg)
            out.append(event)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def stages(bus: str, database_url: str, home: Path, *, real: bool) -> AsyncIterator[None]:
    """compile + validate (the registered, real ones, or pass-through) + deploy."""
    settings = Settings(home=home, nats_url=bus, database_url=database_url)
    if real:
        compile_h = get_stage("compile").make_handler(settings)
        validate_h = get_stage("validate").make_handler(settings)
    else:
        compile_h, validate_h = passthrough.compile_handler(), passthrough.validate_handler()
    async with (
        running_worker("compile", bus, database_url, compile_h),
        running_worker("validate", bus, database_url, validate_h),
        running_worker("deploy", bus, database_url, DeployHandler()),
    ):
        yield
    for handler in (compile_h, validate_h):
        close = getattr(handler, "close", None)
        if close is not None:
            await close()


async def test_a_trainer_hot_loads_grafts_and_fossilizes_a_submitted_blueprint(
    bus: str, database_url: str, engine: AsyncEngine, home: Path
) -> None:
    run = training(bus, database_url, home, steps=260, controller=eager(), wait_for_kernels=1,
                   wait_timeout=240)
    async with stages(bus, database_url, home, real=True):
        # The trainer is up and subscribed before the kernel exists: it arrives live.
        trainer = asyncio.create_task(asyncio.to_thread(run.run, small_task()))
        await asyncio.sleep(0.5)
        await submit_blueprints(bus, [bundled()["residual_mlp"].to_dict()])
        result, catalog = await asyncio.wait_for(trainer, 300)

    assert isinstance(result, TrainResult)
    kernel = await rows(engine, "SELECT cache_key, backend, status FROM kernels")
    assert [k.status for k in kernel] == ["ready"]
    key, backend = kernel[0].cache_key, kernel[0].backend
    info = catalog.get(key)
    assert info is not None and info.status is KernelStatus.LOADED
    if backend != "passthrough":  # a real compile: the signed artifact was verified
        assert info.source is not None and info.source.startswith("artifact:")
    first = result.events[0]
    journey = [e.event for e in result.events if (e.site, e.seed) == (first.site, first.seed)]
    assert first.cache_key == key
    assert journey[:5] == ["germinated", "training", "grafting", "stabilization", "fossilized"]
    assert result.fossils and result.fossils[0][1] == key
    assert result.params_final > result.params_start

    # The SQL history: the kernel's journey, then its seed's, one timeline.
    history = await rows(
        engine,
        """
        SELECT event, at FROM kernel_history WHERE cache_key = :key
        UNION ALL
        SELECT event, at FROM seed_events WHERE kernel_cache_key = :key AND run_id = :run
        ORDER BY at
        """,
        key=key, run=result.run_id,
    )
    assert [h.event for h in history][:8] == [
        "compiled", "validated", "ready",
        "germinated", "training", "grafting", "stabilization", "fossilized",
    ]
    stored = await scalar(engine, "SELECT count(*) FROM seed_events WHERE run_id = :r",
                          r=result.run_id)
    assert stored == len(result.events)
    on_bus = [m for m in await seed_stream(bus) if m.run_id == result.run_id]
    assert [m.event for m in on_bus] == [e.event for e in result.events]
    assert on_bus[0].detail["blueprint"] == "residual_mlp"
    assert await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0


async def _retire(database_url: str, bus: str, key: str) -> None:
    eng = create_engine(database_url)
    nc = await nats.connect(bus)
    try:
        sessions = session_factory(eng)
        async with sessions() as s, s.begin():
            retired = await retire_kernel(s, key, "test retire")
        assert retired.event is not None
        await publish_committed(nc.jetstream(), sessions, [retired.event])
    finally:
        await nc.close()
        await eng.dispose()


async def test_retired_kernels_are_never_germinated_live_or_replayed(
    bus: str, database_url: str, engine: AsyncEngine, home: Path
) -> None:
    async with stages(bus, database_url, home, real=False):
        await submit_blueprints(bus, [bundled()["residual_mlp"].to_dict()])

        async def ready() -> bool:
            return await scalar(engine, "SELECT count(*) FROM kernels WHERE status='ready'") == 1

        await wait_for(ready, 20, "a ready kernel")
    key = await scalar(engine, "SELECT cache_key FROM kernels")

    # Live: the retirement arrives while the trainer runs, before it would grow.
    retired_seen: list[int] = []

    def retire_mid_run(obs: Observation, trainer: Trainer) -> None:
        if obs.step == 19:
            asyncio.run(_retire(database_url, bus, key))
            for _ in range(500):
                if trainer.catalog.is_retired(key):
                    retired_seen.append(obs.step)
                    return
                time.sleep(0.01)

    live = training(bus, database_url, home, steps=150, controller=eager(),
                    wait_for_kernels=1, wait_timeout=30, on_eval=retire_mid_run)
    result, catalog = await asyncio.to_thread(live.run, small_task())
    assert retired_seen == [19]
    info = catalog.get(key)
    assert info is not None and info.status is KernelStatus.RETIRED
    assert info.source == "blueprint-ir"  # pass-through kernel: built from the IR
    assert result.events == []

    # Replayed: a late trainer reads ready, then retired, and never offers it.
    late = training(bus, database_url, home, steps=100, controller=eager())
    result, catalog = await asyncio.to_thread(late.run, small_task())
    info = catalog.get(key)
    assert info is not None and info.status is KernelStatus.RETIRED
    assert result.events == []
    assert await scalar(engine, "SELECT count(*) FROM seed_events") == 0

    # `esper train` itself, as a user runs it, sees the same.
    env = {**os.environ, "ESPER_NATS_URL": bus, "ESPER_DATABASE_URL": database_url,
           "ESPER_HOME": str(home), "PYTHONPATH": str(REPO)}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "esper", "train", "--steps", "60", "--eval-every", "20"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels loaded 0, retired 1" in done.stdout
    assert "seeds germinated 0" in done.stdout


async def _announce_artifact(engine: AsyncEngine, bus: str, signer: Any, name: str) -> str:
    """A torch-backend residual_mlp-shaped kernel signed by ``signer``, stored in the
    durable tier and announced on esper.kernel.ready (as the deploy stage would)."""
    ir_dict = bundled()["residual_mlp"].to_dict()
    ir_dict["nodes"][0]["attrs"]["out_features"] = 32 if name == "good" else 48
    ir_dict["name"] = name
    from esper.ir import BlueprintIR

    ir = BlueprintIR.from_dict(ir_dict)
    result = compile_blueprint(ir, target="cpu", backend="torch", private_key=signer)
    sessions = session_factory(engine)
    nc = await nats.connect(bus)
    try:
        await ensure_streams(nc.jetstream(), Topology())
        await DurableTier(sessions, nc).put(result.cache_key, result.packed,
                                            manifest=result.manifest)
        kernel_id = uuid.uuid4()
        async with sessions() as s, s.begin():
            await s.execute(insert(Blueprint).values(hash=ir.canonical_hash(), name=name,
                                                     ir=ir.to_dict()))
            await s.execute(insert(Kernel).values(
                id=kernel_id, blueprint_hash=ir.canonical_hash(), cache_key=result.cache_key,
                target="cpu", dtype="float32", backend="torch", status="ready",
                artifact_digest=result.digest,
            ))
        spec = ev.TensorSpec(shape=("B", 64), dtype="float32")
        await publish_event(nc.jetstream(), ev.KernelReady(
            correlation_id=uuid.uuid4().hex, kernel_id=kernel_id, cache_key=result.cache_key,
            blueprint_hash=ir.canonical_hash(), target="cpu", dtype="float32", backend="torch",
            input_schemas=[spec], output_schemas=[spec], artifact_digest=result.digest,
            artifact_location=f"nats-object-store:esper-artifacts/{result.digest}",
        ))
    finally:
        await nc.close()
    return result.cache_key


async def test_artifacts_are_verified_before_they_are_loaded(
    bus: str, database_url: str, engine: AsyncEngine, home: Path, tmp_path: Path
) -> None:
    good = await _announce_artifact(engine, bus, load_private_key(home / "keys" / "signing.pem"),
                                    "good")
    forged = await _announce_artifact(engine, bus, Ed25519PrivateKey.generate(), "forged")
    run = training(bus, database_url, home, steps=120, controller=eager(max_germinations=1),
                   wait_for_kernels=1, wait_timeout=30)
    result, catalog = await asyncio.to_thread(run.run, small_task())
    ok, bad = catalog.get(good), catalog.get(forged)
    assert ok is not None and ok.status is KernelStatus.LOADED
    assert ok.source == "artifact:durable" and ok.name == "good"
    assert bad is not None and bad.status is KernelStatus.FAILED
    assert "Signature" in (bad.error or "")
    germinated = {e.cache_key for e in result.events if e.event == "germinated"}
    assert germinated == {good}
