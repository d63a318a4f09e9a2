"""What rank 0 tells the other ranks of ``esper train --ddp``: the JSON sync message
round-trips exactly, and over a real 2-process gloo group (no services) the
message and the artifact bytes arrive whole, flags and gradients are agreed, and
a state digest that differs on one rank stops every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from esper.bus import events as ev
from esper.kasmina import SeedState
from esper.train.controller import Germinate, Transition
from esper.train.ddp_sync import (
    GerminateMsg,
    KernelSpec,
    Retirement,
    SyncMessage,
    decode,
    decode_decision,
    encode,
    encode_decision,
)

REPO = Path(__file__).resolve().parents[2]
BLOB = bytes(range(256)) * 3 + b"\x00end"


def _message() -> SyncMessage:
    spec = KernelSpec(
        cache_key="ab" * 32, kernel_id="k1", blueprint_hash="cd" * 32, target="cpu",
        backend="torch", dtype="float32",
        seed_schema=ev.TensorSpec(shape=("B", 64), dtype="float32"),
        artifact_digest="ef" * 32, artifact_location="nats-object-store:x", name="residual_mlp",
        packed_bytes=len(BLOB),
    )
    ir_spec = spec.model_copy(update={"cache_key": "12" * 32, "packed_bytes": 0,
                                      "ir": {"schema_version": 1, "nodes": []}})
    return SyncMessage(
        step=49, kernels=(spec, ir_spec), retired=(Retirement(cache_key="99" * 32, reason="r"),),
        decisions=(
            encode_decision(Germinate("mid", "ab" * 32, "plateau — ünïcode")),
            encode_decision(Transition("stem", 1, SeedState.FOSSILIZED, "kept")),
        ),
    )


def test_decisions_round_trip_through_json() -> None:
    msg = _message()
    data = encode(msg)
    assert json.loads(data)["decisions"][1] == {
        "kind": "transition", "site": "stem", "seed": 1, "to": "FOSSILIZED", "reason": "kept"}
    back = decode(data)
    assert back == msg
    assert [decode_decision(d) for d in back.decisions] == [
        Germinate("mid", "ab" * 32, "plateau — ünïcode"),
        Transition("stem", 1, SeedState.FOSSILIZED, "kept"),
    ]


def test_a_malformed_message_is_refused() -> None:
    data = json.loads(encode(_message()))
    with pytest.raises(pydantic.ValidationError):
        decode(json.dumps({**data, "schema_version": 2}).encode())
    data["decisions"][0]["kind"] = "explode"
    with pytest.raises(pydantic.ValidationError):
        decode(json.dumps(data).encode())
    with pytest.raises(pydantic.ValidationError):
        GerminateMsg(site="mid", cache_key="k", reason="r", extra=1)  # type: ignore[call-arg]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank (run in its own process by the test below)."""
    import torch
    import torch.distributed as dist

    from esper.errors import ReplicaDivergenceError
    from esper.train.ddp_comm import Comm
    from esper.train.ddp_sync import broadcast_sync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    comm = Comm(rank, world, torch.device("cpu"))
    got, blobs = broadcast_sync(comm, _message() if rank == 0 else None,
                                [BLOB] if rank == 0 else None)
    empty = comm.broadcast_bytes(b"" if rank == 0 else None)
    any_flags = comm.agree([rank == 1, False, True], any_rank=True)
    all_flags = comm.agree([rank == 1, True], any_rank=False)
    # Gradients: a param with a grad on rank 0 only, one on both, one on neither.
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    b.grad = torch.full((3,), float(rank + 1))
    if rank == 0:
        a.grad = torch.tensor([2.0, 4.0, 6.0])
    comm.average_grads([a, b, c])
    same = comm.hashes(b"\x01" * 32)
    try:
        comm.check_identical(bytes([rank]) * 32, "in the test")
        diverged = ""
    except ReplicaDivergenceError as exc:
        diverged = str(exc)
    dist.destroy_process_group()
    Path(out).write_text(json.dumps({
        "message": encode(got).decode(), "blob": blobs[0].hex(), "empty": empty.hex(),
        "any": any_flags, "all": all_flags,
        "a": a.grad.tolist() if a.grad is not None else None,
        "b": b.grad.tolist() if b.grad is not None else None, "c": c.grad is None,
        "same": [h.hex() for h in same], "diverged": diverged,
    }))


def _two_ranks(tmp_path: Path, worker: str) -> list[dict]:  # type: ignore[type-arg]
    """Run ``worker(rank, 2, store, out)`` of this module in two processes (a gloo
    group on a file store); their JSON outputs in rank order."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c",
             f"import sys; from tests.unit.test_ddp_decisions import {worker}; "
             f"{worker}(int(sys.argv[1]), 2, sys.argv[2], sys.argv[3])",
             str(rank), str(tmp_path / "store"), str(tmp_path / f"rank{rank}.json")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_broadcast_and_agreement_over_two_gloo_processes(tmp_path: Path) -> None:
    r0, r1 = _two_ranks(tmp_path, "_worker")
    assert decode(r1["message"].encode()) == _message()
    assert bytes.fromhex(r1["blob"]) == BLOB
    assert r1["empty"] == ""
    for r in (r0, r1):
        assert r["any"] == [True, False, True]
        assert r["all"] == [False, True]
        assert r["a"] == [1.0, 2.0, 3.0]  # (2,4,6) + nothing, over 2 ranks
        assert r["b"] == [1.5, 1.5, 1.5]
        assert r["c"] is True  # no grad anywhere: stays None
        assert r["same"] == ["01" * 32, "01" * 32]
        assert "replicas diverged in the test" in r["diverged"]
        assert "rank 1: " + "01" * 8 in r["diverged"]


FAULT_AFTER = 36
"""Forward calls after which rank 1's copy of the kernel returns NaN: the dry run,
30 TRAINING steps, then a few GRAFTING ones (blended: the host saw it)."""


def _trainer_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a grown run whose kernel faults on rank 1 only."""
    _grown_run(rank, world, store, out, "fault")


def _slow_build_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a grown run whose kernel takes rank 1 longer to build."""
    _grown_run(rank, world, store, out, "slow")


def _grown_run(rank: int, world: int, store: str, out: str, twist: str) -> None:
    """One rank of a grown run (no services: rank 0's catalog is filled as its link
    would fill it, with a pass-through kernel); ``twist`` on rank 1 only: "fault"
    (its copy of the kernel goes NaN) or "slow" (its build takes 0.1 s: tens of
    steps, so that run is 400 steps long)."""
    import time

    import torch
    import torch.distributed as dist

    import esper.train.ddp_sync as sync
    from esper.ir import bundled
    from esper.kasmina import KasminaConfig
    from esper.train.catalog import KernelCatalog, KernelInfo, KernelStatus
    from esper.train.controller import PlateauController
    from esper.train.ddp import DDPTrainer
    from esper.train.ddp_comm import Comm
    from esper.train.loop import TrainConfig
    from esper.train.task import TaskConfig, TeacherStudentTask

    reference = sync.reference_factory

    def faulty(ir: dict, dtype: str):  # type: ignore[no-untyped-def,type-arg]
        def make(device):  # type: ignore[no-untyped-def]
            module = reference(ir, dtype)(device)
            calls, forward = [0], module.forward

            def nan_later(x):  # type: ignore[no-untyped-def]
                calls[0] += 1
                y = forward(x)
                return y * float("nan") if calls[0] > FAULT_AFTER else y

            module.forward = nan_later
            return module
        return make

    def slow(ir: dict, dtype: str):  # type: ignore[no-untyped-def,type-arg]
        def make(device):  # type: ignore[no-untyped-def]
            time.sleep(0.1)  # on the loader thread: training steps go on meanwhile
            return reference(ir, dtype)(device)
        return make

    if rank == 1:  # only this rank's copy of the kernel is odd
        sync.reference_factory = faulty if twist == "fault" else slow
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    comm = Comm(rank, world, torch.device("cpu"))
    link, shipments = KernelCatalog(), sync.Shipments()
    if rank == 0:
        ir = bundled()["residual_mlp"].to_dict()
        link.announce(KernelInfo(
            cache_key="ab" * 32, kernel_id="k", blueprint_hash="cd" * 32, target="cpu",
            backend="torch", dtype="float32",
            seed_schema=ev.TensorSpec(shape=("B", 64), dtype="float32"), artifact_digest=None,
            artifact_location=None, name="residual_mlp", status=KernelStatus.LOADED,
            factory=reference(ir, "float32"), source="blueprint-ir"))
        shipments.put("ab" * 32, sync.Shipment(ir=ir))
    trainer = DDPTrainer(
        TeacherStudentTask(TaskConfig(batch=64, val_size=256)), KernelCatalog(), comm,
        config=TrainConfig(
            steps=110 if twist == "fault" else 400, eval_every=10,
            kasmina=KasminaConfig(train_steps=30, graft_steps=20, stabilize_steps=None,
                                  embargo_steps=50)),
        controller=PlateauController(warmup_steps=40, patience=1, min_improvement=10.0,
                                     max_germinations=1),
        outbox=sync.KernelOutbox(link, shipments) if rank == 0 else None,
        link_catalog=link if rank == 0 else None, verify=True,
    )
    result = trainer.run()
    dist.destroy_process_group()
    Path(out).write_text(json.dumps({
        "events": [[e.step, e.site, e.seed, e.event, e.reason] for e in result.events],
        "checks": trainer.stats.checks, "val": result.val_loss,
    }))


@pytest.mark.slow
def test_a_fault_seen_on_one_rank_culls_the_seed_on_every_rank(tmp_path: Path) -> None:
    r0, r1 = _two_ranks(tmp_path, "_trainer_worker")
    assert [e[:4] for e in r0["events"]] == [e[:4] for e in r1["events"]]
    assert [e[3] for e in r0["events"]] == ["germinated", "training", "grafting", "culled"]
    assert r1["events"][-1][4].startswith("non-finite")  # rank 1 saw the fault...
    assert r0["events"][-1][4] == "fault on another rank"  # ...rank 0 agreed
    # The step re-ran without the seed on both ranks: still bit-identical, after the
    # cull and to the end.
    assert r0["checks"] == r1["checks"]
    assert [c[0] for c in r0["checks"]] == [e[0] for e in r0["events"]] + [109]
    assert r0["val"] == r1["val"]


@pytest.mark.slow
def test_a_build_slower_on_one_rank_is_installed_by_every_rank_at_one_step(
        tmp_path: Path) -> None:
    """No rank waits for a build: every rank installs at the first boundary where
    all builds are done (rank 1's takes 0.1 s, many steps), and the replicas stay
    bit-identical."""
    r0, r1 = _two_ranks(tmp_path, "_slow_build_worker")
    assert [e[:4] for e in r0["events"]] == [e[:4] for e in r1["events"]]
    at = {e[3]: e[0] for e in r0["events"]}
    assert at["training"] > at["germinated"] + 1  # the steps went on while rank 1 built
    assert r0["checks"] == r1["checks"] and r0["val"] == r1["val"]
