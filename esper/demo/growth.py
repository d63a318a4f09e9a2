"""The demo's training half: one trainer that grows from the deployed kernels,
then the two static hosts it is compared with, then the report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.db.engine import create_engine
from esper.demo.report import (
    Comparison,
    Curve,
    DemoSummary,
    History,
    Marker,
    format_journey,
    format_sql,
    format_summary,
    plot,
    read_history,
)
from esper.infra.endpoints import Endpoints
from esper.kasmina import SeedEvent
from esper.train.catalog import KernelCatalog, KernelInfo, KernelStatus
from esper.train.controller import Observation, PlateauController
from esper.train.loop import TrainConfig, Trainer, TrainResult
from esper.train.run import TrainRun
from esper.train.static import static_model, train_static
from esper.train.task import TaskConfig, TeacherStudentTask, count_params

Out = Callable[[str], None]

def demo_controller() -> PlateauController:
    """The documented default heuristic (esper.train.controller)."""
    return PlateauController()


def _on_kernel(say: Out) -> Callable[[KernelInfo], None]:
    def on_kernel(info: KernelInfo) -> None:
        if info.status is KernelStatus.LOADED:
            verified = ", signature verified" if (info.source or "").startswith("artifact") else ""
            say(f"  trainer: {info.label:<20} loaded ({info.source}{verified}, "
                f"{info.load_ms or 0:.0f} ms off the training thread) - may germinate")
        elif info.status is KernelStatus.IGNORED and info.name:
            say(f"  trainer: {info.label:<20} not used: {info.error}")
        elif info.status in (KernelStatus.FAILED, KernelStatus.RETIRED):
            say(f"  trainer: {info.label:<20} {info.status.value}: {info.error}")

    return on_kernel


def _on_event(say: Out) -> Callable[[SeedEvent, dict[str, Any]], None]:
    def on_event(event: SeedEvent, detail: dict[str, Any]) -> None:
        name = detail.get("blueprint") or (event.cache_key or "")[:12]
        say(f"  step {event.step:>5}  seed {event.site}[{event.seed}] {event.event:<13} "
            f"{name:<14} {event.reason}")

    return on_event


def _on_eval(say: Out, every: int) -> Callable[[Observation, Trainer], None]:
    def on_eval(obs: Observation, trainer: Trainer) -> None:
        if (obs.step + 1) % every and obs.step + 1 != trainer.config.steps:
            return
        seeds = ", ".join(f"{s.site}[{s.seed}] {s.state.name.lower()}" for s in obs.seeds)
        fossils = len(trainer.result.fossils)
        say(f"  step {obs.step:>5}  loss {obs.train_loss:.4f}  val {obs.val_loss:.4f}  "
            f"fossils {fossils}  {seeds}")

    return on_eval


def _smooth(values: list[float], every: int) -> list[tuple[int, float]]:
    """Means over windows of ``every`` steps, at each window's last step."""
    return [(i, sum(values[i - every + 1: i + 1]) / every)
            for i in range(every - 1, len(values), every)]


async def _history(database_url: str, run_id: str) -> History:
    engine = create_engine(database_url, pool_size=1)
    try:
        return await read_history(engine, run_id)
    finally:
        await engine.dispose()


def _baselines(task: TeacherStudentTask, result: TrainResult, catalog: KernelCatalog,
               config: TrainConfig) -> tuple[list[tuple[int, float]],
                                             list[tuple[int, float]] | None, int]:
    start = train_static(task, task.make_host(), config.steps, config.lr, config.eval_every)
    additions = []
    for site, key, _name in result.fossils:
        info = catalog.get(key)
        if info is not None and info.factory is not None:
            additions.append((site, info.factory(task.device)))
    if not additions:
        return start, None, result.params_start
    grown_model = static_model(task, additions)
    grown = train_static(task, grown_model, config.steps, config.lr, config.eval_every)
    return start, grown, count_params(grown_model)


@dataclass
class Grown:
    """The growing run and its comparisons, before the report."""

    task: TeacherStudentTask
    config: TrainConfig
    result: TrainResult
    catalog: KernelCatalog
    static_start: list[tuple[int, float]]
    static_grown: list[tuple[int, float]] | None
    grown_params: int


def grow(opts: Any, endpoints: Endpoints, *, home: Path, public_key: Path, say: Out,
         timings: dict[str, float]) -> Grown:
    """Train the growing host (from its first usable kernel on), then the static ones."""
    threads = torch.get_num_threads()
    if opts.device == "cpu":
        torch.set_num_threads(1)  # small matmuls: one thread is faster, and leaves a core
    try:
        task = TeacherStudentTask(TaskConfig(), device=opts.device)
        config = TrainConfig(steps=opts.steps)
        run = TrainRun(
            endpoints=endpoints, home=home, public_key=public_key, config=config,
            controller=demo_controller(), wait_for_kernels=1,
            wait_timeout=opts.pipeline_timeout, on_eval=_on_eval(say, opts.print_every),
            on_event=_on_event(say), on_kernel=_on_kernel(say),
        )
        say(f"trainer: {task.name} on {task.device}, {config.steps} steps, host "
            f"{count_params(task.make_host()):,} params, sites "
            f"{', '.join(f'{s} float32[B, {task.cfg.width}]' for s in task.site_schemas)}; "
            "waiting for a kernel that fits")
        result, catalog = run.run(task)
        timings["waiting for a kernel"] = run.waited_s
        timings["training"] = result.wall_s
        say(f"trainer done: {result.steps} steps in {result.wall_s:.1f}s (median step "
            f"{result.step_ms_median:.1f} ms, max {result.step_ms_max:.1f} ms)")
        t0 = time.perf_counter()
        say("training the static hosts for comparison...")
        start, grown, grown_params = _baselines(task, result, catalog, config)
        timings["baselines"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return Grown(task, config, result, catalog, start, grown, grown_params)


def report(opts: Any, g: Grown, endpoints: Endpoints, *, say: Out,
           timings: dict[str, float]) -> DemoSummary:
    """Read the history back from SQL, draw the PNG, print summary, journey and SQL."""
    result = g.result
    history = asyncio.run(_history(endpoints.database_url, result.run_id))
    comparison = Comparison(
        growing=result.final_val_loss, static_start=g.static_start[-1][1],
        static_grown=None if g.static_grown is None else g.static_grown[-1][1],
        params_start=result.params_start, params_grown=g.grown_params,
        steps=result.steps, param_steps=result.param_steps,
    )
    curves = [
        Curve("growing: train loss", _smooth(result.train_loss, 25), (158, 202, 225), 1),
        Curve("growing: val loss", result.val_loss, (31, 119, 180), 3),
        Curve("static start size", g.static_start, (127, 127, 127), 2),
    ]
    if g.static_grown is not None:
        curves.append(Curve("static grown size", g.static_grown, (255, 127, 14), 2))
    markers = [Marker(e.step, e.event, e.kernel or "") for e in result.events
               if e.event in ("germinated", "fossilized", "culled")]
    png = Path(opts.png).resolve()
    backend = plot(png, curves, markers, "Esper demo: teacher-student, a host that grows")
    summary = DemoSummary(history, comparison, png, backend, timings)
    say(format_summary(summary))
    say(format_journey(history))
    say(format_sql(result.run_id))
    return summary
