"""The real compile stage against real NATS + Postgres: equivalent submissions
(repeated, renamed and reordered, optimiser-equivalent, from a second worker
process) compile once and hit; a changed attr or toolchain version misses; two
workers racing on one new key compile it once; a compiler crash or timeout is a
recorded rejection and the worker carries on."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.artifacts.signing import ensure_keypair, load_public_key
from esper.bus import events as ev
from esper.bus.publish import make_submission, publish_event
from esper.bus.topology import ensure_streams
from esper.cache import DiskTier
from esper.compile.pipeline import load_artifact
from esper.errors import ConfigError
from esper.stages.compile import CompileHandler, CompileStageConfig
from esper.stages.compile_subprocess import TEST_FAULTS_ENV
from esper.stages.targets import choose_backend, resolve_targets
from tests.integration.runtime_helpers import (
    FAST,
    js_client,
    mlp_blueprint,
    rows,
    running_worker,
    scalar,
    spawn_worker,
    terminate,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

Raw = dict[str, Any]




@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def make_handler(home: Path, bus: str) -> Callable[..., CompileHandler]:
    key = ensure_keypair(home)

    def make(**kw: Any) -> CompileHandler:
        kw.setdefault("compile_timeout", 60.0)
        return CompileHandler(CompileStageConfig(
            targets=("cpu",), home=home, signing_key=key, nats_url=bus, **kw))

    return make


@contextlib.asynccontextmanager
async def compile_worker(bus: str, database_url: str, handler: CompileHandler,
                         **kw: Any) -> AsyncIterator[None]:
    kw.setdefault("concurrency", 2)
    async with running_worker("compile", bus, database_url, handler, batch=1, **kw):
        yield
    await handler.close()


async def processed(engine: AsyncEngine, events: list[ev.BlueprintSubmitted],
                    timeout: float = 90.0) -> None:
    """Wait until the compile stage has committed every one of ``events``."""
    ids = [str(e.event_id) for e in events]

    async def done() -> bool:
        n = await scalar(engine, "SELECT count(*) FROM inbox WHERE stage = 'compile' "
                         "AND event_id = ANY(CAST(:ids AS uuid[]))", ids=ids)
        return bool(n == len(ids))

    await wait_for(done, timeout, f"{len(ids)} submissions compiled", every=0.1)


async def submit(bus: str, engine: AsyncEngine, *irs: Raw, dtypes: tuple[str, ...] = ("float32",),
                 wait: bool = True) -> list[ev.BlueprintSubmitted]:
    subs = [make_submission(ir, dtypes=dtypes) for ir in irs]
    async with js_client(bus) as js:
        await ensure_streams(js, FAST)
        for s in subs:
            await publish_event(js, s)
    if wait:
        await processed(engine, subs)
    return subs


async def journey(engine: AsyncEngine, sub: ev.BlueprintSubmitted) -> list[Any]:
    """The kernel events this submission caused (with the kernel's cache key)."""
    return await rows(
        engine,
        "SELECT e.event, e.status, e.detail, k.cache_key, k.id AS kernel_id "
        "FROM kernel_events e JOIN kernels k ON k.id = e.kernel_id "
        "WHERE e.correlation_id = :c ORDER BY e.id", c=sub.correlation_id)


async def emitted(engine: AsyncEngine, sub: ev.BlueprintSubmitted) -> list[ev.EsperEvent]:
    found = await rows(engine, "SELECT subject, payload FROM outbox ORDER BY id")
    events = [ev.decode(r.subject, bytes(r.payload)) for r in found]
    return [e for e in events if e.correlation_id == sub.correlation_id]


async def misses(engine: AsyncEngine) -> int:
    return int(await scalar(engine, "SELECT count(*) FROM kernel_events "
                            "WHERE event = 'compiled' AND detail->>'cache' = 'miss'"))


def renamed(raw: Raw, seed: int) -> Raw:
    """The same graph: fresh ids, nodes shuffled, input and symbol renamed,
    commutative operands swapped, another name and metadata."""
    rng = random.Random(seed)
    data = copy.deepcopy(raw)
    ids = {n["id"]: f"v{rng.randrange(10**6)}_{k}" for k, n in enumerate(data["nodes"])}
    ids.update({i["name"]: f"in{k}_{seed}" for k, i in enumerate(data["inputs"])})
    for i in data["inputs"]:
        i["name"] = ids[i["name"]]
        i["shape"] = [f"S{seed}" if d == "B" else d for d in i["shape"]]
    for n in data["nodes"]:
        n["id"] = ids[n["id"]]
        n["inputs"] = [ids[i] for i in n["inputs"]]
        if n["op"] in ("add", "mul"):
            n["inputs"].reverse()
    rng.shuffle(data["nodes"])
    data["outputs"] = [ids[o] for o in data["outputs"]]
    data["name"] = f"{raw['name']}_renamed_{seed}"
    data["metadata"] = {"author": f"someone-{seed}"}
    return data


def with_foldable_chain(raw: Raw) -> Raw:
    """Another canonical hash, the same optimised graph: scale 2 then 0.5 on the
    activation (constant folding removes both)."""
    data = copy.deepcopy(raw)
    data["nodes"] += [
        {"id": "s1", "op": "scale", "inputs": ["a"], "attrs": {"value": 2.0}},
        {"id": "s2", "op": "scale", "inputs": ["s1"], "attrs": {"value": 0.5}},
    ]
    for n in data["nodes"]:
        if n["id"] == "y":
            n["inputs"] = ["s2"]
    return data


# -- cache behaviour ---------------------------------------------------------------------


async def test_equivalent_submissions_compile_once_and_every_later_one_hits(
    bus: str, database_url: str, engine: AsyncEngine,
    make_handler: Callable[..., CompileHandler],
) -> None:
    base = mlp_blueprint(3)
    handler = make_handler()
    home = handler.config.home
    tmp_path = home.parent
    async with compile_worker(bus, database_url, handler):
        (first,) = await submit(bus, engine, base)
        (again,) = await submit(bus, engine, base)
        (twin,) = await submit(bus, engine, renamed(base, 1))
        (folded,) = await submit(bus, engine, with_foldable_chain(base))
    assert twin.blueprint_hash == first.blueprint_hash
    assert folded.blueprint_hash != first.blueprint_hash  # only the optimised IRs agree

    (miss,) = await journey(engine, first)
    assert (miss.event, miss.status, miss.detail["cache"]) == ("compiled", "compiled", "miss")
    assert miss.detail["compile_ms"] > 0 and miss.detail["lookup_us"] >= 0
    # The compile stored the artifact on disk; the first hit loads it into memory.
    for sub, tier in ((again, "disk"), (twin, "memory"), (folded, "memory")):
        (hit,) = await journey(engine, sub)
        assert hit.cache_key == miss.cache_key and hit.kernel_id == miss.kernel_id
        assert hit.detail["cache"] == tier and hit.detail["cache_hit"] is True
        assert isinstance(hit.detail["lookup_us"], float)
        (out,) = await emitted(engine, sub)
        assert isinstance(out, ev.KernelCompiled) and out.cache_hit and out.compile_ms is None
    (out,) = await emitted(engine, first)
    assert isinstance(out, ev.KernelCompiled) and not out.cache_hit and out.compile_ms
    assert out.cache_key == miss.cache_key and out.backend == "torch"

    # The kernel row, its artifact in both lower tiers, the blueprint rows.
    kernel = (await rows(engine, "SELECT * FROM kernels"))[0]
    assert kernel.status == "compiled" and kernel.timings["compile_ms"] > 0
    assert kernel.versions["torch"] and kernel.artifact_digest == out.artifact_digest
    assert await scalar(engine, "SELECT count(*) FROM artifacts") == 1
    assert DiskTier(home / "artifacts").digest_for(kernel.cache_key) == kernel.artifact_digest
    counts = {r.hash: r.submit_count for r in await rows(engine, "SELECT * FROM blueprints")}
    assert counts == {first.blueprint_hash: 3, folded.blueprint_hash: 1}

    # A second worker process, with an empty disk tier of its own: a durable hit.
    other_home = tmp_path / "other-home"
    proc = spawn_worker("compile", bus, database_url, log_path=tmp_path / "second.log", env={
        "ESPER_PASSTHROUGH": "0", "ESPER_HOME": str(other_home), "ESPER_TARGETS": "cpu",
        "ESPER_SIGNING_KEY": str(handler.config.signing_key), "ESPER_LOG_LEVEL": "WARNING",
    })
    try:
        (remote,) = await submit(bus, engine, renamed(base, 2))
    finally:
        assert terminate(proc) == 0, (tmp_path / "second.log").read_text()
    (hit,) = await journey(engine, remote)
    assert (hit.detail["cache"], hit.kernel_id) == ("durable", miss.kernel_id)
    assert await misses(engine) == 1
    assert await scalar(engine, "SELECT count(*) FROM kernels") == 1

    # Any changed attr is another key: one more compile.
    changed = copy.deepcopy(base)
    changed["nodes"][0]["attrs"]["out_features"] += 1
    async with compile_worker(bus, database_url, make_handler()):
        (other,) = await submit(bus, engine, changed)
    (m,) = await journey(engine, other)
    assert m.detail["cache"] == "miss" and m.cache_key != miss.cache_key
    assert await misses(engine) == 2

    # The artifact a hit names is signed, loads, and is this blueprint.
    packed = DiskTier(home / "artifacts").get(kernel.artifact_digest)
    assert packed is not None
    module = load_artifact(packed, load_public_key(handler.config.signing_key))("cpu")
    assert sum(p.numel() for p in module.parameters()) == 64 * 19 + 19 + 19 * 64 + 64


async def test_changed_toolchain_versions_miss(
    bus: str, database_url: str, engine: AsyncEngine,
    make_handler: Callable[..., CompileHandler],
) -> None:
    base = mlp_blueprint(5)
    subs = []
    for versions in ({}, {"torch": "0.0.1+other"}, {"triton": "0.0.2+other"}, {}):
        async with compile_worker(bus, database_url, make_handler(versions=versions)):
            subs += await submit(bus, engine, base)
    keys = [(await journey(engine, s))[0] for s in subs]
    assert [k.detail["cache"] for k in keys] == ["miss", "miss", "miss", "disk"]
    assert len({k.cache_key for k in keys}) == 3 and keys[0].cache_key == keys[3].cache_key
    found = {r.cache_key: r.versions for r in await rows(engine, "SELECT * FROM kernels")}
    assert found[keys[1].cache_key]["torch"] == "0.0.1+other"
    assert found[keys[2].cache_key]["triton"] == "0.0.2+other"


async def test_two_workers_racing_on_one_new_key_compile_it_once(
    bus: str, database_url: str, engine: AsyncEngine,
    make_handler: Callable[..., CompileHandler],
) -> None:
    base = mlp_blueprint(7)
    one, two = make_handler(), make_handler()
    assert one.worker_id != two.worker_id
    # prefetch 1 each: every worker holds one of the two submissions at once.
    async with compile_worker(bus, database_url, one, concurrency=1, prefetch=1), \
            compile_worker(bus, database_url, two, concurrency=1, prefetch=1):
        subs = await submit(bus, engine, base, renamed(base, 3), dtypes=("float32", "float16"))
    events = [e for s in subs for e in await journey(engine, s)]
    assert len(events) == 4  # two submissions x two dtypes
    caches = sorted(e.detail["cache"] for e in events)
    assert caches.count("miss") == 2 and await misses(engine) == 2  # one per dtype key
    assert await scalar(engine, "SELECT count(*) FROM kernels") == 2
    # Each key was compiled once: one artifact per key, both workers agree on it.
    assert await scalar(engine, "SELECT count(*) FROM artifacts") == 2
    by_key: dict[str, set[str]] = {}
    for s in subs:
        for out in await emitted(engine, s):
            assert isinstance(out, ev.KernelCompiled)
            by_key.setdefault(out.cache_key, set()).add(str(out.artifact_digest))
    assert len(by_key) == 2 and all(len(d) == 1 for d in by_key.values())
    assert any("waited_ms" in e.detail for e in events)  # the loser waited for the winner
    assert {r.claimed_by for r in await rows(engine, "SELECT claimed_by FROM kernels")} <= {
        one.worker_id, two.worker_id}


# -- faults ------------------------------------------------------------------------------


async def check_rejected(engine: AsyncEngine, sub: ev.BlueprintSubmitted, expected: str) -> None:
    """A compile failure recorded everywhere: kernel failed, a rejected kernel event,
    KernelRejected on the wire, all naming the cause."""
    (rejected,) = await journey(engine, sub)
    assert (rejected.event, rejected.status) == ("rejected", "failed")
    (reason,) = rejected.detail["reasons"]
    assert reason["check"] == "compile" and reason["message"].startswith(expected)
    (out,) = await emitted(engine, sub)
    assert isinstance(out, ev.KernelRejected) and out.stage == "compile"
    assert out.reasons[0].message.startswith(expected)
    kernel = (await rows(engine, "SELECT status, error FROM kernels WHERE id = :i",
                         i=rejected.kernel_id))[0]
    assert kernel.status == "failed" and kernel.error.startswith(expected)


async def test_compiler_crash_is_a_recorded_rejection_and_the_worker_goes_on(
    bus: str, database_url: str, engine: AsyncEngine,
    make_handler: Callable[..., CompileHandler], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TEST_FAULTS_ENV, "1")
    crash, fine = (dict(mlp_blueprint(i), name=name) for i, name in ((11, "crashme"), (13, "ok")))
    handler = make_handler(options_extra={"_test_fault": {"crashme": "crash"}})
    async with compile_worker(bus, database_url, handler, concurrency=1):
        (crashed,) = await submit(bus, engine, crash)
        (compiled,) = await submit(bus, engine, fine)  # the same worker, next message
        (again,) = await submit(bus, engine, renamed(crash, 4))  # the failure is remembered
    await check_rejected(engine, crashed, "compiler crashed: killed by SIGSEGV")
    (ok,) = await journey(engine, compiled)
    assert ok.detail["cache"] == "miss" and ok.status == "compiled"
    (remembered,) = await journey(engine, again)
    assert remembered.event == "rejected" and remembered.detail["cache"] == "failed"
    # Acked, not retried: nothing dead-lettered, one kernel row each.
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0
    assert await scalar(engine, "SELECT count(*) FROM kernels") == 2


async def test_compiler_timeout_kills_the_compiler_and_is_a_recorded_rejection(
    bus: str, database_url: str, engine: AsyncEngine,
    make_handler: Callable[..., CompileHandler], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TEST_FAULTS_ENV, "1")
    hang = dict(mlp_blueprint(12), name="hangme")
    handler = make_handler(options_extra={"_test_fault": {"hangme": "hang"}},
                           compile_timeout=3.0)
    async with compile_worker(bus, database_url, handler, concurrency=1):
        (hung,) = await submit(bus, engine, hang)
        (again,) = await submit(bus, engine, renamed(hang, 5))  # still consuming
    await check_rejected(engine, hung, "compiler timed out after 3 s")
    (remembered,) = await journey(engine, again)
    assert remembered.event == "rejected" and remembered.detail["cache"] == "failed"
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0
    assert not _compiler_children(), "the hung compiler was not killed"


def _compiler_children() -> list[int]:
    """Live ``compile_subprocess`` children of this process (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if (int(fields[1]) == os.getpid() and fields[0] != "Z"
                and b"esper.stages.compile_subprocess" in cmdline):
            found.append(int(entry))
    return found


async def test_test_faults_are_refused_unless_enabled(
    bus: str, database_url: str, engine: AsyncEngine,
    make_handler: Callable[..., CompileHandler], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TEST_FAULTS_ENV, raising=False)
    handler = make_handler(options_extra={"_test_fault": {"*": "crash"}})
    async with compile_worker(bus, database_url, handler):
        (sub,) = await submit(bus, engine, mlp_blueprint(21))
    (rejected,) = await journey(engine, sub)
    assert "refused" in rejected.detail["reasons"][0]["message"]


async def test_unsupported_dtype_and_invalid_blueprint(
    bus: str, database_url: str, engine: AsyncEngine,
    make_handler: Callable[..., CompileHandler],
) -> None:
    bad = make_submission(mlp_blueprint(22))
    bad = bad.model_copy(update={"blueprint_hash": "0" * 64})
    async with compile_worker(bus, database_url, make_handler()):
        (sub,) = await submit(bus, engine, mlp_blueprint(23), dtypes=("int64",))
        async with js_client(bus) as js:
            await publish_event(js, bad)

        async def dead() -> bool:
            return bool(await scalar(engine, "SELECT count(*) FROM dead_letters") == 1)

        await wait_for(dead, 30, "the forged submission dead-lettered")
    (out,) = await emitted(engine, sub)
    assert isinstance(out, ev.KernelRejected) and "int64" in out.reasons[0].message
    reason = await scalar(engine, "SELECT reason FROM dead_letters")
    assert "hash mismatch" in reason


async def test_targets_and_backend_choice() -> None:
    assert resolve_targets(None, local_gpu=lambda: None) == ("cpu",)
    assert resolve_targets("", local_gpu=lambda: "cuda:sm_90") == ("cpu", "cuda:sm_90")
    assert resolve_targets(" cpu , cuda:sm_80,cpu") == ("cpu", "cuda:sm_80")
    with pytest.raises(ConfigError):
        resolve_targets("cuda:90")
    assert choose_backend("cpu").backend == "torch"
    choice = choose_backend("cuda:sm_90")
    assert choice.backend in ("triton", "torch")
    assert (choice.backend == "torch") == (choice.fallback is not None)
    assert json.dumps(choice.__dict__)  # plain data, recordable
