"""What rank 0 tells the other ranks of a data-parallel run, and how they act on it.

At every evaluation rank 0 broadcasts one ``SyncMessage`` (JSON, never pickle):
the kernels it loaded since the last one, the kernels retired since, and the
controller's decisions. Every rank applies it at the same step boundary.

Kernels travel with the message: rank 0's link fetches and verifies each kernel
once (``ShippingFetcher`` keeps the signed artifact's bytes, or a pass-through
kernel's IR), the bytes follow the message as a uint8 broadcast, and every other
rank verifies the signature itself before loading them. So one fetch serves the
whole job, only rank 0 talks to NATS and Postgres, and no rank trusts the wire
more than it trusts the store. A kernel becomes germinable (enters the agreed
catalog) only once every rank has loaded it."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.aio.client import Client as NATS
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.artifacts.format import digest_of, unpack_verified
from esper.bus import events as ev
from esper.errors import ArtifactError, ArtifactIntegrityError
from esper.kasmina import ModuleFactory, SeedState
from esper.train.catalog import KernelCatalog, KernelInfo, KernelStatus
from esper.train.controller import Decision, Germinate, Transition
from esper.train.ddp_comm import Comm
from esper.train.fetch import ArtifactFetcher, load_verified, reference_factory

log = logging.getLogger(__name__)


# --- the wire ------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KernelSpec(_Wire):
    """A loaded kernel as the other ranks need it (KernelInfo's wire twin)."""

    cache_key: str
    kernel_id: str
    blueprint_hash: str
    target: str
    backend: str
    dtype: str
    seed_schema: ev.TensorSpec | None
    artifact_digest: str | None
    artifact_location: str | None
    name: str = ""
    ir: dict[str, Any] | None = None
    """A pass-through kernel's blueprint (★ Blueprint JSON, validated on load)."""
    packed_bytes: int = 0
    """Length of the signed artifact that follows the message (0: none, use ``ir``)."""


class GerminateMsg(_Wire):
    kind: Literal["germinate"] = "germinate"
    site: str
    cache_key: str
    reason: str


class TransitionMsg(_Wire):
    kind: Literal["transition"] = "transition"
    site: str
    seed: int
    to: str
    """A ``SeedState`` name."""
    reason: str


class Retirement(_Wire):
    cache_key: str
    reason: str


DecisionMsg = Annotated[GerminateMsg | TransitionMsg, Field(discriminator="kind")]


class SyncMessage(_Wire):
    """Rank 0 → every rank, once per evaluation."""

    schema_version: Literal[1] = 1
    step: int
    """Applied after this step's boundary (-1: before the first step)."""
    kernels: tuple[KernelSpec, ...] = ()
    retired: tuple[Retirement, ...] = ()
    decisions: tuple[DecisionMsg, ...] = ()


def encode_decision(d: Decision) -> GerminateMsg | TransitionMsg:
    if isinstance(d, Germinate):
        return GerminateMsg(site=d.site, cache_key=d.cache_key, reason=d.reason)
    return TransitionMsg(site=d.site, seed=d.seed, to=d.to.name, reason=d.reason)


def decode_decision(m: GerminateMsg | TransitionMsg) -> Decision:
    if isinstance(m, GerminateMsg):
        return Germinate(m.site, m.cache_key, m.reason)
    return Transition(m.site, m.seed, SeedState[m.to], m.reason)


def encode(msg: SyncMessage) -> bytes:
    return msg.model_dump_json().encode()


def decode(data: bytes) -> SyncMessage:
    return SyncMessage.model_validate_json(data)


def broadcast_sync(comm: Comm, msg: SyncMessage | None,
                   blobs: list[bytes] | None = None) -> tuple[SyncMessage, list[bytes]]:
    """Rank 0's message (and the artifacts it announces, in order) on every rank."""
    got = decode(comm.broadcast_bytes(encode(msg) if comm.leader and msg else None))
    mine = iter(blobs or [])
    out = [comm.broadcast_bytes(next(mine) if comm.leader else None)
           for k in got.kernels if k.packed_bytes]
    for k, data in zip([k for k in got.kernels if k.packed_bytes], out, strict=True):
        if len(data) != k.packed_bytes:
            raise ArtifactIntegrityError(f"kernel {k.cache_key[:12]}: {len(data)} bytes came, "
                                         f"{k.packed_bytes} were announced")
    return got, out


# --- rank 0: what to ship ---------------------------------------------------------------


@dataclass(frozen=True)
class Shipment:
    packed: bytes | None = None
    ir: dict[str, Any] | None = None


class Shipments:
    """Thread-safe: written by rank 0's link thread, read by its training thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, Shipment] = {}

    def put(self, cache_key: str, shipment: Shipment) -> None:
        with self._lock:
            self._by_key[cache_key] = shipment

    def get(self, cache_key: str) -> Shipment | None:
        with self._lock:
            return self._by_key.get(cache_key)


class ShippingFetcher(ArtifactFetcher):
    """Rank 0's fetcher: also keeps what the other ranks need to load the same
    kernel — the verified artifact's bytes (from the disk tier, once the durable
    hit's fill has landed) or a pass-through kernel's IR."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], nc: NATS,
                 public_key: Ed25519PublicKey | None, cache_dir: Path, *,
                 shipments: Shipments) -> None:
        super().__init__(sessions, nc, public_key, cache_dir)
        self.shipments = shipments

    async def factory(self, info: KernelInfo,
                      ir: dict[str, Any] | None) -> tuple[ModuleFactory, str]:
        made = await super().factory(info, ir)
        if made[1] == "blueprint-ir":
            self.shipments.put(info.cache_key, Shipment(ir=ir))
            return made
        assert self.registry is not None  # an artifact source implies one
        await self.registry.flush()
        packed = await asyncio.to_thread(self.registry.disk.get_by_key, info.cache_key)
        if packed is None:
            raise ArtifactError(f"kernel {info.cache_key[:12]} loaded but its artifact is not "
                                "on disk to ship to the other ranks")
        self.shipments.put(info.cache_key, Shipment(packed=packed))
        return made


class KernelOutbox:
    """Rank 0: the kernels and retirements the other ranks have not been told of."""

    def __init__(self, link_catalog: KernelCatalog, shipments: Shipments) -> None:
        self.link_catalog = link_catalog
        self.shipments = shipments
        self._sent: set[str] = set()
        self._retired: set[str] = set()

    def take(self) -> tuple[list[KernelSpec], list[bytes], list[Retirement]]:
        specs: list[KernelSpec] = []
        blobs: list[bytes] = []
        retired: list[Retirement] = []
        for info in self.link_catalog.snapshot():
            if info.status is KernelStatus.RETIRED and info.cache_key not in self._retired:
                self._retired.add(info.cache_key)
                retired.append(Retirement(cache_key=info.cache_key, reason=info.error or ""))
            if info.status is not KernelStatus.LOADED or info.cache_key in self._sent:
                continue
            ship = self.shipments.get(info.cache_key)
            if ship is None:
                continue  # loaded by a plain fetcher: nothing to ship (never happens here)
            self._sent.add(info.cache_key)
            specs.append(spec_of(info, ship))
            if ship.packed is not None:
                blobs.append(ship.packed)
        return specs, blobs, retired


def spec_of(info: KernelInfo, ship: Shipment) -> KernelSpec:
    return KernelSpec(
        cache_key=info.cache_key, kernel_id=info.kernel_id, blueprint_hash=info.blueprint_hash,
        target=info.target, backend=info.backend, dtype=info.dtype, seed_schema=info.seed_schema,
        artifact_digest=info.artifact_digest, artifact_location=info.artifact_location,
        name=info.name, ir=ship.ir if ship.packed is None else None,
        packed_bytes=len(ship.packed) if ship.packed is not None else 0,
    )


# --- every rank: loading what was shipped ---------------------------------------------------


def load_shipped(spec: KernelSpec, packed: bytes | None,
                 public_key: Ed25519PublicKey | None) -> tuple[ModuleFactory, str]:
    """(factory, source) from rank 0's shipment, verified here before any byte is
    loaded. Raises ArtifactError (refused) or LookupError (nothing to load)."""
    if packed is None:
        if spec.ir is None:
            raise LookupError(f"kernel {spec.cache_key[:12]} came with neither artifact nor IR")
        return reference_factory(spec.ir, spec.dtype), "blueprint-ir"
    if public_key is None:
        raise ArtifactError(f"kernel {spec.cache_key[:12]} has a signed artifact but this rank "
                            "has no public key to verify it (ESPER_PUBLIC_KEY)")
    artifact = unpack_verified(packed, public_key)
    if artifact.manifest.cache_key != spec.cache_key:
        raise ArtifactIntegrityError(f"artifact shipped for key {spec.cache_key} was built for "
                                     f"key {artifact.manifest.cache_key}")
    digest = digest_of(packed)
    if spec.artifact_digest is not None and digest != spec.artifact_digest:
        log.warning("kernel %s: announced artifact %s, rank 0 shipped %s (also signed for this "
                    "key)", spec.cache_key[:12], spec.artifact_digest[:12], digest[:12])
    return load_verified(artifact), "artifact:rank0"


def info_of(spec: KernelSpec) -> KernelInfo:
    return KernelInfo(
        cache_key=spec.cache_key, kernel_id=spec.kernel_id, blueprint_hash=spec.blueprint_hash,
        target=spec.target, backend=spec.backend, dtype=spec.dtype, seed_schema=spec.seed_schema,
        artifact_digest=spec.artifact_digest, artifact_location=spec.artifact_location,
        name=spec.name,
    )


def receive_kernels(comm: Comm, msg: SyncMessage, blobs: list[bytes], catalog: KernelCatalog,
                    *, public_key: Ed25519PublicKey | None,
                    link_catalog: KernelCatalog | None = None) -> list[str]:
    """Load the message's kernels on this rank (rank 0 reuses its link's factories),
    agree which loaded on EVERY rank, and enter those into the agreed ``catalog``
    (the others as FAILED); apply retirements. Returns the keys now germinable."""
    blob = iter(blobs)
    loaded: list[tuple[KernelInfo, ModuleFactory | None, str | None, str | None]] = []
    for spec in msg.kernels:
        packed = next(blob) if spec.packed_bytes else None
        info = info_of(spec)
        try:
            if link_catalog is not None:
                have = link_catalog.get(spec.cache_key)
                if have is None or have.factory is None:
                    raise LookupError(f"kernel {spec.cache_key[:12]} is not loaded on rank 0")
                loaded.append((info, have.factory, have.source, None))
            else:
                loaded.append((info, *load_shipped(spec, packed, public_key), None))
        except Exception as exc:
            log.error("rank %d: kernel %s (%s) refused: %s", comm.rank, spec.cache_key[:12],
                      spec.name, exc)
            loaded.append((info, None, None, f"{type(exc).__name__}: {exc}"))
    ok = comm.agree([f is not None for _, f, _, _ in loaded], any_rank=False)
    usable: list[str] = []
    for (info, made, where, error), everywhere in zip(loaded, ok, strict=True):
        if everywhere:
            catalog.announce(replace(info, status=KernelStatus.LOADED, factory=made,
                                     source=where))
            usable.append(info.cache_key)
        else:
            catalog.announce(replace(info, status=KernelStatus.FAILED,
                                     error=error or "refused on another rank"))
    for r in msg.retired:
        catalog.retire(r.cache_key, r.reason)
    return usable
