"""The pull loop's flow control, against a recording stand-in for the NATS
client (the integration tests run it against a real server)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from nats.aio.msg import Msg

from esper.bus.pull import GapEstimate, PullConsumer


class RecordingClient:
    """Just enough of nats.aio.client.Client: records pull requests."""

    is_connected = True

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cb: Any = None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any) -> Any:
        self.cb = cb

        class Sub:
            async def unsubscribe(self) -> None:
                return None

        return Sub()

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        assert subject == "$JS.API.CONSUMER.MSG.NEXT.S.c" and reply == "_INBOX.test"
        self.requests.append(json.loads(payload))


def message(i: int) -> Msg:
    return Msg(_client=None, subject="esper.kernel.compiled", reply=f"$JS.ACK.{i}", data=b"{}")  # type: ignore[arg-type]


def status(code: str, pending: int | None = None) -> Msg:
    headers = {"Status": code}
    if pending is not None:
        headers["Nats-Pending-Messages"] = str(pending)
    return Msg(_client=None, subject="_INBOX.test", data=b"", headers=headers)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_asks_for_the_free_room_and_again_when_half_is_free() -> None:
    nc = RecordingClient()
    pull = PullConsumer(nc, "S", "c", max_in_hand=8, expires=0.25)  # type: ignore[arg-type]
    await pull.start()
    try:
        assert [r["batch"] for r in nc.requests] == [8]
        assert nc.requests[0]["expires"] == 250_000_000
        for i in range(8):
            await nc.cb(message(i))
        await settle()
        assert pull.queue.qsize() == 8 and pull.in_hand == 8 and pull.outstanding == 0
        assert len(nc.requests) == 1  # full hands: nothing more is asked for
        pull.release(3)
        await settle()
        # Nothing outstanding: ask at once, an idle consumer must keep a request waiting.
        assert [r["batch"] for r in nc.requests] == [8, 3]
        pull.release(1)
        await settle()
        assert len(nc.requests) == 2  # 1 free of 8 with 3 outstanding: wait for more room
        pull.release(3)
        await settle()
        assert [r["batch"] for r in nc.requests] == [8, 3, 4]
        assert pull.outstanding == 7
    finally:
        await pull.stop()


async def test_an_expired_request_gives_back_its_undelivered_count() -> None:
    nc = RecordingClient()
    pull = PullConsumer(nc, "S", "c", max_in_hand=10, expires=0.25)  # type: ignore[arg-type]
    await pull.start()
    try:
        await nc.cb(message(1))
        await nc.cb(status("408", pending=9))  # the request expired with 9 undelivered
        await settle()
        assert pull.in_hand == 1
        assert [r["batch"] for r in nc.requests] == [10, 9]
        await nc.cb(status("100"))  # an idle heartbeat changes nothing
        await settle()
        assert pull.outstanding == 9 and len(nc.requests) == 2
    finally:
        await pull.stop()


async def test_reset_and_pause() -> None:
    nc = RecordingClient()
    pull = PullConsumer(nc, "S", "c", max_in_hand=4, expires=0.25)  # type: ignore[arg-type]
    await pull.start()
    try:
        pull.reset()  # reconnected: the server forgot the request
        await settle()
        assert [r["batch"] for r in nc.requests] == [4, 4]
        await nc.cb(status("409"))  # e.g. a leader change, no counts: all gone, brief pause
        await settle()
        assert pull.outstanding == 0 and len(nc.requests) == 2
        await asyncio.sleep(0.6)  # the ticker asks again once the pause is over
        assert len(nc.requests) == 3
    finally:
        await pull.stop()


async def test_stop_waits_for_outstanding_requests_to_end() -> None:
    nc = RecordingClient()
    pull = PullConsumer(nc, "S", "c", max_in_hand=2, expires=0.5)  # type: ignore[arg-type]
    await pull.start()

    async def expire_soon() -> None:
        await asyncio.sleep(0.1)
        await nc.cb(message(1))  # still delivered while stopping: it is kept
        await nc.cb(status("408", pending=1))

    task = asyncio.create_task(expire_soon())
    await pull.stop()
    await task
    assert pull.outstanding == 0
    assert pull.queue.qsize() == 1
    assert len(nc.requests) == 1  # nothing asked for after stop


def test_gap_estimate_follows_the_arrival_rate_and_forgets_stopped_traffic() -> None:
    gaps = GapEstimate(quiet=1.0, weight=0.05)
    assert gaps.mean(0.0) == math.inf  # nothing seen: no traffic
    gaps.arrived(10.0)
    assert gaps.mean(10.0) == math.inf  # one message is not traffic yet
    t = 10.0
    for _ in range(200):  # 200 messages/s
        t += 0.005
        gaps.arrived(t)
    assert abs(gaps.mean(t) - 0.005) < 1e-6
    # A silence longer than the estimate stands in for it...
    assert abs(gaps.mean(t + 0.1) - 0.1) < 1e-9
    # ...and a gap of "quiet" or more starts the estimate again.
    gaps.arrived(t + 1.5)
    assert gaps.mean(t + 1.5) == math.inf
    gaps.arrived(t + 1.52)
    assert abs(gaps.mean(t + 1.52) - 0.02) < 1e-9


async def test_pull_consumer_times_arrivals() -> None:
    nc = RecordingClient()
    pull = PullConsumer(nc, "S", "c", max_in_hand=8, expires=0.25)  # type: ignore[arg-type]
    await pull.start()
    loop = asyncio.get_running_loop()
    assert pull.gaps.mean(loop.time()) == math.inf
    for i in range(40):
        await nc.cb(message(i))
        await asyncio.sleep(0.002)
    assert pull.gaps.mean(loop.time()) < 0.5  # about 2 ms on an idle machine
    await pull.stop()
