"""Workers across machines: two processes of every stage share each stage's
durable consumer on a 3-node JetStream cluster (R3 streams); one worker
process is SIGKILLed and one NATS node killed and restarted mid-run, and still
every submission is ready exactly once."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus.publish import make_submission
from esper.bus.topology import Topology, ensure_streams
from esper.infra.embedded import NatsServer, cluster_urls
from esper.infra.ports import free_port, http_ok
from tests.integration.runtime_helpers import (
    FAST_POLICY,
    audit_pipeline,
    js_client,
    mlp_blueprint,
    publish_all,
    rows,
    scalar,
    spawn_worker,
    terminate,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="session"),
]

STAGES = ("compile", "validate", "deploy")
PROCESSES = 2  # per stage
R3 = Topology(replicas=3, policy=FAST_POLICY)


class WorkerProc:
    """One ``run_stage`` subprocess with its own metrics port (to see its share)."""

    def __init__(self, stage: str, index: int, nats_url: str, database_url: str, logs: Path):
        self.stage = stage
        self.name = f"{stage}-{index}"
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] = spawn_worker(
            stage, nats_url, database_url, "--replicas", "3",
            log_path=logs / f"{self.name}.log",
            env={"ESPER_METRICS_PORT": str(self.metrics_port), "ESPER_LOG_LEVEL": "INFO"},
        )

    def healthy(self) -> bool:
        """Its consumer is set up and JetStream answers its lag probe."""
        return http_ok(f"http://127.0.0.1:{self.metrics_port}/healthz")

    def processed(self) -> float:
        """Messages this process committed (its Prometheus counter)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "esper_worker_processed_total":
                    return sample.value
        return 0.0



@pytest.fixture
def workers(
    nats_cluster: list[NatsServer], database_url: str, tmp_path: Path
) -> Iterator[dict[str, list[WorkerProc]]]:
    url = ",".join(cluster_urls(nats_cluster))  # each worker fails over between nodes
    procs = {
        stage: [WorkerProc(stage, i, url, database_url, tmp_path) for i in range(PROCESSES)]
        for stage in STAGES
    }
    yield procs
    for group in procs.values():
        for w in group:
            terminate(w.proc)


async def with_retries(call: Callable[[], Awaitable[object]], tries: int = 40) -> None:
    """A new cluster may still be electing leaders: its first requests time out."""
    for attempt in range(tries):
        try:
            await call()
            return
        except Exception:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.5)


async def ready_count(engine: AsyncEngine) -> int:
    return int(await scalar(engine, "SELECT count(*) FROM kernels WHERE status = 'ready'"))


async def test_processes_per_stage_survive_a_worker_sigkill_and_a_node_loss(
    nats_cluster: list[NatsServer],
    workers: dict[str, list[WorkerProc]],
    engine: AsyncEngine,
) -> None:
    urls = cluster_urls(nats_cluster)
    subs = [make_submission(mlp_blueprint(i)) for i in range(200)]
    async with js_client(urls) as js:
        await with_retries(lambda: ensure_streams(js, R3))  # the workers race to it too
        info = await js.stream_info("ESPER_KERNELS")
        assert info.config.num_replicas == 3

        async def all_started() -> bool:
            return all(w.healthy() for group in workers.values() for w in group)

        await wait_for(all_started, 30, "every worker process to be up", every=0.2)
        publisher = asyncio.create_task(publish_all(js, subs, pace=0.015))

        victim = workers["compile"][0]

        async def flowing() -> bool:  # the victim has had its share of the stream
            return await ready_count(engine) >= 20 and victim.processed() > 0

        await wait_for(flowing, 30, "kernels flowing through the pipeline", every=0.1)

        # A worker process dies with whatever it holds: its stage partner and
        # the redelivery after ack_wait must finish its share.
        victim.proc.kill()
        victim.proc.wait()

        # Then the node that leads the kernel stream (the worst to lose) dies,
        # stays away a while, and comes back with the same data directory.
        info = await js.stream_info("ESPER_KERNELS")
        leader = (info.cluster.leader if info.cluster else None) or "esper-node-0"
        node = nats_cluster[int(leader.rsplit("-", 1)[1])]
        node.kill()
        await asyncio.sleep(1.5)
        await asyncio.to_thread(node.restart)

        await asyncio.wait_for(publisher, 30)

        async def all_ready() -> bool:
            return await ready_count(engine) == len(subs)

        await wait_for(all_ready, 30, f"{len(subs)} kernels ready", every=0.2)

    async def all_sent() -> bool:  # a relay may still be retrying its last KernelReady
        return await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0

    await wait_for(all_sent, 15, "every outbox row published", every=0.2)
    dead = await rows(engine, "SELECT stage, reason, delivery_count FROM dead_letters")
    assert not dead, f"dead letters: {dead}"

    # Every live process did work (the consumer is really shared), and where
    # both live their commits add up to one per submission (none twice).
    for stage, group in workers.items():
        alive = [w for w in group if w.proc.poll() is None]
        shares = [w.processed() for w in alive]
        assert all(s > 0 for s in shares), f"{stage}: an idle process {shares}"
        if stage != "compile":
            assert len(alive) == PROCESSES
            assert sum(shares) == len(subs), f"{stage}: {shares} commits"
    await audit_pipeline(engine, subs)
    for group in workers.values():
        for w in group:
            if w.proc.poll() is None:
                assert terminate(w.proc) == 0  # SIGTERM: a clean, drained exit
