"""A JetStream cluster of embedded nats-servers on loopback (routes between
every pair), for tests of replicated streams surviving a node's death."""

from __future__ import annotations

from pathlib import Path

from esper.infra.nats_server import NatsServer
from esper.infra.natsconf import ClusterSpec
from esper.infra.ports import free_port


def start_nats_cluster(
    base_dir: Path, n: int = 3, *, sync_always: bool = False, timeout: float = 60.0
) -> list[NatsServer]:
    """Start ``n`` nodes in ``base_dir/node-<i>`` and wait until every one is
    healthy (JetStream has a meta leader). Each node is killable/restartable."""
    route_ports = [free_port() for _ in range(n)]
    nodes = []
    for i, route_port in enumerate(route_ports):
        spec = ClusterSpec(
            port=route_port,
            routes=tuple(ClusterSpec.route_url(p) for p in route_ports if p != route_port),
            server_name=f"esper-node-{i}",
        )
        nodes.append(
            NatsServer(
                Path(base_dir) / f"node-{i}",
                free_port(),
                free_port(),
                sync_always=sync_always,
                cluster=spec,
            )
        )
    try:
        # All must run before any can elect a meta leader and report healthy.
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(timeout)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


def cluster_urls(nodes: list[NatsServer]) -> list[str]:
    """Client URLs of every node, for a client that fails over between them."""
    return [node.url for node in nodes]
