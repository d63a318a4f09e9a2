"""The real validate stage against real NATS + Postgres. One worker takes a
parade of deliberately broken kernels — each compiled through the real artifact
path by a ``faulty-<kind>`` backend, plus a tampered artifact — and rejects each
for the right reason (check name, figure, bound on the wire and in SQL), surviving
a segfault, an abort and an infinite loop; then it validates a good kernel
fetched from the durable store. A second submission of a decided kernel is
answered from the stored verdict, not validated again."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from esper.artifacts.signing import load_private_key, save_keypair
from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.publish import publish_event
from esper.cache import DiskTier, DurableTier
from esper.compile.pipeline import CompileResult, compile_blueprint
from esper.ir import BlueprintIR
from esper.stages.validate import ValidateHandler, ValidateStageConfig
from esper.validate.policy import ValidationPolicy
from tests.fixtures.faulty_backend import KINDS
from tests.integration.runtime_helpers import (
    js_client,
    mlp_blueprint,
    rows,
    running_worker,
    scalar,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 20.0  # generous: a loaded 2-core machine must not time out a good kernel




class Kernels:
    """Compiles blueprints into signed artifacts, stores their bytes in a cache tier
    and records kernel rows as the compile stage would; makes the events."""

    def __init__(self, home: Path, engine: AsyncEngine, durable: DurableTier) -> None:
        self.private_path, self.public_path = save_keypair(home / "keys" / "signing.pem")
        self.key = load_private_key(self.private_path)
        self.disk = DiskTier(home / "artifacts")
        self.engine = engine
        self.durable = durable
        self.events: dict[uuid.UUID, ev.KernelCompiled] = {}

    async def add(self, bp: dict[str, Any], backend: str = "torch", *, tamper: bool = False,
                  durable_only: bool = False) -> uuid.UUID:
        ir = BlueprintIR.from_dict(bp)
        res: CompileResult = compile_blueprint(ir, target="cpu", backend=backend,
                                               private_key=self.key)
        packed = res.packed
        if tamper:  # one byte of the IR file flipped after signing
            at = packed.index(b'"nodes"') + 3
            packed = packed[:at] + bytes([packed[at] ^ 0x20]) + packed[at + 1:]
        if durable_only:
            digest = await self.durable.put(res.cache_key, packed)
        else:
            digest = self.disk.put_object(packed)
        kernel_id = uuid.uuid4()
        async with self.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO blueprints (hash, name, ir) VALUES (:h, :n, CAST(:ir AS jsonb)) "
                "ON CONFLICT DO NOTHING"), {"h": ir.canonical_hash(), "n": ir.name,
                                            "ir": ir.to_json()})
            await conn.execute(text(
                "INSERT INTO kernels (id, blueprint_hash, cache_key, target, dtype, backend, "
                "status, artifact_digest) VALUES (:id, :h, :k, 'cpu', 'float32', :b, "
                "'compiled', :d)"), {"id": kernel_id, "h": ir.canonical_hash(),
                                     "k": res.cache_key, "b": backend, "d": digest})
        self.events[kernel_id] = self.event(kernel_id, res, ir, digest)
        return kernel_id

    @staticmethod
    def event(kernel_id: uuid.UUID, res: CompileResult, ir: BlueprintIR,
              digest: str | None) -> ev.KernelCompiled:
        return ev.KernelCompiled(
            correlation_id=uuid.uuid4().hex, kernel_id=kernel_id, cache_key=res.cache_key,
            blueprint_hash=ir.canonical_hash(), target="cpu", dtype="float32",
            backend=res.manifest.backend, artifact_digest=digest)

    def again(self, kernel_id: uuid.UUID) -> ev.KernelCompiled:
        """The same kernel compiled for another submission (a cache hit)."""
        first = self.events[kernel_id]
        return first.model_copy(update={"event_id": uuid.uuid4(), "cache_hit": True,
                                        "correlation_id": uuid.uuid4().hex})


async def bus_events(js: Any) -> list[ev.EsperEvent]:
    info = await js.stream_info("ESPER_KERNELS")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("ESPER_KERNELS", seq)
        if msg.subject in (ev.KERNEL_VALIDATED, ev.KERNEL_REJECTED):
            out.append(ev.decode(msg.subject, msg.data or b""))
    return out


async def test_broken_kernels_are_rejected_for_the_right_reason_and_the_worker_goes_on(
        bus: str, database_url: str, engine: AsyncEngine, tmp_path: Path) -> None:
    home = tmp_path / "home"
    nc = await connect(bus, name="esper-test-durable")
    durable = DurableTier(async_sessionmaker(engine, expire_on_commit=False), nc)
    kernels = Kernels(home, engine, durable)
    bp = mlp_blueprint(1)
    expected: dict[uuid.UUID, str] = {}
    for kind, check in KINDS.items():
        expected[await kernels.add(bp, f"faulty-{kind}")] = check
    expected[await kernels.add(mlp_blueprint(2), tamper=True)] = "integrity"
    good = await kernels.add(bp, durable_only=True)  # validated last: the worker survived

    config = ValidateStageConfig(
        home=home, public_key=kernels.public_path, nats_url=bus, sandbox_cwd=REPO, spares=2,
        policy=ValidationPolicy(backend_modules=("tests.fixtures.faulty_backend",),
                                timeout_s=TIMEOUT_S))
    handler = ValidateHandler(config)
    try:
        async with running_worker("validate", bus, database_url, handler,
                                  concurrency=1, batch=1), js_client(bus) as js:
            for kernel_id in [*expected, good]:
                await publish_event(js, kernels.events[kernel_id])

            async def decided() -> bool:
                left = await scalar(engine, "SELECT count(*) FROM kernels "
                                    "WHERE status = 'compiled'")
                unsent = await scalar(engine, "SELECT count(*) FROM outbox "
                                      "WHERE sent_at IS NULL")
                return left == 0 and unsent == 0

            await wait_for(decided, 240, "every kernel decided", every=0.5)

            # Another submission of two decided kernels: answered from the stored rows.
            rejected_again = next(iter(expected))
            for kernel_id in (good, rejected_again):
                await publish_event(js, kernels.again(kernel_id))

            async def answered() -> bool:
                n = await scalar(engine, "SELECT count(*) FROM kernel_events "
                                 "WHERE (detail->>'cached')::boolean")
                unsent = await scalar(engine, "SELECT count(*) FROM outbox "
                                      "WHERE sent_at IS NULL")
                return n == 2 and unsent == 0

            await wait_for(answered, 30, "the cached verdicts")
            events = await bus_events(js)
    finally:
        await handler.close()
        await nc.close()

    # -- SQL: status, one validation row each, the reasons ---------------------------------
    status = dict((r.id, r.status) for r in await rows(engine, "SELECT id, status FROM kernels"))
    assert status[good] == "validated"
    assert all(status[k] == "rejected" for k in expected), {
        expected[k]: status[k] for k in expected}
    validations = await rows(engine, "SELECT kernel_id, passed, device, checks, reasons, "
                             "duration_ms FROM validations")
    assert sorted(str(v.kernel_id) for v in validations) == sorted(
        str(k) for k in [*expected, good])  # decided kernels were not validated again
    by_kernel = {v.kernel_id: v for v in validations}
    for kernel_id, check in expected.items():
        v = by_kernel[kernel_id]
        assert not v.passed and v.duration_ms > 0
        assert check in {x["check"] for x in v.reasons}, (check, v.reasons)
    ok = by_kernel[good]
    assert ok.passed and ok.device == "cpu" and ok.reasons == []
    assert {c["check"]: c["status"] for c in ok.checks} == {
        "integrity": "passed", "forward": "passed", "backward": "passed",
        "finiteness": "passed", "determinism": "passed", "graft_safety": "passed",
        "performance": "skipped", "resources": "skipped", "coverage": "passed"}

    # -- the wire: one verdict per event, machine-readable reasons -------------------------
    rejected = [e for e in events if isinstance(e, ev.KernelRejected)]
    validated = [e for e in events if isinstance(e, ev.KernelValidated)]
    assert len(rejected) == len(expected) + 1 and len(validated) == 2
    for e in rejected:
        assert e.stage == "validate" and e.kernel_id in expected
        reason = next(x for x in e.reasons if x.check == expected[e.kernel_id])
        assert reason.message
    timeout = next(x for e in rejected for x in e.reasons if x.check == "timeout")
    assert timeout.figure == timeout.bound == TIMEOUT_S
    assert "during check 'forward'" in timeout.message
    crashes = {x.message.split(" during")[0] for e in rejected for x in e.reasons
               if x.check == "crash"}
    assert crashes == {"sandbox killed by SIGSEGV", "sandbox killed by SIGABRT"}
    forward = next(x for e in rejected if e.kernel_id in expected
                   and expected[e.kernel_id] == "forward" for x in e.reasons
                   if x.check == "forward" and x.figure is not None)
    assert forward.bound is not None and forward.figure > forward.bound
    first, second = validated
    assert first.kernel_id == second.kernel_id == good
    assert first.checks == second.checks and first.device == "cpu"
    assert first.artifact_digest == kernels.events[good].artifact_digest

    # -- kernel_events: the journey, the cached answers -------------------------------------
    history = await rows(engine, "SELECT kernel_id, event, status, detail FROM kernel_events "
                         "ORDER BY id")
    assert [h.event for h in history if h.kernel_id == good] == ["validated", "validated"]
    cached = [h for h in history if h.detail.get("cached")]
    assert {h.kernel_id for h in cached} == {good, rejected_again}
    assert all(h.detail["stage"] == "validate" for h in history)
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0
