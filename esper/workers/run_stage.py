"""Run one stage's worker in this process until SIGTERM/SIGINT:
``python -m esper.workers.run_stage STAGE`` (what `esper worker STAGE` does).

``--handler module:factory`` swaps in another handler factory (called with the
settings), e.g. a test's slow handler; the stage's consumer stays the same."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
from collections.abc import Sequence

from esper.bus.topology import DeliveryPolicy, Topology
from esper.db.engine import create_engine, session_factory
from esper.infra.endpoints import resolve_endpoints
from esper.settings import Settings, get_settings
from esper.workers.logging import configure_logging
from esper.workers.runtime import DEFAULT_LINGER, Handler, Worker
from esper.workers.stages import get_stage


def _load_factory(spec: str) -> object:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


async def serve_stage(
    stage_name: str,
    *,
    settings: Settings,
    nats_url: str | list[str] | None = None,
    database_url: str | None = None,
    handler: Handler | None = None,
    topology: Topology | None = None,
    concurrency: int | None = None,
    batch: int | None = None,
    linger: float | None = None,
    atomic_batches: bool = True,
    handle_signals: bool = True,
) -> None:
    """Build the stage's handler and worker and run it until stopped."""
    stage = get_stage(stage_name)
    # URLs given here are the ones the handler must use too (the compile stage
    # opens its own NATS link for the artifact store).
    given = {k: v for k, v in (("nats_url", nats_url), ("database_url", database_url))
             if isinstance(v, str)}
    if given:
        settings = settings.model_copy(update=given)
    if nats_url is None or database_url is None:
        endpoints = resolve_endpoints(settings)
        nats_url = nats_url or endpoints.nats_servers
        database_url = database_url or endpoints.database_url
    handler = handler or stage.make_handler(settings)
    # A handler may know its best batch and concurrency (the pass-through's
    # set-based SQL wants several transactions in flight, unlike a validator).
    concurrency = concurrency or getattr(handler, "concurrency", None) or stage.concurrency
    batch = batch or getattr(handler, "batch", None) or stage.batch
    # No pre-ping: it costs a round trip per transaction, and the runtime already
    # rides out a broken connection (the batch is held and retried).
    # Custom plans: the runtime's statements are prepared once per connection and
    # take arrays of any length; a generic plan made while a table was small
    # (a fresh database, before autovacuum's first ANALYZE) kept scanning the
    # whole, growing table (benchmarks/RESULTS.md, "Event pipeline").
    engine = create_engine(
        database_url,
        pool_size=concurrency + 2,
        pool_pre_ping=False,
        connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan"}},
    )
    try:
        worker = Worker(
            stage.name,
            handler,
            nats_url=nats_url,  # type: ignore[arg-type]
            session_factory=session_factory(engine),
            concurrency=concurrency,
            batch=batch,
            topology=topology,
            metrics_port=settings.metrics_port,
            handle_signals=handle_signals,
            # The command line's, else the handler's own (a stage that takes
            # bursts from the one before it needs none), else the runtime's.
            linger=linger if linger is not None else getattr(handler, "linger", DEFAULT_LINGER),
            atomic_batches=atomic_batches,
        )
        await worker.run()
    finally:
        close = getattr(handler, "close", None)  # handlers holding connections offer one
        if close is not None:
            await close()
        await engine.dispose()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.workers.run_stage", description=__doc__)
    p.add_argument("stage")
    p.add_argument("--nats-url", help="default: ESPER_NATS_URL or endpoints.json")
    p.add_argument("--database-url", help="default: ESPER_DATABASE_URL or endpoints.json")
    p.add_argument("--concurrency", type=int, help="transactions at once")
    p.add_argument("--batch", type=int, help="messages per transaction")
    p.add_argument("--linger-ms", type=float,
                   help="wait this long for more messages to share a transaction")
    p.add_argument("--no-atomic-batches", dest="atomic_batches", action="store_false",
                   help="publish outbox rows one by one (for a nats-server without "
                        "sync_interval: always, where a batch's fsyncs cost more)")
    p.add_argument("--replicas", type=int,
                   help="stream replicas (3 in a cluster; default ESPER_STREAM_REPLICAS or 1)")
    p.add_argument("--ack-wait", type=float, default=DeliveryPolicy.ack_wait)
    p.add_argument("--max-deliver", type=int, default=DeliveryPolicy.max_deliver)
    p.add_argument("--handler", help="module:factory to build the handler from instead")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # A worker allocates many short-lived objects per message: collect the young
    # generation less often, and never scan what start-up loaded (fewer pauses).
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    settings = get_settings()
    configure_logging(settings.log_level)
    handler = None
    if args.handler:
        handler = _load_factory(args.handler)(settings)  # type: ignore[operator]
    topology = Topology(
        replicas=args.replicas if args.replicas is not None else settings.stream_replicas,
        policy=DeliveryPolicy(ack_wait=args.ack_wait, max_deliver=args.max_deliver),
    )
    asyncio.run(
        serve_stage(
            args.stage,
            settings=settings,
            nats_url=args.nats_url,
            database_url=args.database_url,
            handler=handler,
            topology=topology,
            concurrency=args.concurrency,
            batch=args.batch,
            linger=None if args.linger_ms is None else args.linger_ms / 1000,
            atomic_batches=args.atomic_batches,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
