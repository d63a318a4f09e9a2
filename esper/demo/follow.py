"""Follow submissions through the pipeline by their journeys (correlation ids),
so a re-run in a used data dir shows its own progress — cache hits included —
rather than what earlier runs left in ``kernel_history``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus import events as ev
from esper.client import HistoryRow, Outcome

TERMINAL = frozenset({"ready", "rejected", "deploy_skipped", "failed"})
"""Kernel events after which a journey has nothing more to do for that kernel."""

JOURNEYS_SQL = text(
    """
    SELECT event_seq, correlation_id, blueprint_hash, kernel_id, event, status, target,
           dtype, backend, detail
      FROM kernel_history
     WHERE correlation_id = ANY(:cids) AND event_seq > :after
     ORDER BY event_seq
    """
)

DEAD_SQL = text(
    "SELECT event_id, reason FROM dead_letters WHERE stage = 'compile' AND event_id = ANY(:ids)"
)


async def follow(
    engine: AsyncEngine,
    submissions: Sequence[ev.BlueprintSubmitted],
    *,
    on_row: Callable[[HistoryRow], None] | None = None,
    timeout: float = 300.0,
    poll: float = 0.1,
) -> Outcome:
    """Until each submission's journey is over: every kernel it touched reached a
    terminal event, or the compile stage dead-lettered it (or ``timeout``)."""
    by_cid = {s.correlation_id: s for s in submissions}
    rows: dict[str, list[HistoryRow]] = {cid: [] for cid in by_cid}
    open_kernels: dict[str, set[str]] = {cid: set() for cid in by_cid}
    dead: dict[str, str] = {}
    after = 0
    deadline = time.monotonic() + timeout
    while True:
        async with engine.connect() as conn:
            found = (await conn.execute(JOURNEYS_SQL, {"cids": list(by_cid), "after": after}))
            for r in found.all():
                after = max(after, r.event_seq)
                row = HistoryRow(r.blueprint_hash, str(r.kernel_id), r.event, r.status, r.target,
                                 r.dtype, r.backend, dict(r.detail or {}))
                rows[r.correlation_id].append(row)
                kernels = open_kernels[r.correlation_id]
                if r.event in TERMINAL:
                    kernels.discard(row.kernel_id)
                else:
                    kernels.add(row.kernel_id)
                if on_row is not None:
                    on_row(row)
            ids = [str(s.event_id) for cid, s in by_cid.items() if not rows[cid]]
            if ids:
                for r in (await conn.execute(DEAD_SQL, {"ids": ids})).all():
                    cid = next(c for c, s in by_cid.items() if str(s.event_id) == r.event_id)
                    dead[cid] = r.reason
        done = {cid for cid in by_cid
                if cid in dead or (rows[cid] and not open_kernels[cid])}
        if len(done) == len(by_cid) or time.monotonic() >= deadline:
            return _outcome(by_cid, rows, done, dead)
        await asyncio.sleep(poll)


def _outcome(by_cid: dict[str, ev.BlueprintSubmitted], rows: dict[str, list[HistoryRow]],
             done: set[str], dead: dict[str, str]) -> Outcome:
    outcome = Outcome()
    for cid, sub in by_cid.items():
        h = sub.blueprint_hash
        if cid not in done:
            outcome.pending.append(h)
        elif cid in dead or any(r.event in ("rejected", "failed") for r in rows[cid]):
            outcome.rejected[h] = rows[cid]
        else:
            outcome.ready[h] = rows[cid]
    return outcome
