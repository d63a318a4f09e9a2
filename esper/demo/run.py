"""`esper demo`: the whole system on one machine, start to finish.

1. Embedded NATS + PostgreSQL in a fresh data dir (a temp dir unless ``--home``;
   external servers when ``ESPER_NATS_URL``/``ESPER_DATABASE_URL`` are set),
   migrations, a signing key pair.
2. One worker process per stage (compile, validate, deploy), supervised as by
   `esper up`; their logs go to ``<home>/logs``.
3. Submit the bundled blueprints plus one that is valid IR but unsafe to graft
   (its output projection starts nonzero): the validator's graft-safety check
   rejects it. Progress is read back from ``kernel_history`` as it happens.
4. One trainer (in this process) on the teacher-student task: it replays the
   kernel history, hot-loads the kernels that fit its sites and grows.
5. Two static hosts trained on the same data for the same steps — the start
   size, and the grown size (the fossils' blueprints fixed in from step 0).
6. The summary, the journey and the SQL behind them; the loss-curve PNG.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.client import EsperClient, HistoryRow, Outcome
from esper.infra.endpoints import Endpoints
from esper.ir import bundled
from esper.settings import Settings
from esper.stack.supervisor import Supervisor

Out = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


STAGES = ("compile", "validate", "deploy")

def unsafe_blueprint() -> dict[str, Any]:
    """``residual_mlp`` with its output projection's zero init removed: valid IR that
    changes the host the moment it is grafted, so validation rejects it."""
    ir = copy.deepcopy(bundled()["residual_mlp"].to_dict())
    ir["name"] = "unsafe_graft_mlp"
    for node in ir["nodes"]:
        node.get("attrs", {}).pop("init", None)
    ir["metadata"] = {"description": "residual_mlp without its zero init: not function-"
                      "preserving (the demo's deliberately bad blueprint)", "tags": ["demo"]}
    return ir


@dataclass
class DemoOptions:
    device: str = "cpu"
    home: Path | None = None
    png: Path = Path("esper-demo.png")
    steps: int = 1500
    keep: bool = False
    """Keep a temp home (servers' data, worker logs) after the run."""
    pipeline_timeout: float = 240.0
    print_every: int = 250
    """Steps between progress lines of the trainer."""


@dataclass
class _LoggedSupervisor(Supervisor):
    """The stage workers of `esper up`, with their output in files, not the console."""

    log_dir: Path = field(default_factory=Path)

    def _spawn(self, stage: str, index: int) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{stage}-{index}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "esper.workers.run_stage", stage],
                env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            )


def _stage_of(row: HistoryRow) -> str:
    return {"compiled": "compile", "ready": "deploy"}.get(row.event) or str(
        row.detail.get("stage") or "-")


def _describe(row: HistoryRow) -> str:
    d = row.detail
    if row.event == "compiled":
        ms = d.get("compile_ms")
        how = "cache hit" if d.get("cache_hit") else (f"{ms:.0f} ms" if ms else "")
        return f"compiled ({row.backend}{', ' + how if how else ''})"
    if row.event == "validated":
        ms = d.get("duration_ms")
        checks = len(d.get("checks") or [])
        return f"validated ({checks} checks{f', {ms / 1e3:.1f} s' if ms else ''})"
    if row.event == "rejected":
        reasons = d.get("reasons") or [{}]
        first = reasons[0]
        return f"REJECTED by {first.get('check', '?')}: {str(first.get('message', ''))[:90]}"
    if row.event == "ready":
        seed = d.get("seed")
        where = f"{seed['dtype']}[{', '.join(map(str, seed['shape']))}]" if seed else "no site"
        return f"ready: deployed for seed sites {where}"
    return row.event


def demo_blueprints() -> list[dict[str, Any]]:
    """The bundled blueprints, the one the trainer's sites take first (it is compiled
    and validated first, so training starts early), then the unsafe one."""
    irs = bundled()
    order = sorted(irs, key=lambda name: (name != "residual_mlp", name))
    return [irs[name].to_dict() for name in order] + [unsafe_blueprint()]


async def _pipeline(endpoints: Endpoints, out: Out, timeout: float) -> Outcome:
    from esper.demo.follow import follow

    client = await EsperClient.connect(endpoints)
    async with client:
        subs = await client.submit(demo_blueprints())
        names = {s.blueprint_hash: s.name for s in subs}
        out(f"submitted {len(subs)} blueprints: {', '.join(s.name for s in subs)}")

        def on_row(row: HistoryRow) -> None:
            out(f"  {_stage_of(row):<9} {names.get(row.blueprint_hash, '?'):<20} "
                f"{row.target:<11} {_describe(row)}")

        return await follow(client.engine, subs, on_row=on_row, timeout=timeout)


class _PipelineWatch:
    """Submits and follows the pipeline on a thread of its own, so the trainer can
    start as soon as its first kernel is ready (the rest validate meanwhile)."""

    def __init__(self, endpoints: Endpoints, say: Out, timeout: float) -> None:
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._args = (endpoints, say, timeout)
        self._thread = threading.Thread(target=self._run, name="esper-demo-pipeline",
                                        daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.outcome = asyncio.run(_pipeline(*self._args))
        except BaseException as exc:
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - t0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> Outcome:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.outcome is None:
            raise TimeoutError(f"the pipeline did not finish within {timeout:.0f}s")
        return self.outcome


def run_demo(opts: DemoOptions, out: Out | None = None) -> Any:
    """Run everything; returns the DemoSummary (see esper.demo.report)."""
    from esper.artifacts.signing import ensure_keypair, public_key_path
    from esper.db.migrate import upgrade
    from esper.stack.servers import start_servers

    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:  # three threads report: whole lines only
            (out or _print)(line)

    started = time.perf_counter()
    timings: dict[str, float] = {}
    temp = opts.home is None
    home = Path(tempfile.mkdtemp(prefix="esper-demo-")) if opts.home is None else \
        Path(opts.home).resolve()
    settings = Settings(home=home)
    say(f"esper demo: data in {home}{' (temporary)' if temp and not opts.keep else ''}")
    servers = start_servers(settings, sync_always=False)
    supervisor: _LoggedSupervisor | None = None
    try:
        for line in servers.started:
            say(f"started {line}")
        endpoints = servers.endpoints
        asyncio.run(upgrade(endpoints.database_url))
        key = settings.signing_key or ensure_keypair(home)
        public = settings.public_key or public_key_path(Path(key))
        nats = endpoints.nats_url
        env = {
            "ESPER_HOME": str(home),
            "ESPER_NATS_URL": nats if isinstance(nats, str) else ",".join(nats),
            "ESPER_DATABASE_URL": endpoints.database_url,
            "ESPER_SIGNING_KEY": str(key),
            "ESPER_PUBLIC_KEY": str(public),
            "ESPER_LOG_LEVEL": "INFO",
        }
        if opts.device == "cpu":
            env["ESPER_TARGETS"] = "cpu"
        supervisor = _LoggedSupervisor(dict.fromkeys(STAGES, 1), env, grace=15.0,
                                       log_dir=home / "logs")
        supervisor.start()
        say(f"workers: {', '.join(STAGES)} (logs in {home / 'logs'})")
        timings["start-up"] = time.perf_counter() - started

        from esper.demo import growth

        pipeline = _PipelineWatch(endpoints, say, opts.pipeline_timeout)
        pipeline.start()
        grown = growth.grow(opts, endpoints, home=home, public_key=Path(public), say=say,
                            timings=timings)
        outcome = pipeline.join(opts.pipeline_timeout)
        timings["pipeline"] = pipeline.seconds
        for note in supervisor.poll():
            say(note)
        say(f"pipeline settled in {pipeline.seconds:.1f}s: {len(outcome.ready)} blueprints "
            f"with every kernel ready, {len(outcome.rejected)} with a rejected kernel, "
            f"{len(outcome.pending)} pending")
        summary = growth.report(opts, grown, endpoints, say=say, timings=timings)
    finally:
        if supervisor is not None:
            supervisor.stop()
        servers.close()
        if temp and not opts.keep:
            shutil.rmtree(home, ignore_errors=True)
    summary.timings["total"] = time.perf_counter() - started
    say(f"esper demo: done in {summary.timings['total']:.1f}s")
    return summary
