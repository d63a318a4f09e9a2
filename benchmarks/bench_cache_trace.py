"""Cache hit ratio of the real compile stage on a published trace.

    python benchmarks/bench_cache_trace.py                  # 10,000 from 200, 3 lifetimes
    python benchmarks/bench_cache_trace.py --submissions 500 --blueprints 20

The trace: ``--blueprints`` distinct random valid blueprints (seeded; ops,
widths and attrs vary; distinct after optimisation), ``--submissions`` draws
from them by Zipf(``--zipf``) rank, each submitted as a fresh variant — node ids,
node order, input names and the batch symbol renamed, commutative operands
swapped, name and metadata changed, and for ~20% a foldable identity node
inserted. ``--workers`` compile worker processes serve it and are SIGKILLed and
restarted ``--restarts`` times mid-trace.

Measured: hits vs theoretically hittable (the first sight of each key is a
necessary miss), compiles, false hits — every hit's key must be its own
blueprint's key, and a sample of hits is checked numerically (the hit kernel's
artifact loaded and run against a float64 evaluation of the *submitted*
blueprint with the artifact's parameters mapped by node) — and throughput."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from esper.bus import events as ev  # noqa: E402
from esper.bus.connect import connect  # noqa: E402
from esper.bus.publish import make_submission, msg_headers  # noqa: E402
from esper.bus.topology import Topology, ensure_streams  # noqa: E402

UNARY = ("relu", "gelu", "tanh", "sigmoid", "silu", "identity", "scale", "layer_norm",
         "rms_norm", "softmax", "dropout", "linear", "linear", "linear")
BINARY = ("add", "mul", "sub")
WIDTHS = (8, 12, 16, 24, 32)


# -- the trace -------------------------------------------------------------------------


def _attrs(op: str, width: int, rng: random.Random) -> tuple[dict[str, Any], int]:
    """Attrs for a unary op on a [B, width] tensor, and the result's width."""
    if op == "linear":
        out = rng.choice(WIDTHS)
        attrs: dict[str, Any] = {"out_features": out}
        if rng.random() < 0.3:
            attrs["bias"] = False
        if rng.random() < 0.3:
            attrs["init"] = rng.choice(("normal", "zeros"))
        return attrs, out
    if op == "scale":
        return {"value": rng.choice((0.5, 2.0, -1.0, 3.0, 0.25))}, width
    if op in ("layer_norm", "rms_norm"):
        attrs = {"normalized_shape": [width]}
        if rng.random() < 0.3:
            attrs["eps"] = rng.choice((1e-6, 1e-3))
        return attrs, width
    if op == "softmax":
        return {"dim": -1}, width
    if op == "gelu" and rng.random() < 0.4:
        return {"approximate": "tanh"}, width
    if op == "dropout":
        return {"p": rng.choice((0.1, 0.25))}, width
    return {}, width


def random_blueprint(rng: random.Random, index: int) -> dict[str, Any]:
    """A valid random DAG on [B, w] tensors: every node reached, sinks are outputs."""
    width = rng.choice(WIDTHS)
    n_inputs = rng.choice((1, 1, 1, 2))
    tensors = [(f"x{k}", width) for k in range(n_inputs)]
    nodes: list[dict[str, Any]] = []
    for k in range(rng.randint(2, 9)):
        op = rng.choice(UNARY + BINARY)
        recent = tensors[-3:] if rng.random() < 0.7 else tensors
        a_name, a_width = rng.choice(recent)
        if op in BINARY:
            same = [t for t in tensors if t[1] == a_width]
            b_name = rng.choice(same)[0]
            node = {"id": f"n{k}", "op": op, "inputs": [a_name, b_name]}
            out_width = a_width
        else:
            attrs, out_width = _attrs(op, a_width, rng)
            node = {"id": f"n{k}", "op": op, "inputs": [a_name]}
            if attrs:
                node["attrs"] = attrs
        nodes.append(node)
        tensors.append((f"n{k}", out_width))
    read = {i for n in nodes for i in n["inputs"]}
    outputs = [name for name, _ in tensors if name not in read]
    return {
        "schema_version": 1,
        "name": f"trace_{index}",
        "inputs": [{"name": f"x{k}", "shape": ["B", width], "dtype": "float32"}
                   for k in range(n_inputs)],
        "nodes": nodes,
        "outputs": outputs,
    }


def variant(raw: dict[str, Any], rng: random.Random, tag: str) -> dict[str, Any]:
    """The same function, spelt differently: ids, order, names, symbol, operand order,
    and sometimes a foldable identity node on one edge."""
    data = copy.deepcopy(raw)
    if rng.random() < 0.2:
        consumer = rng.choice(data["nodes"])
        port = rng.randrange(len(consumer["inputs"]))
        data["nodes"].append({"id": "ident", "op": "identity",
                              "inputs": [consumer["inputs"][port]]})
        consumer["inputs"][port] = "ident"
    names = {n["id"]: f"{tag}_{rng.randrange(10**9):x}_{k}" for k, n in enumerate(data["nodes"])}
    names.update({i["name"]: f"in_{rng.randrange(10**6)}_{k}"
                  for k, i in enumerate(data["inputs"])})
    symbol = rng.choice(("B", "N", "batch", "rows", f"S{rng.randrange(100)}"))
    for i in data["inputs"]:
        i["name"] = names[i["name"]]
        i["shape"] = [symbol if d == "B" else d for d in i["shape"]]
    for n in data["nodes"]:
        n["id"] = names[n["id"]]
        n["inputs"] = [names[i] for i in n["inputs"]]
        if n["op"] in ("add", "mul") and rng.random() < 0.5:
            n["inputs"].reverse()
    rng.shuffle(data["nodes"])
    data["outputs"] = [names[o] for o in data["outputs"]]
    data["name"] = f"bp_{rng.randrange(10**6)}"
    data["metadata"] = {"author": f"user{rng.randrange(50)}", "tags": [tag]}
    return data


def expected_key(raw: dict[str, Any]) -> str:
    """The compile stage's key for ``raw`` on cpu/float32 with this toolchain."""
    from esper.compile.backend import CompileOptions
    from esper.compile.passes import optimize
    from esper.compile.pipeline import compute_cache_key
    from esper.ir import BlueprintIR

    return compute_cache_key(optimize(BlueprintIR.from_dict(raw)), target="cpu",
                             dtype="float32", backend="torch",
                             options=CompileOptions(dtype="float32"))


@dataclass(frozen=True)
class Trace:
    blueprints: list[dict[str, Any]]
    keys: list[str]
    draws: list[int]  # blueprint index per submission
    submissions: list[ev.BlueprintSubmitted]


def make_trace(n_blueprints: int, n_submissions: int, zipf: float, seed: int) -> Trace:
    rng = random.Random(seed)
    blueprints: list[dict[str, Any]] = []
    keys: list[str] = []
    while len(blueprints) < n_blueprints:
        raw = random_blueprint(rng, len(blueprints))
        key = expected_key(raw)
        if key not in keys:
            blueprints.append(raw)
            keys.append(key)
    weights = [1.0 / (rank + 1) ** zipf for rank in range(n_blueprints)]
    draws = rng.choices(range(n_blueprints), weights=weights, k=n_submissions)
    subs = [make_submission(variant(blueprints[b], rng, f"s{i}"), correlation_id=f"trace-{i:06d}")
            for i, b in enumerate(draws)]
    return Trace(blueprints, keys, draws, subs)


# -- running it ------------------------------------------------------------------------


@dataclass
class TraceReport:
    submissions: int
    distinct_blueprints: int
    distinct_keys: int
    distinct_canonical_hashes: int
    hittable: int
    hits: int
    misses: int
    rejected: int
    hits_by_tier: dict[str, int]
    hit_ratio: float
    hit_ratio_of_hittable: float
    wrong_key_hits: int
    sampled: int
    false_hits: int
    artifacts_stored: int
    recovered_after_kill: int
    waited_for_other_worker: int
    restarts: int
    workers: int
    wall_s: float
    submissions_per_s: float
    hit_only_per_s: float | None
    compile_ms_p50: float | None
    lookup_us: dict[str, dict[str, float]] = field(default_factory=dict)


def _spawn(nats_url: str, database_url: str, home: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ESPER_HOME": str(home),
           "ESPER_TARGETS": "cpu", "ESPER_PASSTHROUGH": "0", "ESPER_LOG_LEVEL": "WARNING"}
    env.pop("ESPER_SIGNING_KEY", None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "esper.workers.run_stage", "compile", "--nats-url", nats_url,
             "--database-url", database_url, "--ack-wait", "5"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


async def _count(engine: Any, sql: str, **params: Any) -> Any:
    from sqlalchemy import text

    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def _publish(nats_url: str, subs: list[ev.BlueprintSubmitted]) -> None:
    nc = await connect(nats_url, name="bench-cache-trace")
    try:
        js = nc.jetstream()
        await ensure_streams(js, Topology(), update=False)
        for start in range(0, len(subs), 500):
            futures = [await js.publish_async(s.subject, ev.encode(s),
                                              headers=msg_headers(s.event_id))
                       for s in subs[start:start + 500]]
            await asyncio.gather(*futures)
    finally:
        await nc.drain()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_trace(trace: Trace, nats_url: str, database_url: str, home: Path, *,
                    workers: int = 2, restarts: int = 2, sample: int = 200,
                    timeout: float = 3600.0,
                    log: Callable[[str], None] = print) -> TraceReport:
    """Serve ``trace`` with real compile worker processes, killing and restarting
    them ``restarts`` times at even fractions of the trace; analyse the outcome."""
    from esper.artifacts.signing import ensure_keypair
    from esper.db.engine import create_engine

    logs = home / "logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(ensure_keypair, home)  # one key for every worker lifetime
    n = len(trace.submissions)
    engine = create_engine(database_url)
    procs: list[subprocess.Popen[bytes]] = []

    def start(round_: int) -> None:
        procs.extend(_spawn(nats_url, database_url, home, logs / f"w{round_}-{k}.log")
                     for k in range(workers))

    try:
        start(0)
        t0 = time.perf_counter()
        await _publish(nats_url, trace.submissions)
        log(f"published {n} submissions in {time.perf_counter() - t0:.1f}s")
        marks = [n * (k + 1) // (restarts + 1) for k in range(restarts)]
        deadline = time.monotonic() + timeout
        done = 0
        while done < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {done}/{n} processed after {timeout}s")
            await asyncio.sleep(0.25)
            done = await _count(engine, "SELECT count(*) FROM inbox WHERE stage = 'compile'")
            if marks and done >= marks[0]:
                marks.pop(0)
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                for p in procs:
                    p.wait()
                procs.clear()
                log(f"killed the workers at {done}/{n} processed "
                    f"({time.perf_counter() - t0:.1f}s); restarting")
                start(restarts - len(marks))
        wall = time.perf_counter() - t0
        log(f"all {n} processed in {wall:.1f}s")
        report = await _analyse(trace, engine, home, wall=wall, sample=sample,
                                restarts=restarts, workers=workers)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        await engine.dispose()
    return report


async def _analyse(trace: Trace, engine: Any, home: Path, *, wall: float, sample: int,
                   restarts: int, workers: int) -> TraceReport:
    from sqlalchemy import text

    async with engine.connect() as conn:
        found = (await conn.execute(text(
            "SELECT e.correlation_id, e.event, e.detail, e.at, k.cache_key "
            "FROM kernel_events e JOIN kernels k ON k.id = e.kernel_id ORDER BY e.id"))).all()
    by_corr = {s.correlation_id: i for i, s in enumerate(trace.submissions)}
    n = len(trace.submissions)
    assert len(found) == n, f"{len(found)} kernel events for {n} submissions"
    hits, misses, rejected, wrong, recovered, waited = [], 0, 0, 0, 0, 0
    tiers: dict[str, int] = {}
    lookups: dict[str, list[float]] = {}
    compile_ms: list[float] = []
    last_miss_at = None
    for row in found:
        i = by_corr[row.correlation_id]
        if row.cache_key != trace.keys[trace.draws[i]]:
            wrong += 1
        if row.event != "compiled":
            rejected += 1
            continue
        cache = row.detail["cache"]
        lookups.setdefault(cache, []).append(float(row.detail["lookup_us"]))
        recovered += "recovered_from" in row.detail
        waited += "waited_ms" in row.detail
        if cache == "miss":
            misses += 1
            last_miss_at = row.at
            if row.detail.get("compile_ms") is not None:
                compile_ms.append(float(row.detail["compile_ms"]))
        else:
            hits.append(i)
            tiers[cache] = tiers.get(cache, 0) + 1
    hit_rows = [r for r in found if r.event == "compiled" and r.detail["cache"] != "miss"
                and last_miss_at is not None and r.at > last_miss_at]
    hit_only = None
    if len(hit_rows) > 100:
        span = (hit_rows[-1].at - hit_rows[0].at).total_seconds()
        hit_only = len(hit_rows) / span if span > 0 else None
    distinct = len({trace.keys[b] for b in trace.draws})
    hittable = n - distinct
    rng = random.Random(1)
    checked = rng.sample(hits, min(sample, len(hits)))
    false_hits = _check_numerically(trace, checked, home)
    artifacts = await _count(engine, "SELECT count(*) FROM artifacts")
    return TraceReport(
        submissions=n, distinct_blueprints=len(trace.blueprints), distinct_keys=distinct,
        distinct_canonical_hashes=len({s.blueprint_hash for s in trace.submissions}),
        hittable=hittable, hits=len(hits), misses=misses, rejected=rejected,
        hits_by_tier=tiers, hit_ratio=len(hits) / n,
        hit_ratio_of_hittable=len(hits) / hittable if hittable else 1.0,
        wrong_key_hits=wrong, sampled=len(checked), false_hits=false_hits,
        artifacts_stored=artifacts, recovered_after_kill=recovered,
        waited_for_other_worker=waited, restarts=restarts, workers=workers,
        wall_s=round(wall, 2), submissions_per_s=round(n / wall, 1),
        hit_only_per_s=None if hit_only is None else round(hit_only, 1),
        compile_ms_p50=round(_pct(compile_ms, 0.5), 1) if compile_ms else None,
        lookup_us={k: {"count": len(v), "p50": round(_pct(v, 0.5), 1),
                       "p99": round(_pct(v, 0.99), 1)} for k, v in sorted(lookups.items())},
    )


def _check_numerically(trace: Trace, indices: list[int], home: Path) -> int:
    """Run each sampled hit's artifact against a float64 evaluation of the submitted
    blueprint with the artifact's own parameters; count disagreements."""
    import torch

    from esper.artifacts.signing import default_private_key_path, load_public_key
    from esper.cache import DiskTier
    from esper.compile.evaluate import evaluate
    from esper.compile.ids import params_for
    from esper.compile.pipeline import load_artifact
    from esper.errors import CompileError
    from esper.ir import BlueprintIR

    public = load_public_key(default_private_key_path(home))
    disk = DiskTier(home / "artifacts")
    false_hits = 0
    for n, i in enumerate(indices):
        sub = trace.submissions[i]
        packed = disk.get_by_key(trace.keys[trace.draws[i]])
        if packed is None:
            raise RuntimeError(f"no artifact on disk for submission {sub.correlation_id}")
        module = load_artifact(packed, public)("cpu").eval()
        submitted = BlueprintIR.from_dict(sub.ir)
        g = torch.Generator().manual_seed(n)
        with torch.no_grad():
            for p in module.parameters():  # break zero inits: every weight must matter
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            xs = [torch.randn([3 if isinstance(d, str) else d for d in inp.shape], generator=g)
                  for inp in submitted.inputs]
            try:
                got = module(*xs)
                got = got if isinstance(got, tuple) else (got,)
                want = evaluate(submitted, xs, params_for(submitted, module))
            except CompileError:
                false_hits += 1  # the artifact is not this graph at all
                continue
        if len(got) != len(want) or not all(
            torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4)
            for a, b in zip(got, want, strict=True)
        ):
            false_hits += 1
    return false_hits


# -- the script ------------------------------------------------------------------------


def results_section(report: TraceReport, args: argparse.Namespace, commit: str) -> str:
    r = report
    tiers = ", ".join(f"{k} {v}" for k, v in sorted(r.hits_by_tier.items()))
    lookups = "; ".join(f"{k} p50 {v['p50']:.0f} µs / p99 {v['p99']:.0f} µs"
                        for k, v in r.lookup_us.items())
    rows = [
        (f"submissions (Zipf s={args.zipf} over {r.distinct_blueprints} random blueprints, "
         "each a renamed/reordered variant)", f"{r.submissions}"),
        ("distinct keys seen (first sight = necessary miss) / distinct canonical hashes",
         f"{r.distinct_keys} / {r.distinct_canonical_hashes}"),
        ("hits / theoretically hittable",
         f"{r.hits} / {r.hittable} = **{100 * r.hit_ratio_of_hittable:.2f}%**"),
        ("hit ratio overall", f"**{100 * r.hit_ratio:.2f}%**"),
        ("misses (compiles recorded) / artifacts stored / rejections",
         f"{r.misses} / {r.artifacts_stored} / {r.rejected}"),
        ("hits by tier", tiers),
        (f"hits on another blueprint's key / numeric false hits in a sample of {r.sampled}",
         f"{r.wrong_key_hits} / **{r.false_hits}**"),
        ("recovered after a kill without recompiling / waited for another worker",
         f"{r.recovered_after_kill} / {r.waited_for_other_worker}"),
        ("throughput, whole trace incl. compiles and restarts",
         f"{r.submissions_per_s} submissions/s ({r.wall_s} s)"),
        ("throughput after the last miss (hits only)", f"{r.hit_only_per_s} submissions/s"),
        ("compile (child process, spawn to result) p50", f"{r.compile_ms_p50} ms"),
        ("lookup latency recorded per answer", lookups),
    ]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    date = time.strftime("%Y-%m-%d")
    return f"""
## Cache hit ratio (trace)

`python benchmarks/bench_cache_trace.py --submissions {r.submissions} --blueprints \
{r.distinct_blueprints} --zipf {args.zipf} --workers {r.workers} --restarts {r.restarts} \
--seed {args.seed}` — device "2-core x86-64 CPU" (shared with other work), {date}, \
commit `{commit}`; embedded NATS + PostgreSQL, real compile stage (torch backend, cpu target,
one child process per compile), {r.workers} compile worker processes SIGKILLed and restarted
{r.restarts} times mid-trace ({r.restarts + 1} lifetimes).

| figure | value |
| --- | --- |
{table}
"""


def cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--submissions", type=int, default=10_000)
    p.add_argument("--blueprints", type=int, default=200)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent over ranks")
    p.add_argument("--workers", type=int, default=2, help="compile worker processes")
    p.add_argument("--restarts", type=int, default=2, help="kill + restart rounds mid-trace")
    p.add_argument("--sample", type=int, default=300, help="hits checked numerically")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--results", action="store_true", help="print a RESULTS.md section")
    return p.parse_args()


async def main(args: argparse.Namespace) -> TraceReport:
    from esper.db.migrate import upgrade
    from esper.infra.embedded import NatsServer, PostgresServer

    t0 = time.perf_counter()
    trace = make_trace(args.blueprints, args.submissions, args.zipf, args.seed)
    print(f"built the trace in {time.perf_counter() - t0:.1f}s")
    root = Path(tempfile.mkdtemp(prefix="esper-trace-"))
    nats = NatsServer.start(root / "nats")
    pg = PostgresServer.start(root / "pg")
    try:
        await upgrade(pg.url)
        report = await run_trace(trace, nats.url, pg.url, root / "home", workers=args.workers,
                                 restarts=args.restarts, sample=args.sample)
    finally:
        nats.stop()
        pg.stop()
    shutil.rmtree(root, ignore_errors=True)  # kept, with the workers' logs, on a failure
    return report


if __name__ == "__main__":
    arguments = cli()
    outcome = asyncio.run(main(arguments))
    print(json.dumps(asdict(outcome), indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(asdict(outcome), indent=2))
    if arguments.results:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=False,
                              capture_output=True, text=True).stdout.strip()
        print(results_section(outcome, arguments, head))
