"""Turn an announced kernel into a module factory, off the training thread.

With an artifact: look its cache key up through the trainer's registry
(memory → local disk → durable store), which verifies the Ed25519 signature and
the key before the backend sees a byte, then hand the verified files to the
backend named in the signed manifest. Without one (a pass-through pipeline
records kernels it never compiled): build the module from the blueprint's IR
with the torch reference backend — logged, never silent."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.aio.client import Client as NATS
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.artifacts.format import Artifact
from esper.cache import DiskTier, DurableTier, KernelRegistry, MemoryTier
from esper.db.models import Blueprint
from esper.errors import ArtifactError
from esper.kasmina import ModuleFactory
from esper.train.catalog import KernelInfo

log = logging.getLogger(__name__)

# Backends that register themselves when their module is imported.
_SELF_REGISTERING = {"triton": "esper.triton.backend"}


def load_verified(artifact: Artifact) -> ModuleFactory:
    """The registry's loader: a verified artifact's files → the backend's factory."""
    from esper.compile.backend import available_backends, get_backend

    backend = artifact.manifest.backend
    if backend not in available_backends() and backend in _SELF_REGISTERING:
        importlib.import_module(_SELF_REGISTERING[backend])
    factory: ModuleFactory = get_backend(backend).load(artifact.manifest, artifact.files)
    return factory


def reference_factory(ir: dict[str, Any], dtype: str) -> ModuleFactory:
    """A factory building the blueprint with the torch reference backend."""
    from esper.compile.reference import build_module
    from esper.ir import BlueprintIR

    blueprint = BlueprintIR.from_dict(ir)

    def factory(device: Any) -> Any:
        return build_module(blueprint, device=device, dtype=dtype)

    return factory


class ArtifactFetcher:
    """Fetches, verifies and loads kernels for one trainer."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        nc: NATS,
        public_key: Ed25519PublicKey | None,
        cache_dir: Path,
    ) -> None:
        self._sessions = sessions
        self.registry: KernelRegistry | None = None
        if public_key is not None:
            self.registry = KernelRegistry(
                MemoryTier(256), DiskTier(cache_dir), DurableTier(sessions, nc), public_key,
                load_verified,
            )

    async def blueprint(self, blueprint_hash: str) -> tuple[str, dict[str, Any]] | None:
        """(name, IR) of a blueprint from Postgres."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(Blueprint.name, Blueprint.ir).where(Blueprint.hash == blueprint_hash)
                )
            ).one_or_none()
        return None if row is None else (row.name, row.ir)

    async def factory(
        self, info: KernelInfo, ir: dict[str, Any] | None
    ) -> tuple[ModuleFactory, str]:
        """(factory, source) for ``info``; raises ArtifactError (refused or missing) or
        LookupError (no IR for a pass-through kernel)."""
        if info.artifact_digest is None:
            if ir is None:
                raise LookupError(f"kernel {info.cache_key[:12]} has neither artifact nor IR")
            log.warning(
                "kernel %s (%s, backend %s) has no artifact (pass-through pipeline): building "
                "it from the blueprint IR with the torch reference backend",
                info.cache_key[:12], info.label, info.backend,
            )
            return reference_factory(ir, info.dtype), "blueprint-ir"
        if self.registry is None:
            raise ArtifactError(f"kernel {info.cache_key[:12]} has a signed artifact but this "
                                "trainer has no public key to verify it (ESPER_PUBLIC_KEY)")
        loaded = await self.registry.lookup(info.cache_key)
        if loaded is None:
            raise ArtifactError(f"no cache tier holds the artifact of kernel {info.cache_key[:12]}")
        if loaded.digest != info.artifact_digest:
            log.warning("kernel %s: announced artifact %s, the store gave %s (also signed for "
                        "this key)", info.cache_key[:12], info.artifact_digest[:12],
                        loaded.digest[:12])
        return loaded.kernel, f"artifact:{loaded.tier}"

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.flush()
