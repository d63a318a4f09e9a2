"""The nats-server configuration file Esper writes for an embedded server,
standalone or as one node of a loopback cluster."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from esper.infra.ports import LOOPBACK


@dataclass(frozen=True)
class ClusterSpec:
    """This node's place in a cluster: its route port and its peers' routes."""

    port: int
    routes: tuple[str, ...]
    name: str = "esper"
    server_name: str | None = None

    @staticmethod
    def route_url(port: int, host: str = LOOPBACK) -> str:
        return f"nats-route://{host}:{port}"


def render_config(
    *,
    server_name: str,
    port: int,
    monitor_port: int,
    store_dir: Path,
    sync_always: bool = False,
    cluster: ClusterSpec | None = None,
    host: str = LOOPBACK,
) -> str:
    """nats-server config text. JetStream on; ``sync_always`` fsyncs every write
    (the Jepsen-safe setting: the default 2-minute fsync can lose acked writes)."""
    q = json.dumps  # nats conf accepts JSON-quoted strings
    lines = [
        f"server_name: {q(server_name)}",
        f"listen: {q(f'{host}:{port}')}",
        f"http: {q(f'{host}:{monitor_port}')}",
        "jetstream {",
        f"  store_dir: {q(str(store_dir))}",
    ]
    if sync_always:
        lines.append("  sync_interval: always")
    lines.append("}")
    if cluster is not None:
        lines += [
            "cluster {",
            f"  name: {q(cluster.name)}",
            f"  listen: {q(f'{host}:{cluster.port}')}",
            f"  routes: [{', '.join(q(r) for r in cluster.routes)}]",
            "}",
        ]
    return "\n".join(lines) + "\n"
