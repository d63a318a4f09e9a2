"""The durable tier and compile-once claims against a real JetStream object store
and a real PostgreSQL (embedded, started by the session fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from esper.artifacts import Artifact, ArtifactSignatureError, digest_of
from esper.cache import (
    DiskTier,
    DurableTier,
    KernelRegistry,
    MemoryTier,
    cache_key,
    claim_compile,
    finish_claim,
    renew_claim,
    wait_for_kernel,
)
from esper.db.engine import session_factory
from esper.db.models import Artifact as ArtifactRow
from esper.db.models import Blueprint, Kernel

pytestmark = pytest.mark.integration

SIGNER = Ed25519PrivateKey.generate()
BP = "b" * 64
VERSIONS = {"esper": "0.1.0", "torch": "2.13.0", "triton": "3.9.0", "python": "3.11"}


def key_for(n: int) -> str:
    return cache_key(
        blueprint_hash=BP,
        target="cpu",
        dtype="float32",
        backend="torch",
        versions=VERSIONS,
        options={"n": n},
    )


def packed_for(ck: str, signer: Ed25519PrivateKey = SIGNER, size: int = 4096) -> bytes:
    return Artifact.build(
        cache_key=ck,
        blueprint_hash=BP,
        target="cpu",
        dtype="float32",
        backend="torch",
        versions=VERSIONS,
        options={},
        files={"kernels.py": b"# generated\n" + b"x" * size, "ir.json": b"{}"},
    ).pack(signer)


@pytest.fixture
def sessions(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(db_engine)


@pytest_asyncio.fixture(loop_scope="session")
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def durable(
    sessions: async_sessionmaker[AsyncSession], nc: NATS
) -> AsyncIterator[DurableTier]:
    # A bucket per test: the NATS server is shared by the whole session.
    tier = DurableTier(sessions, nc, bucket=f"esper-artifacts-{uuid.uuid4().hex[:10]}")
    yield tier
    with contextlib.suppress(NotFoundError):  # a test may never have created it
        await nc.jetstream().delete_object_store(tier.bucket)


@pytest_asyncio.fixture(loop_scope="session")
async def blueprint(sessions: async_sessionmaker[AsyncSession]) -> str:
    async with sessions() as s, s.begin():
        s.add(Blueprint(hash=BP, name="bp", ir={"nodes": []}))
    return BP


def registry(root: Path, durable: DurableTier | None, loads: list[str]) -> KernelRegistry:
    def loader(artifact: Artifact) -> str:
        loads.append(artifact.manifest.cache_key)
        return artifact.text("kernels.py")

    return KernelRegistry(
        MemoryTier(),
        DiskTier(root),
        durable,
        SIGNER.public_key(),
        loader,
        metrics_registry=CollectorRegistry(),
    )


# -- durable tier ------------------------------------------------------------------


async def test_put_get_round_trip(
    durable: DurableTier, sessions: async_sessionmaker[AsyncSession]
) -> None:
    ck = key_for(1)
    packed = packed_for(ck, size=200_000)  # two object-store chunks
    assert await durable.get_by_key(ck) is None
    digest = await durable.put(ck, packed)
    assert digest == digest_of(packed)
    assert await durable.get_by_key(ck) == packed
    assert await durable.put(ck, packed) == digest  # idempotent
    async with sessions() as s:
        rows = (await s.scalars(select(ArtifactRow))).all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.digest, row.cache_key, row.size) == (digest, ck, len(packed))
    assert row.store == f"nats-object-store:{durable.bucket}"
    assert row.manifest["cache_key"] == ck and "kernels.py" in row.manifest["files"]
    info = await (await durable.object_store()).get_info(digest)
    assert info.size == len(packed)
    assert await durable.usage() == {"artifacts": 1, "keys": 1, "bytes": len(packed)}


async def test_a_fresh_connection_finds_the_bucket(
    durable: DurableTier, sessions: async_sessionmaker[AsyncSession], nats_url: str
) -> None:
    ck = key_for(2)
    packed = packed_for(ck)
    await durable.put(ck, packed)
    other_nc = await nats.connect(nats_url)
    try:
        other = DurableTier(sessions, other_nc.jetstream(), bucket=durable.bucket)
        assert await other.get_by_key(ck) == packed
    finally:
        await other_nc.close()


async def test_row_without_bytes_is_a_miss(
    durable: DurableTier, sessions: async_sessionmaker[AsyncSession]
) -> None:
    ck = key_for(3)
    digest = await durable.put(ck, packed_for(ck))
    await (await durable.object_store()).delete(digest)
    assert await durable.get_by_key(ck) is None


async def test_lost_bytes_fall_back_to_an_older_artifact_of_the_key(
    durable: DurableTier,
) -> None:
    ck = key_for(6)
    older = packed_for(ck, size=100)
    await durable.put(ck, older)
    newer = packed_for(ck, size=200)
    newer_digest = await durable.put(ck, newer)
    assert await durable.get_by_key(ck) == newer
    await (await durable.object_store()).delete(newer_digest)
    assert await durable.get_by_key(ck) == older


async def test_put_refuses_a_key_mismatch(durable: DurableTier) -> None:
    with pytest.raises(ValueError, match="is for key"):
        await durable.put(key_for(4), packed_for(key_for(5)))


# -- registry across tiers -----------------------------------------------------------


async def test_registry_miss_fills_every_tier(durable: DurableTier, tmp_path: Path) -> None:
    ck = key_for(10)
    packed = packed_for(ck)
    compiler_loads: list[str] = []
    compiler = registry(tmp_path / "compiler", durable, compiler_loads)
    assert await compiler.lookup(ck) is None
    await compiler.store(ck, packed)
    assert compiler_loads == []

    # A trainer on another machine: empty memory and disk, same durable store.
    loads: list[str] = []
    trainer = registry(tmp_path / "trainer", durable, loads)
    first = await trainer.lookup(ck)
    assert first is not None and first.tier == "durable"
    assert first.kernel.startswith("# generated")
    await trainer.flush()
    assert trainer.disk.get_by_key(ck) == packed
    assert (await trainer.lookup(ck)) is first
    # A second trainer process on that machine: disk hit, durable untouched.
    second = registry(tmp_path / "trainer", None, loads)
    assert (await second.lookup(ck)).tier == "disk"  # type: ignore[union-attr]
    assert loads == [ck, ck]
    snap = trainer.snapshot()
    assert snap["tiers"]["durable"]["hits"] == 1
    assert snap["tiers"]["memory"]["hits"] == 1


async def test_foreign_signed_artifact_in_durable_store_is_refused(
    durable: DurableTier, tmp_path: Path
) -> None:
    ck = key_for(11)
    await durable.put(ck, packed_for(ck, signer=Ed25519PrivateKey.generate()))
    loads: list[str] = []
    trainer = registry(tmp_path / "t", durable, loads)
    with pytest.raises(ArtifactSignatureError):
        await trainer.lookup(ck)
    assert loads == [] and trainer.disk.get_by_key(ck) is None
    assert trainer.stats.rejected["durable"] == 1


# -- claims ------------------------------------------------------------------------


async def _claim(sessions: async_sessionmaker[AsyncSession], ck: str, worker: str, **kw: Any):
    return await claim_compile(
        sessions,
        cache_key=ck,
        blueprint_hash=BP,
        target="cpu",
        dtype="float32",
        backend="torch",
        versions=VERSIONS,
        worker_id=worker,
        **kw,
    )


async def test_concurrent_claims_have_one_winner(
    sessions: async_sessionmaker[AsyncSession], blueprint: str
) -> None:
    ck = key_for(20)
    claims = await asyncio.gather(*(_claim(sessions, ck, f"w{i}") for i in range(8)))
    winners = [c for c in claims if c.won]
    assert len(winners) == 1
    winner = winners[0]
    assert {c.kernel_id for c in claims} == {winner.kernel_id}
    assert all(c.status == "claimed" and c.claimed_by == winner.claimed_by for c in claims)

    loser_id = next(f"w{i}" for i, c in enumerate(claims) if not c.won)
    waiter = asyncio.create_task(wait_for_kernel(sessions, ck, timeout=10))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    async with sessions() as s, s.begin():
        # Only the holder may finish the claim.
        assert not await finish_claim(s, cache_key=ck, worker_id=loser_id, status="compiled")
        assert await finish_claim(
            s,
            cache_key=ck,
            worker_id=winner.claimed_by or "",
            status="compiled",
            artifact_digest="d" * 64,
            timings={"compile_s": 0.5},
        )
    done = await waiter
    assert (done.status, done.artifact_digest) == ("compiled", "d" * 64)
    again = await _claim(sessions, ck, "late")
    assert not again.won and again.status == "compiled"


async def test_wait_for_kernel_times_out_and_needs_a_row(
    sessions: async_sessionmaker[AsyncSession], blueprint: str
) -> None:
    ck = key_for(21)
    await _claim(sessions, ck, "w")
    with pytest.raises(TimeoutError, match="still claimed by w"):
        await wait_for_kernel(sessions, ck, timeout=0.2)
    with pytest.raises(LookupError):
        await wait_for_kernel(sessions, key_for(22), timeout=0.2)


async def test_claim_needs_the_blueprint_row(sessions: async_sessionmaker[AsyncSession]) -> None:
    with pytest.raises(LookupError, match="no row in blueprints"):
        await _claim(sessions, key_for(23), "w")


async def test_stale_claim_is_taken_over_once(
    sessions: async_sessionmaker[AsyncSession], blueprint: str
) -> None:
    ck = key_for(30)
    first = await _claim(sessions, ck, "dead-worker")
    assert first.won
    # A live claim is not taken over.
    assert not (await _claim(sessions, ck, "eager", lease=timedelta(minutes=5))).won
    assert await renew_claim(sessions, cache_key=ck, worker_id="dead-worker")
    async with sessions() as s, s.begin():
        await s.execute(
            update(Kernel)
            .where(Kernel.cache_key == ck)
            .values(claimed_at=text("now() - interval '1 hour'"))
        )
    claims = await asyncio.gather(
        *(_claim(sessions, ck, f"rescuer{i}", lease=timedelta(minutes=5)) for i in range(6))
    )
    winners = [c for c in claims if c.won]
    assert len(winners) == 1 and winners[0].taken_over
    assert winners[0].kernel_id == first.kernel_id
    # The dead worker, back from the grave, can neither renew nor publish.
    assert not await renew_claim(sessions, cache_key=ck, worker_id="dead-worker")
    async with sessions() as s, s.begin():
        assert not await finish_claim(s, cache_key=ck, worker_id="dead-worker", status="compiled")


_CLAIMANT = """
import asyncio, sys, time
from pathlib import Path
from esper.cache import claim_compile
from esper.db.engine import create_engine, session_factory

async def main(url, ck, me, go):
    engine = create_engine(url)
    sessions = session_factory(engine)
    async with engine.connect():
        pass
    print("ready", flush=True)
    while not Path(go).exists():
        await asyncio.sleep(0.005)
    claim = await claim_compile(sessions, cache_key=ck, blueprint_hash="b" * 64, target="cpu",
        dtype="float32", backend="torch", versions={}, worker_id=me)
    print("won" if claim.won else "lost", flush=True)
    await engine.dispose()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_claims_from_separate_processes_have_one_winner(
    database_url: str, blueprint: str, tmp_path: Path
) -> None:
    ck = key_for(40)
    go = tmp_path / "go"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLAIMANT, database_url, ck, f"proc{i}", str(go),
            stdout=subprocess.PIPE,
        )
        for i in range(3)
    ]
    for p in procs:
        assert p.stdout is not None
        assert (await asyncio.wait_for(p.stdout.readline(), 60)).strip() == b"ready"
    go.touch()
    outcomes = [(await p.communicate())[0].decode().split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sorted(o[0] for o in outcomes) == ["lost", "lost", "won"]


async def test_concurrent_submissions_compile_once(
    sessions: async_sessionmaker[AsyncSession],
    blueprint: str,
    durable: DurableTier,
    tmp_path: Path,
) -> None:
    """The compile worker's pattern: lookup → claim → (compile, store, finish) or
    (wait, lookup). Five workers on five machines; one compile; all load it."""
    ck = key_for(50)
    compiles = 0

    async def worker(i: int) -> str:
        nonlocal compiles
        reg = registry(tmp_path / f"m{i}", durable, [])
        if (hit := await reg.lookup(ck)) is not None:
            return hit.kernel
        claim = await _claim(sessions, ck, f"w{i}")
        if claim.won:
            compiles += 1
            await asyncio.sleep(0.2)  # "compiling"
            digest = await reg.store(ck, packed_for(ck))
            async with sessions() as s, s.begin():
                assert await finish_claim(
                    s, cache_key=ck, worker_id=f"w{i}", status="compiled", artifact_digest=digest
                )
        else:
            state = await wait_for_kernel(sessions, ck, timeout=10)
            assert state.status == "compiled"
        found = await reg.lookup(ck)
        assert found is not None
        return found.kernel

    kernels = await asyncio.gather(*(worker(i) for i in range(5)))
    assert compiles == 1
    assert len(set(kernels)) == 1
