"""The trainer's view of deployed kernels: what was announced, what is loaded and
may be germinated, what was retired. Written by the link's thread (announce,
load, retire), read by the training thread (``usable``): every method locks."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch

from esper.bus import events as ev
from esper.kasmina import ModuleFactory, SiteSchema


class KernelStatus(StrEnum):
    LOADING = "loading"
    """Announced and compatible; its artifact is being fetched and verified."""
    LOADED = "loaded"
    """A verified factory is at hand: it may be germinated."""
    FAILED = "failed"
    """Fetching, verifying or loading it failed (``error`` says why)."""
    IGNORED = "ignored"
    """No site of this trainer fits it, or it is built for another device."""
    RETIRED = "retired"
    """Retired by an operator: never germinated again."""


@dataclass(frozen=True)
class KernelInfo:
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
    status: KernelStatus = KernelStatus.LOADING
    source: str | None = None
    """``artifact:<tier>`` (verified signed artifact) or ``blueprint-ir`` (pass-through)."""
    error: str | None = None
    load_ms: float | None = None
    """Fetch + verify + load, on the link's thread (the training loop never waits)."""
    factory: ModuleFactory | None = field(default=None, repr=False, compare=False)
    announced_at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def label(self) -> str:
        return self.name or self.blueprint_hash[:12]

    @classmethod
    def of(cls, ready: ev.KernelReady) -> KernelInfo:
        seed = None
        if len(ready.input_schemas) == 1 and ready.output_schemas == ready.input_schemas:
            seed = ready.input_schemas[0]
        return cls(
            cache_key=ready.cache_key, kernel_id=str(ready.kernel_id),
            blueprint_hash=ready.blueprint_hash, target=ready.target, backend=ready.backend,
            dtype=ready.dtype, seed_schema=seed, artifact_digest=ready.artifact_digest,
            artifact_location=ready.artifact_location,
        )


def fits(kernel: ev.TensorSpec | None, site: SiteSchema) -> bool:
    """Whether a seed kernel of schema ``kernel`` fits a site: same rank and dtype;
    a symbolic kernel dim takes any size, a fixed one only that size (a symbolic
    site dim, the batch, needs a symbolic kernel dim)."""
    if kernel is None or len(kernel.shape) != len(site.shape):
        return False
    if kernel.dtype != str(site.dtype).removeprefix("torch."):
        return False
    return all(isinstance(k, str) or k == s for k, s in zip(kernel.shape, site.shape, strict=True))


def device_target(device: torch.device) -> str:
    """The compile target a trainer on ``device`` runs: ``cpu`` or ``cuda:sm_XY``."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda:sm_{major}{minor}"


def prefer_native(kernels: Sequence[KernelInfo], target: str) -> list[KernelInfo]:
    """One kernel per blueprint: the one built for ``target`` (e.g. Triton for
    ``cuda:sm_90``) over a portable one (the torch reference); order kept."""
    native = {k.blueprint_hash for k in kernels if k.target == target}
    return [k for k in kernels if k.target == target or k.blueprint_hash not in native]


class KernelCatalog:
    """Thread-safe map cache key → KernelInfo, in announcement order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, KernelInfo] = {}
        self._retired: dict[str, str] = {}  # retirements, even of keys never announced

    def announce(self, info: KernelInfo) -> bool:
        """Add a newly announced kernel; False if it is known already (a re-announce)."""
        with self._lock:
            if info.cache_key in self._by_key:
                return False
            if info.cache_key in self._retired:
                info = replace(info, status=KernelStatus.RETIRED,
                               error=self._retired[info.cache_key])
            self._by_key[info.cache_key] = info
            return True

    def update(self, cache_key: str, **changes: object) -> KernelInfo | None:
        """Change an entry's fields; a retired entry stays retired."""
        with self._lock:
            info = self._by_key.get(cache_key)
            if info is None:
                return None
            if info.status is KernelStatus.RETIRED:
                changes.pop("status", None)
            info = self._by_key[cache_key] = replace(info, **changes)  # type: ignore[arg-type]
            return info

    def retire(self, cache_key: str, reason: str) -> KernelInfo | None:
        with self._lock:
            self._retired[cache_key] = reason
            info = self._by_key.get(cache_key)
            if info is not None:
                info = self._by_key[cache_key] = replace(
                    info, status=KernelStatus.RETIRED, error=reason
                )
            return info

    def is_retired(self, cache_key: str) -> bool:
        with self._lock:
            return cache_key in self._retired

    def get(self, cache_key: str) -> KernelInfo | None:
        with self._lock:
            return self._by_key.get(cache_key)

    def snapshot(self) -> list[KernelInfo]:
        with self._lock:
            return list(self._by_key.values())

    def usable(self, site: SiteSchema) -> list[KernelInfo]:
        """Loaded, not retired kernels that fit ``site``, in announcement order."""
        with self._lock:
            return [
                k for k in self._by_key.values()
                if k.status is KernelStatus.LOADED and k.factory is not None
                and fits(k.seed_schema, site)
            ]

    def count(self, statuses: Sequence[KernelStatus]) -> int:
        with self._lock:
            return sum(k.status in statuses for k in self._by_key.values())
