"""Tier 3: the durable store every machine can reach. Artifact bytes live in a
JetStream object store (bucket ``esper-artifacts``, object name = digest), so a
trainer needs nothing but its NATS connection; metadata rows (digest, key, size,
manifest) live in Postgres table ``artifacts``, the source of truth for lookups."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.artifacts.format import ArtifactManifest, read_manifest_unverified, sha256_hex
from esper.db.models import Artifact as ArtifactRow

log = logging.getLogger(__name__)

BUCKET = "esper-artifacts"


class DurableTier:
    """Artifact bytes in JetStream, their metadata in Postgres."""

    name = "durable"

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        nats: NATS | JetStreamContext,
        *,
        bucket: str = BUCKET,
        replicas: int = 1,
        get_timeout: float = 30.0,
    ) -> None:
        self._sessions = session_factory
        self._js = nats.jetstream() if isinstance(nats, NATS) else nats
        self.bucket = bucket
        self.replicas = replicas
        self.get_timeout = get_timeout
        self.location = f"nats-object-store:{bucket}"
        self._store: ObjectStore | None = None
        self._store_lock = asyncio.Lock()

    async def object_store(self) -> ObjectStore:
        """The bucket, created on first use (creation is idempotent across racers)."""
        if self._store is None:
            async with self._store_lock:
                if self._store is None:
                    try:
                        self._store = await self._js.object_store(self.bucket)
                    except BucketNotFoundError:
                        self._store = await self._js.create_object_store(
                            self.bucket,
                            config=ObjectStoreConfig(
                                description="Esper kernel artifacts (object name = sha256)",
                                storage=StorageType.FILE,
                                replicas=self.replicas,
                            ),
                        )
        return self._store

    async def digests_for(self, cache_key: str) -> list[str]:
        """Digests stored under ``cache_key``, newest first (usually one)."""
        async with self._sessions() as session:
            found = await session.scalars(
                select(ArtifactRow.digest)
                .where(ArtifactRow.cache_key == cache_key)
                .order_by(ArtifactRow.created_at.desc())
            )
            return list(found)

    async def get(self, digest: str) -> bytes | None:
        store = await self.object_store()
        try:
            info = await store.get_info(digest)
            if info.chunks == 1 and not info.is_link() and info.nuid:
                # One chunk (objects up to 128 KiB: most kernels): a direct get of
                # it is one request, where ObjectStore.get creates a consumer.
                msg = await self._js.get_last_msg(
                    f"OBJ_{self.bucket}", f"$O.{self.bucket}.C.{info.nuid}", direct=True
                )
                data = bytes(msg.data or b"")
            else:
                # nats-py's get can wait forever if the object's chunks are purged
                # under it (a concurrent re-put): bound it.
                result = await asyncio.wait_for(store.get(digest), self.get_timeout)
                data = bytes(result.data or b"")
        except (ObjectNotFoundError, NotFoundError):
            return None
        if sha256_hex(data) != digest:
            log.error("durable object %s does not match its name; ignoring it", digest)
            return None
        return data

    async def get_by_key(self, cache_key: str) -> bytes | None:
        for digest in await self.digests_for(cache_key):
            data = await self.get(digest)
            if data is not None:
                return data
            # Postgres is the source of truth, but JetStream may lose bytes it
            # acknowledged (power loss without sync_interval: always).
            log.warning("artifact %s for key %s has a row but no bytes", digest, cache_key)
        return None

    async def put(
        self, cache_key: str, packed: bytes, *, manifest: ArtifactManifest | None = None
    ) -> str:
        """Bytes first, then the row, so a row always names stored bytes. Both are
        idempotent: storing one artifact twice changes nothing."""
        if manifest is None:
            manifest = read_manifest_unverified(packed)
        if manifest.cache_key != cache_key:
            raise ValueError(f"artifact is for key {manifest.cache_key}, not {cache_key}")
        digest = sha256_hex(packed)
        store = await self.object_store()
        try:
            info = await store.get_info(digest)
            present = info.size == len(packed)
        except ObjectNotFoundError:
            present = False
        if not present:
            await store.put(digest, packed)
        async with self._sessions() as session, session.begin():
            await session.execute(
                pg_insert(ArtifactRow)
                .values(
                    digest=digest,
                    cache_key=cache_key,
                    size=len(packed),
                    store=self.location,
                    manifest=manifest.model_dump(mode="json"),
                )
                .on_conflict_do_nothing(index_elements=[ArtifactRow.digest])
            )
        return digest

    async def usage(self) -> dict[str, Any]:
        """Counts for ``esper kernels --stats``: artifacts, distinct keys, bytes."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(
                        func.count(),
                        func.count(func.distinct(ArtifactRow.cache_key)),
                        func.coalesce(func.sum(ArtifactRow.size), 0),
                    )
                )
            ).one()
        return {"artifacts": row[0], "keys": row[1], "bytes": int(row[2])}
