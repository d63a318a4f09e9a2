"""One-shot job before the workers start: create (or scale up) Esper's streams
and the artifact object store with ESPER_STREAM_REPLICAS replicas, so that no
process ever creates them with the single replica its defaults give (a trainer
that starts first, the compile stage's first artifact).

    python /opt/esper/deploy/jetstream_init.py      (ESPER_* settings as every process)"""

from __future__ import annotations

import asyncio
import logging
import sys

from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError

from esper.bus.connect import connect
from esper.bus.topology import Topology, ensure_streams
from esper.cache.durable import BUCKET
from esper.errors import EsperError
from esper.settings import Settings, get_settings

log = logging.getLogger("esper.jetstream_init")


async def init_jetstream(settings: Settings, nats_url: str | list[str]) -> None:
    """Streams with ``settings.stream_replicas`` replicas; the artifact bucket too
    (an existing one is scaled up in place, never down)."""
    replicas = settings.stream_replicas
    nc = await connect(nats_url, name="esper-jetstream-init", connect_timeout=120.0)
    try:
        js = nc.jetstream()
        await ensure_streams(js, Topology(replicas=replicas))
        try:
            await js.object_store(BUCKET)
        except BucketNotFoundError:
            await js.create_object_store(BUCKET, config=ObjectStoreConfig(
                description="Esper kernel artifacts (object name = sha256)",
                storage=StorageType.FILE, replicas=replicas,
            ))
        stream = f"OBJ_{BUCKET}"
        config = (await js.stream_info(stream)).config
        if (config.num_replicas or 1) < replicas:
            config.num_replicas = replicas
            await js.update_stream(config)
        for name in [s.name for s in Topology().streams] + [stream]:
            info = await js.stream_info(name)
            log.info("stream %s: %d replica(s)", name, info.config.num_replicas or 1)
    finally:
        await nc.drain()


def main() -> int:
    from esper.infra.endpoints import resolve_endpoints

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    try:
        # Only NATS is needed: ESPER_NATS_URL, else endpoints.json.
        url = settings.nats_url or resolve_endpoints(settings).nats_servers
        asyncio.run(init_jetstream(settings, url))
    except (EsperError, ConnectionError) as exc:
        print(f"jetstream_init: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
