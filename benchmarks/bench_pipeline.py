"""Throughput and latency of submit → compile → validate → deploy with the
pass-through handlers, on embedded servers started here.

    python benchmarks/bench_pipeline.py                  # default fsync
    python benchmarks/bench_pipeline.py --sync-always    # nats sync_interval: always
    python benchmarks/bench_pipeline.py --mode inproc    # all stages in one process

Throughput: N distinct blueprints published at once; events/s = N over the
time from the first publish to the N-th KernelReady. Latency: blueprints
offered at a fixed rate; submit → KernelReady received by a subscriber."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esper.bus import events as ev  # noqa: E402
from esper.bus.connect import connect  # noqa: E402
from esper.bus.publish import make_submission, msg_headers  # noqa: E402
from esper.bus.topology import Topology, ensure_topology  # noqa: E402
from esper.db.engine import create_engine, session_factory  # noqa: E402
from esper.db.migrate import upgrade  # noqa: E402
from esper.infra.embedded import NatsServer, PostgresServer  # noqa: E402
from esper.workers import passthrough  # noqa: E402
from esper.workers.runtime import Worker  # noqa: E402

STAGES = ("compile", "validate", "deploy")


def blueprint(i: int) -> dict[str, Any]:
    """Blueprint ``i``: a residual MLP whose hidden width makes it unique."""
    return {
        "schema_version": 1,
        "name": f"bench_{i}",
        "inputs": [{"name": "x", "shape": ["B", 64], "dtype": "float32"}],
        "nodes": [
            {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": 8 + i}},
            {"id": "a", "op": "gelu", "inputs": ["h"]},
            {"id": "y", "op": "linear", "inputs": ["a"], "attrs": {"out_features": 64}},
            {"id": "out", "op": "add", "inputs": ["x", "y"]},
        ],
        "outputs": ["out"],
    }


class ReadyWatch:
    """Records when each journey's KernelReady arrives (a core subscription
    sees every message the stream stores)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self._arrived = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        cid = json.loads(msg.data)["correlation_id"]
        self.at.setdefault(cid, time.perf_counter())
        self._arrived.set()

    async def until_all(self, ids: set[str], timeout: float = 120.0) -> None:
        async with asyncio.timeout(timeout):
            while not ids <= self.at.keys():
                self._arrived.clear()
                await self._arrived.wait()


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=REPO, env=env)


async def start_workers(args: argparse.Namespace, nats_url: str, db_url: str) -> Any:
    if args.mode == "procs":
        env = {**os.environ, "ESPER_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO),
               "ESPER_PASSTHROUGH": "1"}
        procs = []
        for stage in STAGES:
            cmd = [sys.executable, "-m", "esper.workers.run_stage", stage,
                   "--nats-url", nats_url, "--database-url", db_url]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            if args.concurrency:
                cmd += ["--concurrency", str(args.concurrency)]
            procs.append(_spawn(cmd, env))
        return procs
    gc.freeze()  # as run_stage does for a worker process
    gc.set_threshold(20_000, 20, 50)
    engines, workers, tasks = [], [], []
    handlers = {
        "compile": passthrough.compile_handler(),
        "validate": passthrough.validate_handler(),
        "deploy": passthrough.deploy_handler(),
    }
    for stage in STAGES:
        engine = create_engine(db_url, pool_pre_ping=False)
        engines.append(engine)
        w = Worker(
            stage, handlers[stage], nats_url=nats_url, session_factory=session_factory(engine),
            concurrency=args.concurrency or 4, batch=args.batch or 32,
        )
        workers.append(w)
        tasks.append(asyncio.create_task(w.run()))
    return engines, workers, tasks


async def stop_workers(args: argparse.Namespace, handle: Any) -> None:
    if args.mode == "procs":
        for p in handle:
            p.terminate()
        for p in handle:
            p.wait(30)
        return
    engines, workers, tasks = handle
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    for e in engines:
        await e.dispose()


async def throughput(js: Any, watch: ReadyWatch, subs: list[ev.BlueprintSubmitted]) -> float:
    start = time.perf_counter()
    futures = [
        await js.publish_async(s.subject, ev.encode(s), headers=msg_headers(s.event_id))
        for s in subs
    ]
    await asyncio.gather(*futures)
    published = time.perf_counter()
    target = {s.correlation_id for s in subs}
    await watch.until_all(target)
    end = max(watch.at[c] for c in target)
    print(f"  published {len(subs)} in {published - start:.2f}s; "
          f"all ready after {end - start:.2f}s")
    return len(subs) / (end - start)


async def latency(
    js: Any, watch: ReadyWatch, subs: list[ev.BlueprintSubmitted], rate: float
) -> tuple[list[float], float]:
    sent: dict[str, float] = {}
    start = time.perf_counter()
    pending = []
    for i, s in enumerate(subs):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[s.correlation_id] = time.perf_counter()
        pending.append(
            await js.publish_async(s.subject, ev.encode(s), headers=msg_headers(s.event_id))
        )
    await asyncio.gather(*pending)
    offered = len(subs) / (time.perf_counter() - start)
    await watch.until_all(set(sent), 60)
    return [(watch.at[c] - t) * 1000 for c, t in sent.items()], offered


def cpu_seconds(pids: list[int], children: bool = True) -> float:
    """User+system CPU of these processes (and their children: postgres
    backends, the workers), for a load-independent cost per event."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [proc, *(proc.children(recursive=True) if children else [])]:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="esper-bench-"))
    nats = NatsServer.start(home / "nats", sync_always=args.sync_always)
    pg = PostgresServer.start(home / "pg")
    handle = None
    try:
        await upgrade(pg.url)
        nc = await connect(nats.url, name="bench")
        js = nc.jetstream()
        await ensure_topology(js, Topology())
        watch = ReadyWatch()
        await nc.subscribe(ev.KERNEL_READY, cb=watch.on_msg)
        total = args.warmup + args.n + int(args.rate * args.seconds)
        t0 = time.perf_counter()
        subs = [make_submission(blueprint(i)) for i in range(total)]
        print(f"built {total} submissions in {time.perf_counter() - t0:.1f}s")
        handle = await start_workers(args, nats.url, pg.url)

        warm, rest = subs[: args.warmup], subs[args.warmup:]
        await throughput(js, watch, warm)
        print(f"throughput: {args.n} blueprints at once")
        pids = [os.getpid(), nats.pid or 0, pg.pid or 0]
        if args.mode == "procs":
            pids += [p.pid for p in handle]
        parts = {"bench": [pids[0]], "nats": [pids[1]], "postgres": [pids[2]]}
        if args.mode == "procs":
            parts.update({s: [p.pid] for s, p in zip(STAGES, handle, strict=True)})
        def part(name: str) -> float:
            return cpu_seconds(parts[name], children=name != "bench")

        before = {k: part(k) for k in parts}
        cpu0, load0 = cpu_seconds(pids), os.getloadavg()[0]
        rate = await throughput(js, watch, rest[: args.n])
        cpu_ms = (cpu_seconds(pids) - cpu0) * 1000 / args.n
        split = {
            k: round((part(k) - before[k]) * 1000 / args.n, 3) for k in parts
        }
        print(f"  CPU-ms per event by process: {split}")
        print(f"  => {rate:.0f} events/s end to end; {cpu_ms:.2f} CPU-ms per event "
              f"(all processes); load before {load0:.1f}")
        await asyncio.sleep(1.0)
        print(f"latency: {args.rate:.0f} blueprints/s for {args.seconds:.0f}s")
        lat, offered = await latency(js, watch, rest[args.n:], args.rate)
        result = {
            "mode": args.mode,
            "nats_sync_always": args.sync_always,
            "events_per_s": round(rate, 1),
            "cpu_ms_per_event": round(cpu_ms, 3),
            "load_avg_before": round(load0, 2),
            "latency_rate_offered": round(offered, 1),
            "latency_ms_p50": round(pct(lat, 0.50), 2),
            "latency_ms_p99": round(pct(lat, 0.99), 2),
            "latency_ms_max": round(max(lat), 2),
            "latency_ms_mean": round(statistics.fmean(lat), 2),
            "n_throughput": args.n,
            "n_latency": len(lat),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
        await nc.close()
        return result
    finally:
        if handle is not None:
            await stop_workers(args, handle)
        nats.stop()
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


def cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="blueprints in the throughput run")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rate", type=float, default=200.0, help="offered blueprints/s for latency")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sync-always", action="store_true", help="nats sync_interval: always")
    p.add_argument("--mode", choices=("procs", "inproc"), default="procs")
    p.add_argument("--batch", type=int, help="messages per transaction (stage default)")
    p.add_argument("--concurrency", type=int, help="transactions at once (stage default)")
    p.add_argument("--json", type=Path, help="append the result here as one JSON line")
    return p.parse_args()


if __name__ == "__main__":
    arguments = cli()
    outcome = asyncio.run(main(arguments))
    if arguments.json:
        with arguments.json.open("a") as f, contextlib.suppress(Exception):
            f.write(json.dumps(outcome) + "\n")
