"""Where the NATS server and the database are: ``ESPER_NATS_URL`` /
``ESPER_DATABASE_URL`` when set, else the ``endpoints.json`` that `esper up`
wrote into ``ESPER_HOME``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from esper.errors import ConfigError
from esper.settings import Settings

NO_ENDPOINTS = "no endpoints: run `esper up` or set ESPER_NATS_URL/ESPER_DATABASE_URL"


class Endpoints(BaseModel):
    """The URLs every process needs; ``nats_url`` is a list for a cluster."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    nats_url: str | list[str]
    database_url: str

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` as the list nats-py's ``connect(servers=...)`` takes."""
        return [self.nats_url] if isinstance(self.nats_url, str) else list(self.nats_url)


def _split_nats(url: str) -> str | list[str]:
    # ESPER_NATS_URL may list a cluster's nodes, comma-separated.
    parts = [p.strip() for p in url.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def read_endpoints_file(path: Path) -> Endpoints | None:
    """The endpoints in ``path``; None if it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Endpoints.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{path} is not a valid endpoints file: {exc}") from exc


def resolve_endpoints(settings: Settings) -> Endpoints:
    """The URLs from settings where set, the rest from ``endpoints.json``;
    ConfigError when either is still unknown."""
    nats_url: str | list[str] | None = (
        _split_nats(settings.nats_url) if settings.nats_url else None
    )
    database_url = settings.database_url
    if nats_url is None or database_url is None:
        written = read_endpoints_file(settings.endpoints_file)
        if written is not None:
            nats_url = nats_url if nats_url is not None else written.nats_url
            database_url = database_url if database_url is not None else written.database_url
    if not nats_url or not database_url:
        raise ConfigError(NO_ENDPOINTS)
    return Endpoints(nats_url=nats_url, database_url=database_url)


def resolve_database_url(settings: Settings) -> str:
    """Only the database URL (``esper db`` needs no NATS): ``ESPER_DATABASE_URL``
    or ``endpoints.json``; ConfigError otherwise."""
    if settings.database_url:
        return settings.database_url
    written = read_endpoints_file(settings.endpoints_file)
    if written is None:
        raise ConfigError(NO_ENDPOINTS)
    return written.database_url


def write_endpoints(settings: Settings, endpoints: Endpoints) -> Path:
    """Write ``endpoints.json`` atomically (readers never see half a file)."""
    path = settings.endpoints_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(endpoints.model_dump(), indent=2) + "\n")
    tmp.replace(path)
    return path
