"""A flow-controlled pull loop on a durable JetStream consumer.

``fetch(n)`` in nats-py waits for a full batch or its timeout before it returns,
which costs latency at low rates. This keeps pull requests outstanding instead
and queues each message the moment it arrives, never holding more than
``max_in_hand`` unacknowledged messages (the caller ``release``s them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_PENDING_MSGS = "Nats-Pending-Messages"


class GapEstimate:
    """Seconds between arrivals, smoothed over about the last ``1 / weight``
    of them. A gap of ``quiet`` seconds or more means the traffic stopped:
    the estimate starts again from the next gap (infinite until then), and a
    silence longer than the estimate stands in for it."""

    def __init__(self, quiet: float = 1.0, weight: float = 0.05) -> None:
        self.quiet = quiet
        self.weight = weight
        self._gap: float | None = None
        self._last: float | None = None

    def arrived(self, now: float) -> None:
        if self._last is not None:
            gap = now - self._last
            if gap >= self.quiet:
                self._gap = None
            elif self._gap is None:
                self._gap = gap
            else:
                self._gap += self.weight * (gap - self._gap)
        self._last = now

    def mean(self, now: float) -> float:
        if self._gap is None or self._last is None:
            return math.inf
        return max(self._gap, now - self._last)


class PullConsumer:
    """Pulls from ``stream``/``consumer`` into ``queue``.

    Each pull request asks for at most the free room and expires after
    ``expires`` seconds (the server then reports how many it did not deliver),
    so a lost request — a reconnect, a leader change — costs at most that long."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        *,
        max_in_hand: int,
        expires: float = 2.0,
    ) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.max_in_hand = max(1, max_in_hand)
        self.expires = expires
        # None is the stop signal the owner puts in for its own consumers.
        self.queue: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._in_hand = 0  # delivered to us, not yet released
        self._outstanding = 0  # requested, neither delivered nor expired
        self._last_request = 0.0
        self._paused_until = 0.0
        self._stopping = False
        self._sub: Subscription | None = None
        self._inbox = ""
        self._ticker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self.gaps = GapEstimate()  # between messages arriving (by the loop's clock)

    @property
    def in_hand(self) -> int:
        return self._in_hand

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def queued(self) -> list[Msg]:
        """Messages delivered but not yet taken from the queue."""
        return [m for m in list(self.queue._queue) if m is not None]  # type: ignore[attr-defined]

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        self._ticker = asyncio.create_task(self._tick(), name="pull-ticker")
        await self._request()

    def release(self, n: int = 1) -> None:
        """``n`` messages were acked, nak'ed or terminated: room for more."""
        self._in_hand = max(0, self._in_hand - n)
        self._schedule_request()

    def pause(self, seconds: float) -> None:
        """Ask for nothing new for ``seconds`` (e.g. while Postgres is down)."""
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + seconds)

    def reset(self) -> None:
        """Forget outstanding requests (the server lost them: reconnect)."""
        self._outstanding = 0
        self._schedule_request()

    async def stop(self) -> None:
        """Stop requesting and wait until every outstanding request has been
        answered or expired, so no message is left captured by a dead inbox."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.expires + 0.5
        while self._outstanding > 0 and loop.time() < deadline and self._nc.is_connected:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 0.05)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    # -- internals -----------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if not status:
            self._outstanding = max(0, self._outstanding - 1)
            self._in_hand += 1
            self.queue.put_nowait(msg)
            self.gaps.arrived(asyncio.get_running_loop().time())
        elif status == "100":
            return  # idle heartbeat
        else:
            pending = (msg.headers or {}).get(_PENDING_MSGS)
            if pending is not None:
                self._outstanding = max(0, self._outstanding - int(pending))
            elif status != "404":
                # 409 without counts (leader change, consumer deleted...): all gone.
                why = (msg.headers or {}).get("Description")
                log.info("pull request ended: %s %s", status, why)
                self._outstanding = 0
                self.pause(0.25)
        if self._outstanding == 0:
            self._idle.set()
        self._schedule_request()

    def _schedule_request(self) -> None:
        if not self._stopping and self._want() > 0:
            asyncio.get_running_loop().call_soon(self._fire_request)

    def _fire_request(self) -> None:
        task = asyncio.ensure_future(self._request())
        task.add_done_callback(_log_failure)

    def _want(self) -> int:
        room = self.max_in_hand - self._in_hand - self._outstanding
        # Ask again when half the window is free, or at once when nothing is
        # outstanding (an idle consumer must keep one request waiting).
        if room <= 0 or (self._outstanding > 0 and room < self.max_in_hand // 2):
            return 0
        return room

    async def _request(self) -> None:
        loop = asyncio.get_running_loop()
        if self._stopping or self._sub is None or loop.time() < self._paused_until:
            return
        if not self._nc.is_connected:
            return  # the reconnect handler resets and asks again
        want = self._want()
        if want <= 0:
            return
        self._outstanding += want
        self._last_request = loop.time()
        body = {"batch": want, "expires": int(self.expires * 1e9)}
        try:
            await self._nc.publish(self._subject, json.dumps(body).encode(), reply=self._inbox)
        except Exception:
            self._outstanding -= want
            raise

    async def _tick(self) -> None:
        """Safety net: ask again after a pause, and forget requests that must
        have expired on the server without us hearing of it."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(0.25, self.expires / 4))
            if self._outstanding and loop.time() - self._last_request > 2 * self.expires + 1:
                self._outstanding = 0
            if not self._stopping:
                await self._request()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("pull request failed: %s", task.exception())
