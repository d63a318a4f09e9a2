"""Embedded NATS + PostgreSQL under ``ESPER_HOME``, or the external servers the
settings name. A restart reuses the same data, port and URLs."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from urllib.parse import urlparse

from esper.infra.embedded import NatsServer, PostgresServer
from esper.infra.endpoints import Endpoints, read_endpoints_file, write_endpoints
from esper.infra.ports import port_open
from esper.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Servers:
    """What `esper up` runs or points at; ``close()`` stops only what it started."""

    endpoints: Endpoints
    nats: NatsServer | None = None
    postgres: PostgresServer | None = None
    started: list[str] = field(default_factory=list)

    def close(self) -> None:
        for server in (self.nats, self.postgres):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


def _previous_nats_port(settings: Settings) -> int | None:
    previous = read_endpoints_file(settings.endpoints_file)
    if previous is None or not isinstance(previous.nats_url, str):
        return None
    port = urlparse(previous.nats_url).port
    # Reuse the old port so clients holding the old endpoints keep working.
    return port if port is not None and not port_open(port) else None


def start_servers(settings: Settings, *, sync_always: bool = True) -> Servers:
    """Start what is not configured externally and write ``endpoints.json``."""
    nats = postgres = None
    started: list[str] = []
    try:
        if settings.nats_url:
            nats_url: str | list[str] = settings.nats_url
        else:
            nats = NatsServer.start(
                settings.home / "nats", _previous_nats_port(settings), sync_always=sync_always
            )
            nats_url = nats.url
            started.append(f"nats-server {nats.url} (data {nats.store_dir})")
        if settings.database_url:
            database_url = settings.database_url
        else:
            postgres = PostgresServer.start(settings.home / "postgres")
            database_url = postgres.url
            started.append(f"postgresql {postgres.pgdata}")
    except BaseException:
        for server in (nats, postgres):
            if server is not None:
                server.stop()
        raise
    endpoints = Endpoints(nats_url=nats_url, database_url=database_url)
    write_endpoints(settings, endpoints)
    return Servers(endpoints, nats, postgres, started)
