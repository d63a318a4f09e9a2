"""The relay's fast path gathers acked rows and marks them sent in one
statement after ``mark_delay``, against recording stand-ins for JetStream and
the mark (the integration tests run the relay against real servers)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from esper.workers.outbox import OutboxRelay, OutboxRow


class AckingJetStream:
    """Just enough of JetStreamContext: every publish is acked at once."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish_async(self, subject: str, payload: bytes, headers: Any = None) -> Any:
        self.published.append(headers["Nats-Msg-Id"])
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(type("PubAck", (), {"duplicate": False})())
        return done


class RecordingRelay(OutboxRelay):
    def __init__(self, **kw: Any) -> None:
        super().__init__(None, AckingJetStream(), poll_interval=3600, **kw)  # type: ignore[arg-type]
        self.marks: list[list[int]] = []  # the rows' numbers (their event ids' ints)
        self.fail_marks = 0

    async def _mark(self, ids: list[uuid.UUID]) -> None:
        if self.fail_marks:
            self.fail_marks -= 1
            raise OSError("database away")
        self.marks.append([i.int for i in ids])

    async def flush(self, min_age: float = 0.0) -> int:  # no database behind this one
        return 0


def rows(*ids: int) -> list[OutboxRow]:
    return [OutboxRow(None, uuid.UUID(int=i), "esper.kernel.compiled", b"{}") for i in ids]


async def test_marks_are_gathered_then_written_once() -> None:
    # a delay far above the test's own steps, so a loaded machine cannot outrun it
    relay = RecordingRelay(mark_delay=0.5)
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.01)  # past its first poll, which marks before it looks
    await relay.publish_now(rows(1, 2))
    await asyncio.sleep(0.01)
    await relay.publish_now(rows(3))
    await asyncio.sleep(0.01)
    assert relay.marks == []  # still gathering
    for _ in range(100):
        await asyncio.sleep(0.05)
        if relay.marks:
            break
    assert relay.marks == [[1, 2, 3]]
    assert relay.published_total == 3
    relay.stop()
    await task


async def test_stop_marks_what_was_gathered() -> None:
    relay = RecordingRelay(mark_delay=10.0)
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.01)  # past its first poll, which marks before it looks
    await relay.publish_now(rows(7, 8))
    await asyncio.sleep(0.01)
    assert relay.marks == []
    relay.stop()
    await task
    assert relay.marks == [[7, 8]]


async def test_a_full_batch_is_marked_at_once() -> None:
    relay = RecordingRelay(mark_delay=10.0, batch=3)
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.01)  # past its first poll, which marks before it looks
    await relay.publish_now(rows(1, 2, 3, 4))
    await asyncio.sleep(0.01)
    assert relay.marks == [[1, 2, 3], [4]]
    relay.stop()
    await task


async def test_a_failed_mark_keeps_the_rows_for_the_next_try() -> None:
    relay = RecordingRelay(mark_delay=0.02)
    relay.fail_marks = 1
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.01)  # past its first poll, which marks before it looks
    await relay.publish_now(rows(5))
    for _ in range(100):
        await asyncio.sleep(0.02)
        if relay.marks:
            break
    assert relay.marks == [[5]]
    relay.stop()
    await task
