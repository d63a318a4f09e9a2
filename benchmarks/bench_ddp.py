"""Data-parallel training (``esper train --ddp``'s trainer) on CPU: step time of
2 gloo processes, by phase, against one plain process, and what a hot-load costs.

    python benchmarks/bench_ddp.py [--steps 400] [--nproc 2] [--verify]
    python benchmarks/bench_ddp.py --device cuda --batch 4096   # NCCL, one GPU per rank

No services: rank 0's kernel catalog is filled as its link would fill it (a
signed torch-backend ``residual_mlp`` artifact, verified and loaded), so the
figures are the training side only — shipping the artifact to the other ranks
(broadcast, their own signature check and load), the boundary that installs the
kernel on every rank (waits for the builds, agrees, broadcasts rank 0's init),
and the extra seed-gradient all-reduce. Prints a table and one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch

from esper.artifacts.format import unpack_verified
from esper.artifacts.signing import (
    default_private_key_path,
    ensure_keypair,
    load_private_key,
    load_public_key,
    public_key_path,
)
from esper.compile.pipeline import compile_blueprint
from esper.ir import bundled
from esper.kasmina import KasminaConfig
from esper.train.catalog import KernelCatalog, KernelInfo, KernelStatus
from esper.train.controller import PlateauController
from esper.train.fetch import load_verified
from esper.train.loop import TrainConfig, Trainer
from esper.train.task import TaskConfig, TeacherStudentTask

KASMINA = KasminaConfig(train_steps=30, graft_steps=20, stabilize_steps=None, embargo_steps=50)


def controller() -> PlateauController:
    """Grows once at the first chance and keeps it (the bench is the mechanics)."""
    return PlateauController(warmup_steps=100, patience=1, min_improvement=10.0,
                             cooldown_steps=20, stabilize_steps=20, cull_tolerance=10.0,
                             abort_factor=100.0, max_germinations=1)


def kernel_info(home: Path) -> tuple[KernelInfo, bytes]:
    packed = (home / "kernel.bin").read_bytes()
    artifact = unpack_verified(packed, load_public_key(public_key_path(
        default_private_key_path(home))))
    from esper.bus import events as ev

    info = KernelInfo(
        cache_key=artifact.manifest.cache_key, kernel_id="bench", blueprint_hash="0" * 64,
        target="cpu", backend="torch", dtype="float32",
        seed_schema=ev.TensorSpec(shape=("B", 64), dtype="float32"), artifact_digest=None,
        artifact_location=None, name="residual_mlp", status=KernelStatus.LOADED,
        factory=load_verified(artifact), source="artifact:disk",
    )
    return info, packed


def rank_main(home: Path, steps: int, verify: bool, device: str, batch: int) -> None:
    import torch.distributed as dist

    from esper.train.ddp import DDPTrainer
    from esper.train.ddp_comm import close_comm, env_comm
    from esper.train.ddp_sync import KernelOutbox, Shipment, Shipments

    torch.set_num_threads(1)
    comm = env_comm(device)
    link, ships = KernelCatalog(), Shipments()
    if comm.leader:
        info, packed = kernel_info(home)
        link.announce(info)
        ships.put(info.cache_key, Shipment(packed=packed))
    pub = load_public_key(public_key_path(default_private_key_path(home)))
    trainer = DDPTrainer(
        TeacherStudentTask(TaskConfig(batch=batch), device=comm.device), KernelCatalog(), comm,
        config=TrainConfig(steps=steps, eval_every=10, kasmina=KASMINA), controller=controller(),
        public_key=pub, outbox=KernelOutbox(link, ships) if comm.leader else None,
        link_catalog=link if comm.leader else None, verify=verify,
    )
    dist.barrier()
    result = trainer.run()
    (home / f"rank{comm.rank}.json").write_text(json.dumps({
        "stats": asdict(trainer.stats), "events": [asdict(e) for e in result.events],
        "wall_ms_per_step": result.wall_s * 1e3 / steps,
    }))
    close_comm()


def baseline(steps: int, device: str, batch: int
             ) -> tuple[list[float], list[dict]]:  # type: ignore[type-arg]
    """One plain process, the same run (same kernel, same growth), no DDP."""
    torch.set_num_threads(1)
    home = Path(os.environ["BENCH_HOME"])
    catalog = KernelCatalog()
    catalog.announce(kernel_info(home)[0])
    trainer = Trainer(TeacherStudentTask(TaskConfig(batch=batch), device=device), catalog,
                      config=TrainConfig(steps=steps, eval_every=10, kasmina=KASMINA),
                      controller=controller())
    times: list[float] = []
    closure_run = trainer.kasmina.train_step

    def timed(*a, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = closure_run(*a, **kw)
        times.append((time.perf_counter() - t0) * 1e3)
        return out

    trainer.kasmina.train_step = timed  # type: ignore[method-assign]
    result = trainer.run()
    return times, [asdict(e) for e in result.events]


def phases(step_ms: list[float], events: list[dict]) -> dict[str, float]:  # type: ignore[type-arg]
    at = {e["event"]: e["step"] for e in events}
    g, f = at.get("germinated", len(step_ms)), at.get("fossilized", len(step_ms))
    med = statistics.median
    return {
        "dormant_ms": med(step_ms[10:g]) if g > 11 else float("nan"),
        "live_seed_ms": med(step_ms[g + 2:f]) if f > g + 3 else float("nan"),
        "fossil_ms": med(step_ms[f + 1:]) if len(step_ms) > f + 2 else float("nan"),
        "install_step_ms": step_ms[at["training"]] if "training" in at else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--verify", action="store_true",
                    help="hash and compare the state after every transition (the end is "
                         "always checked); adds a tiny all-reduce per step, outside the timing")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: NCCL, rank r on GPU r; cpu: gloo")
    ap.add_argument("--batch", type=int, default=TaskConfig().batch, help="rows per rank")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        home = Path(tmp)
        ensure_keypair(home)
        key = load_private_key(default_private_key_path(home))
        made = compile_blueprint(bundled()["residual_mlp"], target="cpu", backend="torch",
                                 private_key=key)
        (home / "kernel.bin").write_bytes(made.packed)
        os.environ["BENCH_HOME"] = str(home)
        load0 = os.getloadavg()[0]
        base_ms, base_events = baseline(args.steps, args.device, args.batch)
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             str(args.nproc), __file__, "--rank-main", str(home), str(args.steps),
             str(int(args.verify)), args.device, str(args.batch)],
            env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"},
            capture_output=True, text=True, check=False,
        )
        if done.returncode:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        ranks = [json.loads((home / f"rank{r}.json").read_text()) for r in range(args.nproc)]
        load1 = os.getloadavg()[0]
    base = phases(base_ms, base_events)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"{dev}; {len(made.packed)} B artifact; {args.steps} steps, batch {args.batch} per "
          f"rank; load average {load0:.1f} -> {load1:.1f}")
    print(f"{'':24}{'dormant':>10}{'live seed':>11}{'fossil':>10}{'install step':>14}")
    print(f"{'1 process (no DDP)':24}" + "".join(
        f"{base[k]:>{w}.2f}" for k, w in
        (("dormant_ms", 10), ("live_seed_ms", 11), ("fossil_ms", 10), ("install_step_ms", 14))))
    out: dict[str, object] = {"baseline": base}
    for r, rank in enumerate(ranks):
        st = rank["stats"]
        ph = phases(st["step_ms"], rank["events"])
        print(f"{f'DDP rank {r}':24}" + "".join(
            f"{ph[k]:>{w}.2f}" for k, w in
            (("dormant_ms", 10), ("live_seed_ms", 11), ("fossil_ms", 10),
             ("install_step_ms", 14))))
        out[f"rank{r}"] = {**ph, "sync_ship_ms": st["sync_ms"][0],
                           "sync_ms_median": statistics.median(st["sync_ms"][1:]),
                           "hot_load_ms": st["hot_load_ms"],
                           "check_ms_median": statistics.median(st["check_ms"]),
                           "checks": len(st["checks"]),
                           "wall_ms_per_step": rank["wall_ms_per_step"]}
    for r in range(len(ranks)):
        o = out[f"rank{r}"]
        assert isinstance(o, dict)
        print(f"rank {r}: first sync (kernel shipped + verified + loaded) "
              f"{o['sync_ship_ms']:.2f} ms, later syncs {o['sync_ms_median']:.2f} ms; "
              f"state check {o['check_ms_median']:.2f} ms x {o['checks']}; whole run "
              f"{o['wall_ms_per_step']:.2f} ms per step (evaluations and syncs included)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    print(json.dumps({"bench": "ddp", "date": date.today().isoformat(), "commit": commit,
                      "machine": platform.processor() or platform.machine(),
                      "device": dev, "batch": args.batch,
                      "torch": torch.__version__, "nproc": args.nproc, **out}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5],
                  int(sys.argv[6]))
    else:
        main()
