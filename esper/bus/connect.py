"""One way to open a NATS connection: reconnect forever, log every state change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]


def server_list(url: str | list[str]) -> list[str]:
    """``"nats://a:4222,nats://b:4222"`` → both URLs (a cluster's nodes)."""
    if isinstance(url, list):
        return url
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(
    url: str | list[str],
    *,
    name: str,
    connect_timeout: float = 30.0,
    on_reconnected: Callback | None = None,
    on_disconnected: Callback | None = None,
) -> NATS:
    """Connect to ``url`` (a comma-separated list for a cluster), retrying until
    ``connect_timeout``; once connected, the client reconnects forever and
    buffers publishes while the server is away."""

    async def error_cb(exc: Exception) -> None:
        log.warning("nats: %s", exc or type(exc).__name__)

    async def disconnected_cb() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats: disconnected")
        if on_disconnected is not None:
            await on_disconnected()

    async def reconnected_cb() -> None:
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")
        if on_reconnected is not None:
            await on_reconnected()

    servers = server_list(url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    delay = 0.1
    while True:
        try:
            nc = await nats.connect(
                servers,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                ping_interval=5,
                max_outstanding_pings=3,
                # Room for what a worker publishes while the server restarts.
                pending_size=64 * 1024 * 1024,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
            )
            return nc
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            if loop.time() + delay > deadline:
                raise ConnectionError(f"cannot reach NATS at {','.join(servers)}: {exc}") from exc
            log.info("nats: %s not reachable yet (%s); retrying", servers, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
