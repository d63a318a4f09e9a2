"""The kernel registry: look a cache key up through memory → disk → durable,
verify the artifact's signature before the loader sees a byte, and fill every
tier above the one that answered."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry

from esper.artifacts.format import Artifact, ArtifactManifest, digest_of, unpack_verified
from esper.cache.disk import DiskTier
from esper.cache.durable import DurableTier
from esper.cache.memory import MemoryTier
from esper.cache.stats import CacheStats
from esper.errors import ArtifactError, ArtifactIntegrityError

log = logging.getLogger(__name__)

Loader = Callable[[Artifact], Any]


@dataclass(frozen=True, slots=True)
class LoadedKernel:
    """What the loader made of a verified artifact, with where it came from."""

    cache_key: str
    digest: str
    manifest: ArtifactManifest
    kernel: Any
    tier: str  # the tier that first answered in this process: "disk" or "durable"


class KernelRegistry:
    """One process's view of the caching plane."""

    def __init__(
        self,
        memory: MemoryTier,
        disk: DiskTier,
        durable: DurableTier | None,
        public_key: Ed25519PublicKey,
        loader: Loader,
        *,
        metrics_registry: CollectorRegistry | None = None,
        stats: CacheStats | None = None,
    ) -> None:
        self.memory = memory
        self.disk = disk
        self.durable = durable
        self.public_key = public_key
        self.loader = loader
        self.stats = stats if stats is not None else CacheStats(metrics_registry)
        self._inflight: dict[str, asyncio.Future[LoadedKernel | None]] = {}
        self._fills: set[asyncio.Future[Any]] = set()

    def verify(self, cache_key: str, packed: bytes) -> Artifact:
        """Signature, digests, container — and that the artifact is for this key
        (the key → digest maps are not signed; this stops a valid artifact for
        another key being served under this one)."""
        artifact = unpack_verified(packed, self.public_key)
        if artifact.manifest.cache_key != cache_key:
            raise ArtifactIntegrityError(
                f"artifact stored under key {cache_key} was built for key "
                f"{artifact.manifest.cache_key}"
            )
        return artifact

    def lookup_memory(self, cache_key: str) -> LoadedKernel | None:
        """The in-process tier only, synchronously (for hot paths that cannot await)."""
        t0 = time.perf_counter()
        found = self.memory.get(cache_key)
        if found is not None:
            self.stats.hit("memory")
            self.stats.lookup("memory", time.perf_counter() - t0)
        return found

    async def lookup(self, cache_key: str) -> LoadedKernel | None:
        """The loaded kernel for ``cache_key``, or None if no tier holds it.

        Raises the ArtifactError if some tier held it but every copy was refused
        (the refused entries are dropped, so a later store can replace them)."""
        t0 = time.perf_counter()
        found = self.memory.get(cache_key)
        if found is not None:
            self.stats.hit("memory")
            self.stats.lookup("memory", time.perf_counter() - t0)
            return found
        self.stats.miss("memory")
        # Concurrent lookups of one key share one load.
        pending = self._inflight.get(cache_key)
        if pending is None:
            pending = asyncio.ensure_future(self._resolve(cache_key))
            self._inflight[cache_key] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(cache_key, None))
        result = await asyncio.shield(pending)
        self.stats.lookup(result.tier if result is not None else "miss", time.perf_counter() - t0)
        return result

    async def _resolve(self, cache_key: str) -> LoadedKernel | None:
        refused: ArtifactError | None = None

        packed = self.disk.get_by_key(cache_key)
        if packed is None:
            self.stats.miss("disk")
        else:
            try:
                return await self._load(cache_key, packed, "disk")
            except ArtifactError as exc:
                refused = exc
                self.stats.reject("disk")
                log.error("disk cache refused artifact for %s: %s", cache_key, exc)
                self.disk.discard_key(cache_key)

        if self.durable is not None:
            packed = await self.durable.get_by_key(cache_key)
            if packed is None:
                self.stats.miss("durable")
            else:
                try:
                    loaded = await self._load(cache_key, packed, "durable")
                except ArtifactError as exc:
                    refused = exc
                    self.stats.reject("durable")
                    log.error("durable store refused artifact for %s: %s", cache_key, exc)
                else:
                    self._fill_disk(cache_key, packed)
                    return loaded

        if refused is not None:
            raise refused
        return None

    def _fill_disk(self, cache_key: str, packed: bytes) -> None:
        # Off the lookup's path: the fsync'd write is the slowest part of a durable
        # hit, and the kernel is already verified and loaded. ``flush`` awaits it.
        fill = asyncio.ensure_future(asyncio.to_thread(self.disk.put, cache_key, packed))
        self._fills.add(fill)

        def done(f: asyncio.Future[Any]) -> None:
            self._fills.discard(f)
            if not f.cancelled() and f.exception() is not None:
                log.warning("disk fill for %s failed: %s", cache_key, f.exception())

        fill.add_done_callback(done)

    async def flush(self) -> None:
        """Wait for pending disk fills (call before exit to keep what was fetched)."""
        while self._fills:
            await asyncio.gather(*self._fills, return_exceptions=True)

    async def _load(self, cache_key: str, packed: bytes, tier: str) -> LoadedKernel:
        artifact = self.verify(cache_key, packed)
        kernel = self.loader(artifact)
        if inspect.isawaitable(kernel):
            kernel = await kernel
        loaded = LoadedKernel(
            cache_key=cache_key,
            digest=digest_of(packed),
            manifest=artifact.manifest,
            kernel=kernel,
            tier=tier,
        )
        self.stats.hit(tier)
        self.memory.put(cache_key, loaded)
        return loaded

    async def store(self, cache_key: str, packed: bytes) -> str:
        """Verify, then write to disk and the durable store; returns the digest.
        Nothing is loaded: the memory tier fills on the first lookup."""
        artifact = self.verify(cache_key, packed)
        digest = await asyncio.to_thread(self.disk.put, cache_key, packed)
        if self.durable is not None:
            await self.durable.put(cache_key, packed, manifest=artifact.manifest)
        return digest

    def snapshot(self) -> dict[str, Any]:
        """Stats plus tier sizes, for ``esper kernels --stats`` (see format_stats)."""
        snap = self.stats.snapshot()
        snap["memory_entries"] = len(self.memory)
        return snap
