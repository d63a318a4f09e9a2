"""Throughput and latency of submit → compile → validate → deploy with the
pass-through handlers, on embedded servers started here.

    python benchmarks/bench_pipeline.py                  # default fsync
    python benchmarks/bench_pipeline.py --sync-always    # nats sync_interval: always
    python benchmarks/bench_pipeline.py --mode inproc    # all stages in one process
    python benchmarks/bench_pipeline.py --cluster 3 --processes 1,2,3,4 --repeat 2 --rate 0
                                                         # scale-out: a 3-node cluster, R3
                                                         # streams, 1..4 processes per stage
    python benchmarks/bench_pipeline.py --cluster 3 --processes 1,2,3,4 --compile-hold 20
                                                         # compile waits 20 ms per message

Throughput: N distinct blueprints published at once; events/s = N over the
time from the first publish to the N-th KernelReady. Latency: blueprints
offered at a fixed rate; submit → KernelReady received by a subscriber.
Each point (a number of processes per stage, each repeat) gets a fresh
database and fresh streams; the servers live for the whole run. CPU is that
of every process involved (servers, workers, this one); "cores busy" is CPU
seconds over the throughput run's wall time (2.0 = both cores of this
machine), "others'" the rest of the machine's busy time meanwhile."""

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
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from nats.js.errors import NotFoundError
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esper.bus import events as ev  # noqa: E402
from esper.bus.connect import connect  # noqa: E402
from esper.bus.publish import make_submission, msg_headers, submit_events  # noqa: E402
from esper.bus.topology import STREAMS, Topology, ensure_topology  # noqa: E402
from esper.db.engine import create_engine, session_factory  # noqa: E402
from esper.db.migrate import upgrade  # noqa: E402
from esper.infra import pgadmin  # noqa: E402
from esper.infra.embedded import (  # noqa: E402
    NatsServer,
    PostgresServer,
    cluster_urls,
    start_nats_cluster,
)
from esper.infra.ports import free_port, http_ok  # noqa: E402
from esper.settings import Settings  # noqa: E402
from esper.workers import passthrough  # noqa: E402
from esper.workers.runtime import Handler, HandlerContext, Worker  # noqa: E402

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


def holding_compile(settings: Settings) -> Handler:
    """The pass-through compile holding each message ``ESPER_BENCH_HOLD_MS`` in
    its handler, waiting, not computing: a stand-in for the real compile, which
    waits on its child process (``--compile-hold``)."""
    inner = passthrough.compile_handler()
    hold = float(os.environ.get("ESPER_BENCH_HOLD_MS", "0")) / 1000

    async def handle(event: ev.BlueprintSubmitted, ctx: HandlerContext[Any]) -> None:
        await inner(event, ctx)
        await asyncio.sleep(hold)

    return handle


class ReadyWatch:
    """Records when each journey's KernelReady arrives (a core subscription
    sees every message the stream stores), by perf_counter and wall clock."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._arrived = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        cid = json.loads(msg.data)["correlation_id"]
        if cid not in self.at:
            self.at[cid] = time.perf_counter()
            self.wall[cid] = time.time()
        self._arrived.set()

    async def until_all(self, ids: set[str], timeout: float = 120.0) -> None:
        async with asyncio.timeout(timeout):
            while not ids <= self.at.keys():
                self._arrived.clear()
                await self._arrived.wait()


class WorkerProcs:
    """``processes`` run_stage subprocesses per stage, each with a metrics port
    whose ``/healthz`` says when its consumer is set up."""

    def __init__(self, args: argparse.Namespace, processes: int, nats_url: str, db_url: str,
                 replicas: int) -> None:
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {s: [] for s in STAGES}
        self.ports: list[int] = []
        base = {**os.environ, "ESPER_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO),
                "ESPER_PASSTHROUGH": "1"}
        for stage in STAGES:
            for _ in range(processes):
                cmd = [sys.executable, "-m", "esper.workers.run_stage", stage,
                       "--nats-url", nats_url, "--database-url", db_url,
                       "--replicas", str(replicas)]
                if args.batch:
                    cmd += ["--batch", str(args.batch)]
                if args.concurrency:
                    cmd += ["--concurrency", str(args.concurrency)]
                if stage in args.linger_ms:
                    cmd += ["--linger-ms", str(args.linger_ms[stage])]
                if not args.atomic:
                    cmd += ["--no-atomic-batches"]
                port = free_port()
                self.ports.append(port)
                env = {**base, "ESPER_METRICS_PORT": str(port)}
                if stage == "compile" and args.compile_hold:
                    cmd += ["--handler", "benchmarks.bench_pipeline:holding_compile"]
                    env["ESPER_BENCH_HOLD_MS"] = str(args.compile_hold)
                self.procs[stage].append(subprocess.Popen(cmd, cwd=REPO, env=env))

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while not await asyncio.to_thread(http_ok, f"http://127.0.0.1:{port}/healthz"):
                if time.monotonic() > deadline:
                    raise TimeoutError("worker processes did not come up")
                if any(p.poll() is not None for ps in self.procs.values() for p in ps):
                    raise RuntimeError("a worker process exited")
                await asyncio.sleep(0.1)

    def pids(self, stage: str) -> list[int]:
        return [p.pid for p in self.procs[stage]]

    def counters(self) -> dict[str, tuple[float, float]]:
        """Per stage: (messages processed, transactions committed) so far."""
        out: dict[str, tuple[float, float]] = {}
        stages = [s for s in STAGES for _ in self.procs[s]]
        for stage, port in zip(stages, self.ports, strict=True):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            got = {"esper_worker_processed_total": 0.0, "esper_worker_transactions_total": 0.0}
            for family in text_string_to_metric_families(text.decode()):
                for sample in family.samples:
                    if sample.name in got:
                        got[sample.name] += sample.value
            m, t = out.get(stage, (0.0, 0.0))
            out[stage] = (m + got["esper_worker_processed_total"],
                          t + got["esper_worker_transactions_total"])
        return out

    def stop(self) -> None:
        every = [p for ps in self.procs.values() for p in ps]
        for p in every:
            p.terminate()
        for p in every:
            p.wait(30)


class WorkersInProc:
    """One Worker per stage in this process (``--mode inproc``)."""

    def __init__(self, args: argparse.Namespace, nats_url: str, db_url: str,
                 replicas: int) -> None:
        gc.freeze()  # as run_stage does for a worker process
        gc.set_threshold(20_000, 20, 50)
        handlers = {
            "compile": passthrough.compile_handler(),
            "validate": passthrough.validate_handler(),
            "deploy": passthrough.deploy_handler(),
        }
        self.engines, self.workers, self.tasks = [], [], []
        for stage in STAGES:
            engine = create_engine(db_url, pool_pre_ping=False)
            self.engines.append(engine)
            w = Worker(
                stage, handlers[stage], nats_url=nats_url,
                session_factory=session_factory(engine), topology=Topology(replicas=replicas),
                concurrency=args.concurrency or 4, batch=args.batch or 32,
                atomic_batches=args.atomic,
            )
            self.workers.append(w)
            self.tasks.append(asyncio.create_task(w.run()))

    async def ready(self, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(w.started.wait() for w in self.workers))

    def pids(self, stage: str) -> list[int]:
        return []

    async def astop(self) -> None:
        for w in self.workers:
            w.stop()
        await asyncio.gather(*self.tasks)
        for e in self.engines:
            await e.dispose()


async def throughput(
    js: Any, watch: ReadyWatch, subs: list[ev.BlueprintSubmitted], quiet: bool = False,
    nc: Any = None,
) -> float:
    """Submit ``subs`` at once as ``esper submit`` does (in atomic batches with
    ``nc``) and wait for every KernelReady."""
    start = time.perf_counter()
    await submit_events(js, subs, nc=nc, ack_timeout=60.0)
    published = time.perf_counter()
    target = {s.correlation_id for s in subs}
    await watch.until_all(target)
    end = max(watch.at[c] for c in target)
    if not quiet:
        print(f"  published {len(subs)} in {published - start:.2f}s; "
              f"all ready after {end - start:.2f}s")
    return len(subs) / (end - start)


async def latency(
    js: Any, watch: ReadyWatch, subs: list[ev.BlueprintSubmitted], rate: float,
    sent_wall: dict[str, float] | None = None,
) -> tuple[list[float], float]:
    """Submit ``subs`` at ``rate``; each journey's submit → KernelReady in ms,
    and the rate achieved. ``sent_wall`` gets each submission's wall-clock time
    (for ``segments``)."""
    sent: dict[str, float] = {}
    start = time.perf_counter()
    pending = []
    for i, s in enumerate(subs):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[s.correlation_id] = time.perf_counter()
        if sent_wall is not None:
            sent_wall[s.correlation_id] = time.time()
        pending.append(
            await js.publish_async(s.subject, ev.encode(s), headers=msg_headers(s.event_id))
        )
    await asyncio.gather(*pending)
    offered = len(subs) / (time.perf_counter() - start)
    await watch.until_all(set(sent), 60)
    # In submission order, so that the caller can see when in the run the tail fell.
    return [(watch.at[c] - t) * 1000 for c, t in sent.items()], offered


async def worker_counters(handle: Any) -> dict[str, tuple[float, float]]:
    """The worker processes' counters (empty for in-process workers: no metrics port)."""
    if not isinstance(handle, WorkerProcs):
        return {}
    return await asyncio.to_thread(handle.counters)


def msgs_per_txn(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Per stage: messages processed over transactions committed in between."""
    return {
        s: round((after[s][0] - before[s][0]) / max(1.0, after[s][1] - before[s][1]), 2)
        for s in STAGES
    }


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


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every process, every core)."""
    t = psutil.cpu_times()  # guest time is already inside user time on Linux
    return float(t.user + t.system + sum(getattr(t, k, 0.0) for k in ("nice", "irq", "softirq")))


SEGMENTS = ("submit→compile", "compile→validate", "validate→deploy", "deploy→received")


async def segments(
    db_url: str, sent_wall: dict[str, float], received: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Where each journey's time went: p50/p99 ms between the submit, the start
    of each stage's transaction that handled it (kernel_events.at is the
    transaction's now()) and the KernelReady's arrival here (wall clock, one
    machine)."""
    conn = await asyncpg.connect(pgadmin.asyncpg_dsn(db_url))
    try:
        found = await conn.fetch(
            "SELECT correlation_id, event, extract(epoch FROM at) AS t FROM kernel_events "
            "WHERE correlation_id = ANY($1::varchar[])", list(sent_wall))
    finally:
        await conn.close()
    at: dict[str, dict[str, float]] = {}
    for r in found:
        at.setdefault(r["correlation_id"], {})[r["event"]] = float(r["t"])
    spans: dict[str, list[float]] = {k: [] for k in SEGMENTS}
    for cid, t0 in sent_wall.items():
        t = at.get(cid, {})
        points = [t0, t.get("compiled"), t.get("validated"), t.get("ready"), received.get(cid)]
        if any(p is None for p in points):
            continue
        for name, a, b in zip(SEGMENTS, points, points[1:], strict=False):
            spans[name].append((b - a) * 1000)  # type: ignore[operator]
    return {k: {"p50": round(pct(v, 0.5), 1), "p99": round(pct(v, 0.99), 1)}
            for k, v in spans.items() if v}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fresh_streams(js: Any, topology: Topology) -> None:
    """Delete Esper's streams (and consumers) and create them again; a young
    cluster may still be electing leaders, so keep trying a while."""
    for attempt in range(60):
        try:
            for spec in STREAMS:
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(spec.name)
            await ensure_topology(js, topology, stages=())
            return
        except Exception:
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)


async def run_point(
    args: argparse.Namespace, processes: int, *, nodes: list[NatsServer], pg: PostgresServer,
    template: str, topology: Topology, offset: int,
) -> dict[str, Any]:
    """One measurement: a fresh database and streams, ``processes`` workers per
    stage, warm-up, throughput, and latency if ``args.rate``."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    db_url = await pgadmin.create_database(pg.url, name, template=template)
    urls = cluster_urls(nodes)
    nc = await connect(urls, name="bench")
    js = nc.jetstream()
    handle: WorkerProcs | WorkersInProc | None = None
    try:
        await fresh_streams(js, topology)
        watch = ReadyWatch()
        await nc.subscribe(ev.KERNEL_READY, cb=watch.on_msg)
        await nc.flush()
        n_latency = int(args.rate * args.seconds)
        total = args.warmup + args.n + n_latency
        subs = [make_submission(blueprint(offset + i)) for i in range(total)]
        # This process holds thousands of prepared submissions that no real
        # submitter would: left to the collector, each full collection of them
        # (65 ms on an idle core) stalled the watcher and showed up as
        # pipeline latency. Freeze them, as run_stage freezes a worker's start-up.
        gc.collect()
        gc.freeze()
        if args.mode == "procs":
            handle = WorkerProcs(args, processes, ",".join(urls), db_url, topology.replicas)
        else:
            handle = WorkersInProc(args, ",".join(urls), db_url, topology.replicas)
        await handle.ready()
        batch_nc = nc if args.atomic else None
        warm, rest = subs[: args.warmup], subs[args.warmup:]
        await throughput(js, watch, warm, quiet=True, nc=batch_nc)

        parts = {"bench": [os.getpid()], "nats": [n.pid or 0 for n in nodes],
                 "postgres": [pg.pid or 0], **{s: handle.pids(s) for s in STAGES}}

        def part(key: str) -> float:
            return cpu_seconds(parts[key], children=key != "bench")

        print(f"processes per stage: {processes}; throughput: {args.n} blueprints at once")
        before = {k: part(k) for k in parts}
        tcounts0 = await worker_counters(handle)
        load0, t0, machine0 = os.getloadavg()[0], time.perf_counter(), machine_busy()
        rate = await throughput(js, watch, rest[: args.n], nc=batch_nc)
        wall = time.perf_counter() - t0
        spent = {k: part(k) - before[k] for k in parts}
        load1, machine = os.getloadavg()[0], machine_busy() - machine0
        cpu_total = sum(spent.values())
        result: dict[str, Any] = {
            "mode": args.mode,
            "nats_nodes": len(nodes),
            "replicas": topology.replicas,
            "processes_per_stage": processes,
            "nats_sync_always": args.sync_always,
            "atomic_batches": args.atomic,
            "compile_hold_ms": args.compile_hold,
            "events_per_s": round(rate, 1),
            "cpu_ms_per_event": round(cpu_total * 1000 / args.n, 3),
            "cpu_ms_per_event_by_part": {
                k: round(v * 1000 / args.n, 3) for k, v in spent.items()
            },
            "cores_busy": round(cpu_total / wall, 2),
            # Everything else on the machine (other users) during the same run.
            "others_cores_busy": round(max(0.0, machine - cpu_total) / wall, 2),
            "load_avg_before": round(load0, 2),
            "load_avg_after": round(load1, 2),
            "n_throughput": args.n,
            "cpus": os.cpu_count(),
        }
        if tcounts0:
            result["msgs_per_txn"] = msgs_per_txn(tcounts0, await worker_counters(handle))
        print(f"  => {rate:.0f} events/s end to end; {result['cpu_ms_per_event']:.2f} CPU-ms "
              f"per event {result['cpu_ms_per_event_by_part']}; cores busy: "
              f"{result['cores_busy']} ours, {result['others_cores_busy']} others'; "
              f"load {load0:.1f} -> {load1:.1f}; messages per transaction: "
              f"{result.get('msgs_per_txn')}")
        if n_latency:
            gc.collect()  # the throughput run's garbage, not in the latency run
            gc.freeze()
            await asyncio.sleep(1.0)
            print(f"latency: {args.rate:.0f} blueprints/s for {args.seconds:.0f}s")
            before = {k: part(k) for k in parts}
            counts0 = await worker_counters(handle)
            machine0, t0 = machine_busy(), time.perf_counter()
            sent_wall: dict[str, float] = {}
            lat, offered = await latency(js, watch, rest[args.n:], args.rate, sent_wall)
            wall = time.perf_counter() - t0
            spent = {k: part(k) - before[k] for k in parts}
            machine = machine_busy() - machine0
            cpu_total = sum(spent.values())
            result |= {
                # CPU at the offered rate: little batching, so more per event.
                "latency_cpu_ms_per_event": round(cpu_total * 1000 / n_latency, 3),
                "latency_cpu_ms_per_event_by_part": {
                    k: round(v * 1000 / n_latency, 3) for k, v in spent.items()
                },
                "latency_cores_busy": round(cpu_total / wall, 2),
                "latency_others_cores_busy": round(max(0.0, machine - cpu_total) / wall, 2),
                "latency_rate_offered": round(offered, 1),
                "latency_ms_p50": round(pct(lat, 0.50), 2),
                "latency_ms_p90": round(pct(lat, 0.90), 2),
                "latency_ms_p95": round(pct(lat, 0.95), 2),
                "latency_ms_p99": round(pct(lat, 0.99), 2),
                "latency_ms_max": round(max(lat), 2),
                "latency_ms_mean": round(statistics.fmean(lat), 2),
                "n_latency": len(lat),
            }
            if counts0:
                result["latency_msgs_per_txn"] = msgs_per_txn(
                    counts0, await worker_counters(handle))
            print(f"  => p50 {result['latency_ms_p50']:.1f} / p90 {result['latency_ms_p90']:.1f} / "
                  f"p95 {result['latency_ms_p95']:.1f} / p99 {result['latency_ms_p99']:.1f} / "
                  f"max {result['latency_ms_max']:.1f} ms at {offered:.0f}/s; "
                  f"{result['latency_cpu_ms_per_event']:.2f} CPU-ms per event "
                  f"{result['latency_cpu_ms_per_event_by_part']}; cores busy: "
                  f"{result['latency_cores_busy']} ours, "
                  f"{result['latency_others_cores_busy']} others'; messages per transaction: "
                  f"{result.get('latency_msgs_per_txn')}")
            per_s = max(1, round(offered))
            result["latency_max_ms_by_second"] = [
                round(max(lat[i:i + per_s]), 1) for i in range(0, len(lat), per_s)
            ]
            print("  => worst journey of each second of the run (ms): "
                  + " ".join(f"{v:.0f}" for v in result["latency_max_ms_by_second"]))
            result["latency_segments_ms"] = await segments(db_url, sent_wall, watch.wall)
            print("  => by segment (p50 / p99 ms): " + "; ".join(
                f"{k} {v['p50']} / {v['p99']}" for k, v in result["latency_segments_ms"].items()))
        return result
    finally:
        if isinstance(handle, WorkerProcs):
            handle.stop()
        elif handle is not None:
            await handle.astop()
        await nc.close()
        await pgadmin.drop_database(pg.url, name)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    home = Path(tempfile.mkdtemp(prefix="esper-bench-"))
    if args.cluster:
        nodes = start_nats_cluster(home / "nats", args.cluster, sync_always=args.sync_always)
    else:
        nodes = [NatsServer.start(home / "nats", sync_always=args.sync_always)]
    pg = PostgresServer.start(home / "pg")
    template = "bench_template"
    results: list[dict[str, Any]] = []
    try:
        await upgrade(await pgadmin.create_database(pg.url, template))
        await pgadmin.seal_template(pg.url, template)
        topology = Topology(replicas=min(3, len(nodes)))
        per_point = args.warmup + args.n + int(args.rate * args.seconds)
        # Repeats outermost: the points of a curve share whatever the load is.
        for _ in range(args.repeat):
            for processes in args.processes:
                results.append(await run_point(
                    args, processes, nodes=nodes, pg=pg, template=template,
                    topology=topology, offset=len(results) * per_point,
                ))
                print(json.dumps(results[-1]))
        print("\n| processes/stage | events/s | CPU-ms/event | cores busy: ours / others' "
              "| load before/after |")
        print("| ---: | ---: | ---: | ---: | --- |")
        for r in sorted(results, key=lambda r: r["processes_per_stage"]):
            print(f"| {r['processes_per_stage']} | {r['events_per_s']:.0f} | "
                  f"{r['cpu_ms_per_event']:.2f} | {r['cores_busy']:.2f} / "
                  f"{r['others_cores_busy']:.2f} | "
                  f"{r['load_avg_before']:.1f}/{r['load_avg_after']:.1f} |")
        return results
    finally:
        for node in nodes:
            node.stop()
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


def linger_ms(text: str) -> dict[str, float]:
    """``6`` (every stage) or ``compile=12,validate=0`` (those stages)."""
    if "=" not in text:
        return dict.fromkeys(STAGES, float(text))
    out: dict[str, float] = {}
    for part in text.split(","):
        stage, _, ms = part.partition("=")
        if stage not in STAGES:
            raise argparse.ArgumentTypeError(f"unknown stage {stage!r} (one of {STAGES})")
        out[stage] = float(ms)
    return out


def cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="blueprints in the throughput run")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rate", type=float, default=200.0,
                   help="offered blueprints/s for latency (0: no latency run)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sync-always", action="store_true", help="nats sync_interval: always")
    p.add_argument("--mode", choices=("procs", "inproc"), default="procs")
    p.add_argument("--cluster", type=int, default=0,
                   help="nodes of a loopback JetStream cluster (streams R3); 0: one server")
    p.add_argument("--processes", default="1",
                   help="worker processes per stage, a comma list of points (procs mode)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each point")
    p.add_argument("--compile-hold", type=float, default=0.0, metavar="MS",
                   help="compile handlers wait MS per message (a compile waiting on its child)")
    p.add_argument("--batch", type=int, help="messages per transaction (stage default)")
    p.add_argument("--concurrency", type=int, help="transactions at once (stage default)")
    p.add_argument("--linger-ms", type=linger_ms, default={},
                   help="workers wait this long for more messages per transaction: MS for "
                        "every stage, or STAGE=MS,... (default: the runtime's)")
    p.add_argument("--atomic-batches", choices=("auto", "on", "off"), default="auto",
                   help="submit and relay runs of 8+ events as atomic batches; auto: with "
                        "--sync-always only (a batch costs ~3 fsyncs, single messages none "
                        "without it)")
    p.add_argument("--json", type=Path, help="append each result here as one JSON line")
    args = p.parse_args()
    args.processes = [int(x) for x in args.processes.split(",")]
    args.atomic = args.atomic_batches == "on" or (
        args.atomic_batches == "auto" and args.sync_always
    )
    if args.mode == "inproc" and (args.processes != [1] or args.compile_hold):
        p.error("--mode inproc runs one pass-through worker per stage: --processes 1, no hold")
    return args


if __name__ == "__main__":
    arguments = cli()
    outcome = asyncio.run(main(arguments))
    if arguments.json:
        with arguments.json.open("a") as f:
            for line in outcome:
                f.write(json.dumps(line) + "\n")
