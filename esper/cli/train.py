"""`esper train --task teacher-student [--device cpu|cuda] [--steps N] [...]`: one
training process that hot-loads the deployed kernels into its seed sites."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from esper.errors import EsperError

TASKS = ("teacher-student",)


def _settings(args: argparse.Namespace) -> Any:
    from esper.settings import Settings, get_settings

    return Settings(home=Path(args.home)) if args.home else get_settings()


def cmd_train(args: argparse.Namespace) -> int:
    if not args.ddp:
        return _cmd_train(args)
    from esper.train.ddp_comm import close_comm

    try:
        return _cmd_train(args)
    finally:
        close_comm()


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from esper.infra.endpoints import resolve_endpoints
    from esper.kasmina import SeedEvent
    from esper.train.controller import Observation, PlateauController
    from esper.train.loop import TrainConfig, Trainer
    from esper.train.run import TrainRun, public_key_of
    from esper.train.task import TaskConfig, TeacherStudentTask
    from esper.workers.logging import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("esper train: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    try:
        endpoints = resolve_endpoints(settings)
    except EsperError as exc:
        print(f"esper train: {exc}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu":
        torch.set_num_threads(1)  # a small model: one thread is fastest, and leaves a core
    comm = None
    if args.ddp:  # under torchrun: one process per GPU (NCCL) or CPU process (gloo)
        from esper.train.ddp_comm import env_comm

        try:
            comm = env_comm(args.device)
        except EsperError as exc:
            print(f"esper train: {exc}", file=sys.stderr)
            return 2
    device = comm.device if comm is not None else args.device
    task = TeacherStudentTask(TaskConfig(seed=args.seed), device=device)
    config = TrainConfig(steps=args.steps, eval_every=args.eval_every,
                         run_id=args.run_id or uuid.uuid4().hex)

    def on_eval(obs: Observation, trainer: Trainer) -> None:
        if (obs.step + 1) % (args.eval_every * args.print_every) and obs.step != args.steps - 1:
            return
        seeds = " ".join(f"{s.site}[{s.seed}]={s.state.name}" for s in obs.seeds) or "-"
        kernels = len({k.cache_key for ks in obs.kernels.values() for k in ks})
        print(f"step {obs.step:>6}  loss {obs.train_loss:.4f}  val {obs.val_loss:.4f}  "
              f"kernels {kernels}  seeds {seeds}", flush=True)

    def on_event(event: SeedEvent, detail: dict[str, Any]) -> None:
        name = detail.get("blueprint") or (event.cache_key or "")[:12]
        print(f"step {event.step:>6}  seed {event.site}[{event.seed}] {event.event:<13} "
              f"{name}  ({event.reason})", flush=True)

    run: Any = TrainRun(
        endpoints=endpoints, home=settings.home, public_key=public_key_of(settings),
        config=config, controller=PlateauController(), on_eval=on_eval, on_event=on_event,
        wait_for_kernels=args.wait_kernels, wait_timeout=args.wait_timeout,
    )
    if comm is not None:
        from esper.train.ddp import DDPTrainRun

        run = DDPTrainRun(run, comm, verify=args.verify_replicas)
        print(f"ddp: rank {comm.rank} of {comm.world} on {comm.device}", flush=True)
    print(f"run {config.run_id}: {task.name} on {task.device}, {args.steps} steps, "
          f"sites {', '.join(task.site_schemas)}", flush=True)
    try:
        result, catalog = run.run(task)
    except EsperError as exc:
        print(f"esper train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    from esper.train.catalog import KernelStatus

    loaded = [k for k in catalog.snapshot() if k.status is KernelStatus.LOADED]
    retired = [k for k in catalog.snapshot() if k.status is KernelStatus.RETIRED]
    print(f"done in {result.wall_s:.1f}s: final val loss {result.final_val_loss:.4f}; "
          f"params {result.params_start} -> {result.params_final}; seeds germinated "
          f"{result.count('germinated')}, fossilized {result.count('fossilized')}, culled "
          f"{result.count('culled')}; kernels loaded {len(loaded)}, retired {len(retired)}")
    if args.json:
        extra: dict[str, Any] = {}
        path = Path(args.json)
        if comm is not None:  # every rank writes its own: PATH on rank 0, PATH.rank<r> else
            from dataclasses import asdict

            extra = {"ddp": asdict(run.stats), "step_ms_median": result.step_ms_median}
            path = path if comm.leader else path.with_name(f"{path.name}.rank{comm.rank}")
        path.write_text(json.dumps({
            **extra,
            "run_id": result.run_id, "steps": result.steps, "wall_s": result.wall_s,
            "final_val_loss": result.final_val_loss, "val_loss": result.val_loss,
            "params_start": result.params_start, "params_final": result.params_final,
            "events": [e.__dict__ for e in result.events],
            "fossils": result.fossils,
        }, indent=2))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a host that grows with the deployed kernels")
    p.add_argument("--task", choices=TASKS, default="teacher-student")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="task seed (teacher, data, host init)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    p.add_argument("--print-every", type=int, default=4, help="evaluations between lines")
    p.add_argument("--run-id", help="default: a fresh uuid")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on cpu)")
    p.add_argument("--wait-kernels", type=int, default=0, metavar="N",
                   help="before training, wait until N kernels are loaded")
    p.add_argument("--wait-timeout", type=float, default=60.0)
    p.add_argument("--home", help="data directory (default ESPER_HOME or ~/.esper)")
    p.add_argument("--json", metavar="PATH", help="write the run's result as JSON")
    p.add_argument("--ddp", action="store_true",
                   help="data-parallel under torchrun (gloo on cpu, NCCL on cuda); rank 0 "
                        "consumes kernels and decides, every rank applies in lockstep")
    p.add_argument("--verify-replicas", action="store_true",
                   help="with --ddp: hash every rank's model state after each transition")
    p.set_defaults(func=cmd_train)
