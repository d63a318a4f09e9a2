"""One settings object, read from ``ESPER_*`` once at start-up and passed down."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob Esper reads from the environment (prefix ``ESPER_``)."""

    model_config = SettingsConfigDict(env_prefix="ESPER_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".esper")
    nats_url: str | None = None
    database_url: str | None = None
    signing_key: Path | None = None
    public_key: Path | None = None
    targets: str | None = None
    metrics_port: int | None = None
    nats_creds: Path | None = None
    """A NATS ``.creds`` file (user JWT + nkey seed) or a bare nkey seed file."""
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    stream_replicas: int = 1
    """JetStream replicas of Esper's streams: 1 on one server, 3 on a cluster."""
    log_level: str = "INFO"
    passthrough: bool = False
    """Stages record kernels without compiling or validating (bus benchmarks, tests)."""
    compile_timeout: float = 120.0
    """Seconds one compile may take before it is killed and recorded as a rejection."""

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def endpoints_file(self) -> Path:
        return self.home / "endpoints.json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
