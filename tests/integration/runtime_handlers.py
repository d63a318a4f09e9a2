"""Handlers for worker subprocesses in the fault tests
(``python -m esper.workers.run_stage compile --handler tests.integration.runtime_handlers:...``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from esper.bus import events as ev
from esper.settings import Settings
from esper.workers import passthrough
from esper.workers.runtime import Handler, HandlerContext


def slow_compile(settings: Settings) -> Handler:
    """The pass-through compile, then a sleep before the commit: a process
    killed now has written rows that must vanish with its transaction.
    ``ESPER_TEST_MARKER``: a file that gets a line as each handler starts."""
    inner = passthrough.compile_handler()
    marker = os.environ.get("ESPER_TEST_MARKER")
    delay = float(os.environ.get("ESPER_TEST_DELAY", "1.0"))

    async def handle(event: ev.BlueprintSubmitted, ctx: HandlerContext[Any]) -> None:
        await inner(event, ctx)
        if marker:
            _append(Path(marker), f"{event.event_id}\n")
        await asyncio.sleep(delay)

    return handle


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line)
