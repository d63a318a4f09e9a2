"""`esper up` (the whole local stack) and `esper worker STAGE` (one worker)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from esper.errors import EsperError
from esper.settings import Settings, get_settings


def _settings(args: argparse.Namespace) -> Settings:
    home = getattr(args, "home", None)
    return Settings(home=Path(home)) if home else get_settings()


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def cmd_up(args: argparse.Namespace) -> int:
    from esper.artifacts.signing import ensure_keypair, public_key_path
    from esper.db.migrate import upgrade
    from esper.stack.servers import start_servers
    from esper.stack.supervisor import Supervisor, parse_workers
    from esper.workers.logging import configure_logging
    from esper.workers.stages import STAGES

    settings = _settings(args)
    configure_logging(settings.log_level)
    # Their start-up chatter would bury the lines a person needs.
    for noisy in ("pgserver", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        counts = parse_workers(args.workers, tuple(STAGES))
    except ValueError as exc:
        print(f"esper up: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        servers = start_servers(settings, sync_always=not args.relaxed_fsync)
    except (KeyboardInterrupt, _Stop):
        return 130
    except EsperError as exc:
        print(f"esper up: {exc}", file=sys.stderr)
        return 1
    supervisor: Supervisor | None = None
    try:
        asyncio.run(upgrade(servers.endpoints.database_url))
        key = settings.signing_key or ensure_keypair(settings.home)
        nats = servers.endpoints.nats_url
        env = {
            "ESPER_HOME": str(settings.home),
            "ESPER_NATS_URL": nats if isinstance(nats, str) else ",".join(nats),
            "ESPER_DATABASE_URL": servers.endpoints.database_url,
            "ESPER_SIGNING_KEY": str(key),
            "ESPER_PUBLIC_KEY": str(settings.public_key or public_key_path(Path(key))),
            # An embedded server is one node: its streams cannot have more replicas.
            "ESPER_STREAM_REPLICAS": str(settings.stream_replicas if settings.nats_url else 1),
        }
        # Without sync_interval: always a batch costs fsyncs that single messages
        # do not (nats-server fsyncs a batch ~3 times): publish one by one there.
        supervisor = Supervisor(counts, env, args=("--no-atomic-batches",)
                                if args.relaxed_fsync else ())
        supervisor.start()
        for line in servers.started:
            print(f"started {line}")
        print(f"endpoints in {settings.endpoints_file}")
        print("workers: " + ", ".join(f"{s}={n}" for s, n in counts.items()))
        print("esper is up; Ctrl-C stops everything", flush=True)
        while True:
            time.sleep(0.5)
            for note in supervisor.poll():
                print(note, file=sys.stderr, flush=True)
    except (KeyboardInterrupt, _Stop):
        print("stopping…", flush=True)
    except EsperError as exc:
        print(f"esper up: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if supervisor is not None:
            supervisor.stop()
        servers.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from esper.workers.run_stage import main as run_stage

    argv = [args.stage]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    return run_stage(argv)


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start servers (embedded unless URLs are set) and all workers")
    p.add_argument("--home", help="data directory (default ESPER_HOME or ~/.esper)")
    p.add_argument("--workers", help="processes per stage, e.g. compile=2,validate=1")
    p.add_argument(
        "--relaxed-fsync",
        action="store_true",
        help="embedded NATS fsyncs on its default interval instead of every write",
    )
    p.set_defaults(func=cmd_up)

    w = sub.add_parser("worker", help="run one stage's worker until SIGTERM")
    w.add_argument("stage", help="compile, validate or deploy")
    w.add_argument("--concurrency", type=int, help="transactions at once")
    w.set_defaults(func=cmd_worker)
