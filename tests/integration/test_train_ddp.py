"""``esper train --ddp`` on CPU: two gloo processes under torchrun against real NATS
and Postgres. Rank 0 alone consumes the deployed kernel and decides; both ranks
germinate, graft and fossilize it at the same steps, their model states hash
equal after every transition, and only rank 0 records the seed events.

Run as a script (``torchrun … test_train_ddp.py BUS DB HOME OUT STEPS``) this file
is one rank of that run, built with test_train_e2e's helpers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.artifacts.signing import load_private_key
from tests.integration.runtime_helpers import REPO, scalar
from tests.integration.test_train_e2e import (  # noqa: F401  (home: a fixture)
    _announce_artifact,
    eager,
    home,
    small_task,
    training,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.asyncio(loop_scope="session")]

JOURNEY = ["germinated", "training", "grafting", "stabilization", "fossilized"]


def _torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *args],
        env={**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo",
             "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )


def _ranks(out: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(out.read_text()), json.loads(Path(f"{out}.rank1").read_text())]


async def test_two_ranks_hot_load_graft_and_fossilize_in_lockstep(
    bus: str, database_url: str, engine: AsyncEngine, home: Path, tmp_path: Path,  # noqa: F811
) -> None:
    key = await _announce_artifact(engine, bus, load_private_key(home / "keys" / "signing.pem"),
                                   "good")
    out = tmp_path / "ddp.json"
    done = await asyncio.to_thread(_torchrun, __file__, bus, database_url, str(home), str(out),
                                   "170")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    r0, r1 = _ranks(out)

    assert r0["run_id"] == r1["run_id"]
    assert r0["source"] == "artifact:durable"  # rank 0 fetched and verified it
    assert r1["source"] == "artifact:rank0"  # rank 1 verified rank 0's bytes itself
    events = [(e["step"], e["site"], e["seed"], e["event"], e["cache_key"]) for e in r0["events"]]
    assert events == [(e["step"], e["site"], e["seed"], e["event"], e["cache_key"])
                      for e in r1["events"]]
    assert [e[3] for e in events] == JOURNEY
    assert {e[4] for e in events} == {key}
    assert len({e[0] for e in events}) == len(JOURNEY)  # one transition per step here

    # Bit-identical after every transition (each rank checked all ranks' digests in
    # the run; both report the same ones), and at the end.
    assert r0["checks"] == r1["checks"]
    checked = [step for step, _ in r0["checks"]]
    assert checked == [e[0] for e in events] + [169]
    assert r0["val_loss"] == r1["val_loss"]
    assert r0["params_final"] == r1["params_final"] > r0["params_start"]
    assert len(r0["hot_load_ms"]) == len(r1["hot_load_ms"]) == 1

    # Only rank 0 records seed events: each once.
    stored = await scalar(engine, "SELECT count(*) FROM seed_events")
    assert stored == await scalar(engine, "SELECT count(*) FROM seed_events WHERE run_id = :r",
                                  r=r0["run_id"]) == len(JOURNEY)


async def test_esper_train_ddp_as_a_user_runs_it(
    bus: str, database_url: str, engine: AsyncEngine, home: Path, tmp_path: Path,  # noqa: F811
) -> None:
    await _announce_artifact(engine, bus, load_private_key(home / "keys" / "signing.pem"),
                             "good")
    out = tmp_path / "cli.json"
    done = await asyncio.to_thread(
        _torchrun, "-m", "esper", "train", "--ddp", "--verify-replicas", "--steps", "40",
        "--eval-every", "10", "--wait-kernels", "1", "--wait-timeout", "30", "--json", str(out),
        env={"ESPER_NATS_URL": bus, "ESPER_DATABASE_URL": database_url,
             "ESPER_HOME": str(home)},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "ddp: rank 0 of 2 on cpu" in done.stdout and "ddp: rank 1 of 2 on cpu" in done.stdout
    assert done.stdout.count("kernels loaded 1, retired 0") == 2  # both ranks have it
    r0, r1 = _ranks(out)
    assert r0["run_id"] == r1["run_id"]
    assert r0["ddp"]["kernels_shipped"] == r1["ddp"]["kernels_shipped"] == 1
    assert r0["ddp"]["checks"] == r1["ddp"]["checks"] and r0["ddp"]["checks"][-1][0] == 39
    assert r0["val_loss"] == r1["val_loss"]


def _rank_main(nats_url: str, database_url: str, home_dir: Path, out: Path, steps: int) -> None:
    """One rank of the lockstep test's run (under torchrun)."""
    import torch

    from esper.train.ddp import DDPTrainRun
    from esper.train.ddp_comm import close_comm, env_comm

    torch.set_num_threads(1)
    comm = env_comm("cpu")
    try:
        base = training(nats_url, database_url, home_dir, steps=steps,
                        controller=eager(max_germinations=1), wait_for_kernels=1,
                        wait_timeout=60)
        run = DDPTrainRun(base, comm, verify=True)
        result, catalog = run.run(small_task())
        assert run.stats is not None
        keys = {e.cache_key for e in result.events}
        info = catalog.get(next(iter(keys))) if keys else None
        path = out if comm.leader else Path(f"{out}.rank{comm.rank}")
        path.write_text(json.dumps({
            "run_id": result.run_id, "events": [asdict(e) for e in result.events],
            "checks": run.stats.checks, "hot_load_ms": run.stats.hot_load_ms,
            "val_loss": result.val_loss, "params_start": result.params_start,
            "params_final": result.params_final,
            "source": info.source if info is not None else None,
        }))
    finally:
        close_comm()


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
