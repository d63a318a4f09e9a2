"""One way to open a NATS connection: reconnect forever, log every state change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS

from esper.bus.natsauth import NatsSecurity, redact, refusal
from esper.errors import NatsAuthError
from esper.settings import get_settings

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]


class _GiveUp(Exception):
    """Raised from the error callback to end nats-py's own connect loop, which
    would retry forever; not an OSError, so that loop lets it out."""

    def __init__(self, error: ConnectionError) -> None:
        super().__init__(str(error))
        self.error = error


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
    security: NatsSecurity | None = None,
) -> NATS:
    """Connect to ``url`` (a comma-separated list for a cluster), retrying until
    ``connect_timeout``; once connected, the client reconnects forever and
    buffers publishes while the server is away. Credentials and TLS come from
    ``security`` (default: ESPER_NATS_CREDS / ESPER_NATS_TLS_* of the process
    settings); a refusal (bad credentials, an untrusted certificate) raises
    NatsAuthError at once."""

    async def error_cb(exc: Exception) -> None:
        if connecting:
            why = refusal(exc)
            if why is not None:
                raise _GiveUp(NatsAuthError(f"NATS at {shown} refused this client: {why}")) from exc
            if loop.time() > deadline:
                raise _GiveUp(ConnectionError(f"cannot reach NATS at {shown}: {exc}")) from exc
        log.warning("nats: %s", exc or type(exc).__name__)

    async def disconnected_cb() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats: disconnected")
        if on_disconnected is not None:
            await on_disconnected()

    async def reconnected_cb() -> None:
        log.info("nats: reconnected to %s",
                 redact(nc.connected_url.geturl()) if nc.connected_url else "?")
        if on_reconnected is not None:
            await on_reconnected()

    servers = server_list(url)
    shown = ",".join(redact(s) for s in servers)
    options = (security or NatsSecurity.from_settings(get_settings())).connect_options()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    delay = 0.1
    connecting = True
    while True:
        nc = NATS()
        try:
            await nc.connect(
                servers,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,  # type: ignore[arg-type]  # seconds; floats work
                ping_interval=5,
                max_outstanding_pings=3,
                # Room for what a worker publishes while the server restarts.
                pending_size=64 * 1024 * 1024,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                **options,
            )
            connecting = False
            return nc
        except _GiveUp as stop:
            # Bounded: closing after a failed TLS handshake can wait forever.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 0.5)
            raise stop.error from stop.__cause__
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            if loop.time() + delay > deadline:
                raise ConnectionError(f"cannot reach NATS at {shown}: {exc}") from exc
            log.info("nats: %s not reachable yet (%s); retrying", shown, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
