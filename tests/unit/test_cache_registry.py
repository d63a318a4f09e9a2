"""Kernel registry over memory + disk (+ a dict standing in for the durable tier;
the real one is exercised in tests/integration/test_cache_durable.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from esper.artifacts import Artifact, ArtifactIntegrityError, ArtifactSignatureError, digest_of
from esper.cache import DiskTier, KernelRegistry, MemoryTier, cache_key, format_stats

SIGNER = Ed25519PrivateKey.generate()


def make_packed(n: int = 0, key: Ed25519PrivateKey = SIGNER) -> tuple[str, bytes]:
    ck = cache_key(
        blueprint_hash=f"{n:064x}",
        target="cpu",
        dtype="float32",
        backend="torch",
        versions={"torch": "2.13.0"},
        options={},
    )
    art = Artifact.build(
        cache_key=ck,
        blueprint_hash=f"{n:064x}",
        target="cpu",
        dtype="float32",
        backend="torch",
        versions={"torch": "2.13.0"},
        options={},
        files={"kernels.py": f"N = {n}\n".encode(), "ir.json": b"{}"},
    )
    return ck, art.pack(key)


class DictDurable:
    """Stand-in with the DurableTier surface the registry uses."""

    def __init__(self) -> None:
        self.by_key: dict[str, bytes] = {}
        self.gets = 0

    async def get_by_key(self, cache_key: str) -> bytes | None:
        self.gets += 1
        return self.by_key.get(cache_key)

    async def put(self, cache_key: str, packed: bytes, *, manifest: Any = None) -> str:
        self.by_key[cache_key] = packed
        return digest_of(packed)


class Loader:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, artifact: Artifact) -> dict[str, str]:
        self.calls.append(artifact.manifest.cache_key)
        return {"source": artifact.text("kernels.py")}


def make_registry(
    root: Path, durable: DictDurable | None = None, loader: Any = None
) -> tuple[KernelRegistry, CollectorRegistry]:
    prom = CollectorRegistry()
    reg = KernelRegistry(
        MemoryTier(capacity=8),
        DiskTier(root),
        durable,  # type: ignore[arg-type]
        SIGNER.public_key(),
        loader or Loader(),
        metrics_registry=prom,
    )
    return reg, prom


async def test_miss_store_then_hits(tmp_path: Path) -> None:
    reg, prom = make_registry(tmp_path)
    ck, packed = make_packed(1)
    assert await reg.lookup(ck) is None
    assert await reg.store(ck, packed) == digest_of(packed)
    first = await reg.lookup(ck)
    assert first is not None and first.tier == "disk"
    assert first.kernel == {"source": "N = 1\n"}
    assert first.digest == digest_of(packed) and first.manifest.cache_key == ck
    again = await reg.lookup(ck)
    assert again is first
    assert reg.lookup_memory(ck) is first
    assert reg.loader.calls == [ck]
    snap = reg.snapshot()
    assert snap["tiers"]["memory"] == {"hits": 2, "misses": 2, "rejected": 0}
    assert snap["tiers"]["disk"] == {"hits": 1, "misses": 1, "rejected": 0}
    assert snap["lookups"] == 4 and snap["hit_ratio"] == pytest.approx(3 / 4)
    assert snap["latency"]["memory"]["count"] == 2
    assert prom.get_sample_value("esper_cache_hits_total", {"tier": "memory"}) == 2
    assert prom.get_sample_value("esper_cache_lookup_seconds_count", {"outcome": "miss"}) == 1
    assert "memory" in format_stats(snap)


async def test_another_process_hits_disk(tmp_path: Path) -> None:
    writer, _ = make_registry(tmp_path)
    ck, packed = make_packed(2)
    await writer.store(ck, packed)
    reader, _ = make_registry(tmp_path)
    found = await reader.lookup(ck)
    assert found is not None and found.tier == "disk"


async def test_durable_hit_fills_disk_and_memory(tmp_path: Path) -> None:
    durable = DictDurable()
    ck, packed = make_packed(3)
    durable.by_key[ck] = packed
    reg, _ = make_registry(tmp_path, durable)
    found = await reg.lookup(ck)
    assert found is not None and found.tier == "durable"
    assert ck in reg.memory
    await reg.flush()
    assert reg.disk.get_by_key(ck) == packed
    # Another process on this machine now hits disk without asking durable.
    other, _ = make_registry(tmp_path, durable)
    gets = durable.gets
    assert (await other.lookup(ck)).tier == "disk"  # type: ignore[union-attr]
    assert durable.gets == gets


async def test_store_writes_durable(tmp_path: Path) -> None:
    durable = DictDurable()
    reg, _ = make_registry(tmp_path, durable)
    ck, packed = make_packed(4)
    await reg.store(ck, packed)
    assert durable.by_key[ck] == packed


async def test_tampered_disk_copy_is_refused_then_forgotten(tmp_path: Path) -> None:
    reg, prom = make_registry(tmp_path)
    ck, packed = make_packed(5)
    evil = bytearray(packed)
    evil[packed.index(b"N = 5")] = ord("M")
    reg.disk.put(ck, bytes(evil))
    with pytest.raises(ArtifactIntegrityError):
        await reg.lookup(ck)
    assert reg.loader.calls == []
    assert prom.get_sample_value("esper_cache_rejected_total", {"tier": "disk"}) == 1
    assert await reg.lookup(ck) is None  # the bad entry was dropped


async def test_tampered_disk_copy_falls_back_to_durable(tmp_path: Path) -> None:
    durable = DictDurable()
    reg, _ = make_registry(tmp_path, durable)
    ck, packed = make_packed(6)
    durable.by_key[ck] = packed
    reg.disk.put(ck, packed[:-1] + b"\1")
    found = await reg.lookup(ck)
    assert found is not None and found.tier == "durable"
    await reg.flush()
    assert reg.disk.get_by_key(ck) == packed
    assert reg.stats.rejected["disk"] == 1


async def test_foreign_signed_artifact_never_reaches_the_loader(tmp_path: Path) -> None:
    reg, _ = make_registry(tmp_path)
    ck, foreign = make_packed(7, key=Ed25519PrivateKey.generate())
    with pytest.raises(ArtifactSignatureError):
        await reg.store(ck, foreign)
    assert reg.disk.get_by_key(ck) is None
    reg.disk.put(ck, foreign)  # planted behind the registry's back
    with pytest.raises(ArtifactSignatureError):
        await reg.lookup(ck)
    assert reg.loader.calls == []


async def test_valid_artifact_under_the_wrong_key_is_refused(tmp_path: Path) -> None:
    reg, _ = make_registry(tmp_path)
    ck_a, packed_a = make_packed(8)
    ck_b, _ = make_packed(9)
    with pytest.raises(ArtifactIntegrityError, match="built for key"):
        await reg.store(ck_b, packed_a)
    reg.disk.put(ck_b, packed_a)
    with pytest.raises(ArtifactIntegrityError, match="built for key"):
        await reg.lookup(ck_b)
    assert await reg.store(ck_a, packed_a)


async def test_concurrent_lookups_load_once(tmp_path: Path) -> None:
    calls = 0

    async def slow_loader(artifact: Artifact) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return artifact.manifest.cache_key

    reg, _ = make_registry(tmp_path, loader=slow_loader)
    ck, packed = make_packed(10)
    await reg.store(ck, packed)
    results = await asyncio.gather(*(reg.lookup(ck) for _ in range(10)))
    assert calls == 1
    assert {r.kernel for r in results if r is not None} == {ck}
    assert not reg._inflight


async def test_memory_eviction_reloads_from_disk(tmp_path: Path) -> None:
    reg, _ = make_registry(tmp_path)
    keys = []
    for n in range(20, 30):
        ck, packed = make_packed(n)
        await reg.store(ck, packed)
        keys.append(ck)
        await reg.lookup(ck)
    assert len(reg.memory) == 8 and keys[0] not in reg.memory
    assert (await reg.lookup(keys[0])).tier == "disk"  # type: ignore[union-attr]


def _delete_files(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            path.unlink()


async def test_a_memory_hit_touches_no_other_tier(tmp_path: Path) -> None:
    # Its latency is measured in benchmarks/bench_cache.py ("memory hit"), not
    # here: a timed assertion fails on a slow or busy machine.
    reg, _ = make_registry(tmp_path)
    ck, packed = make_packed(40)
    await reg.store(ck, packed)
    first = await reg.lookup(ck)
    _delete_files(tmp_path)  # the disk tier's copy is gone
    for _ in range(100):
        assert await reg.lookup(ck) is first
    assert reg.loader.calls == [ck]  # built once
    assert reg.snapshot()["tiers"]["disk"]["hits"] == 1
