"""The compile stage's configuration, resolved once from the settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.artifacts.signing import ensure_keypair
from esper.cache.durable import BUCKET
from esper.settings import Settings
from esper.stages.targets import resolve_targets

DEFAULT_COMPILE_TIMEOUT = 120.0


@dataclass(frozen=True)
class CompileStageConfig:
    """Everything the compile handler needs. ``versions`` are merged over the
    toolchain's own (tests pretend another torch/triton); ``options_extra`` goes
    into every compile's CompileOptions, and so into every cache key.

    ``lease_s`` bounds how long a dead worker's claim blocks a key (claims are
    renewed every ``heartbeat_s`` while a compile runs)."""

    targets: tuple[str, ...]
    home: Path
    signing_key: Path
    nats_url: str | list[str]
    compile_timeout: float = DEFAULT_COMPILE_TIMEOUT
    heartbeat_s: float = 2.0
    lease_s: float = 20.0
    versions: Mapping[str, str] = field(default_factory=dict)
    options_extra: Mapping[str, Any] = field(default_factory=dict)
    memory_capacity: int = 1024
    durable_bucket: str = BUCKET

    @property
    def cache_dir(self) -> Path:
        """The local disk tier (content-addressed, shared by the machine's workers)."""
        return self.home / "artifacts"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> CompileStageConfig:
        """Targets from ESPER_TARGETS, the key from ESPER_SIGNING_KEY (else made
        under ESPER_HOME), NATS from the endpoints; keyword overrides win."""
        from esper.infra.endpoints import resolve_endpoints

        if "nats_url" not in overrides:
            overrides["nats_url"] = resolve_endpoints(settings).nats_url
        if "targets" not in overrides:
            overrides["targets"] = resolve_targets(settings.targets)
        if "signing_key" not in overrides:
            overrides["signing_key"] = settings.signing_key or ensure_keypair(settings.home)
        overrides.setdefault("compile_timeout", settings.compile_timeout)
        overrides.setdefault("home", settings.home)
        return cls(**overrides)
