"""Publishing events to JetStream, and the submit path that starts a journey."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import PubAck

from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.topology import Topology, ensure_streams
from esper.errors import IRValidationError

MSG_ID_HEADER = "Nats-Msg-Id"


def msg_headers(event_id: uuid.UUID | str) -> dict[str, str]:
    """``Nats-Msg-Id`` = event_id: JetStream drops a re-published copy."""
    return {MSG_ID_HEADER: str(event_id)}


async def publish_event(
    js: JetStreamContext, event: ev.EsperEvent, *, ack_timeout: float = 5.0
) -> PubAck:
    """Publish one event and wait for the stream's ack (``.duplicate`` is True
    when JetStream had it already)."""
    return await js.publish(
        event.subject, ev.encode(event), timeout=ack_timeout, headers=msg_headers(event.event_id)
    )


Blueprintish = dict[str, Any] | str | Path


def _load_ir(ir: Blueprintish) -> dict[str, Any]:
    if isinstance(ir, Path):
        ir = ir.read_text()
    if isinstance(ir, str):
        try:
            ir = json.loads(ir)
        except json.JSONDecodeError as exc:
            raise IRValidationError(f"blueprint is not JSON: {exc}") from exc
    if not isinstance(ir, dict):
        raise IRValidationError(f"blueprint must be a JSON object, got {type(ir).__name__}")
    return ir


def make_submission(
    ir: Blueprintish,
    *,
    dtypes: tuple[str, ...] = ("float32",),
    submitted_by: str | None = None,
    correlation_id: str | None = None,
) -> ev.BlueprintSubmitted:
    """Validate a blueprint locally (IRValidationError if invalid) and build its
    submission event. The journey's ``correlation_id`` is a fresh uuid unless given."""
    from esper.ir import BlueprintIR

    raw = _load_ir(ir)
    blueprint = BlueprintIR.from_dict(raw)
    event = ev.BlueprintSubmitted(
        correlation_id=correlation_id or uuid.uuid4().hex,
        blueprint_hash=blueprint.canonical_hash(),
        name=blueprint.name,
        ir=raw,
        dtypes=dtypes,  # type: ignore[arg-type]
        submitted_by=submitted_by,
    )
    ev.encode(event)  # size check before anything is published
    return event


async def submit_events(
    js: JetStreamContext, submissions: Iterable[ev.BlueprintSubmitted], *, ack_timeout: float = 10.0
) -> list[PubAck]:
    """Publish prepared submissions, pipelined, and wait for every stream ack."""
    futures = [
        await js.publish_async(e.subject, ev.encode(e), headers=msg_headers(e.event_id))
        for e in submissions
    ]
    return list(await asyncio.wait_for(asyncio.gather(*futures), ack_timeout))


async def submit_blueprints(
    nats_url: str,
    irs: Iterable[Blueprintish],
    *,
    dtypes: tuple[str, ...] = ("float32",),
    submitted_by: str | None = None,
    topology: Topology | None = None,
) -> list[ev.BlueprintSubmitted]:
    """Validate every blueprint first (nothing is published if one is invalid),
    then publish them all; returns the submission events in input order."""
    submissions = [make_submission(ir, dtypes=dtypes, submitted_by=submitted_by) for ir in irs]
    nc = await connect(nats_url, name="esper-submit", connect_timeout=10.0)
    try:
        js = nc.jetstream()
        await ensure_streams(js, topology or Topology(), update=False)
        await submit_events(js, submissions)
    finally:
        await nc.drain()
    return submissions
