"""Hot-load: a slow kernel factory builds off the training thread; the loop
never waits (step time max <= 1.5 x median over the swap).

This machine's cores are shared with other jobs, so a step's wall time also
holds time the training thread sat *runnable* while another process ran. That
time (Linux schedstat's run-queue wait) is taken out; what is left is the
thread's own CPU time plus every wait it made itself — a future, a lock, the
GIL held by the loader thread — which is exactly what must not grow. CPU time
itself still jitters when a busy neighbour shares the core, so the run is tried
up to three times: a real stall (waiting for the 0.4 s load) fails every time.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch

from esper.kasmina import KasminaConfig, SeedEvent, SeedState, add_seed_sites
from tests.unit.kasmina_kit import Host, ir_factory

WIDTH = 256
FACTORY_SLEEP_S = 0.4


def _runqueue_wait_s() -> float:
    """Seconds this thread has waited runnable for a CPU (0 where unknown)."""
    path = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
    try:
        return int(path.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _run_with_a_swap() -> tuple[list[float], list[float], list[SeedEvent]]:
    """(wall, own) step times of a loop during which a slow kernel is hot-loaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for the loop, the other for the loader
    try:
        torch.manual_seed(0)
        host = Host(d=WIDTH, n=4)
        events: list[SeedEvent] = []
        kas = add_seed_sites(
            host,
            {"blocks.1": (("B", WIDTH), "float32")},
            seeds_per_site=2,
            config=KasminaConfig(train_steps=None, stabilize_steps=None),
            sink=events.append,
        )
        opt = torch.optim.Adam(host.parameters(), lr=1e-3)
        x, y = torch.randn(512, WIDTH), torch.randn(512, 1)
        build = ir_factory(d=WIDTH)

        def slow_factory(device: torch.device) -> torch.nn.Module:
            time.sleep(FACTORY_SLEEP_S)  # fetching / verifying / loading an artifact
            return build(device)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = ((host(x) - y) ** 2).mean()
            loss.backward()
            return loss

        wall: list[float] = []
        own: list[float] = []
        after_swap = 0
        for step in range(2000):  # until 20 steps after the swap
            if step == 10:
                kas.offer_kernel("blocks.1", None, "k", slow_factory)
            q0, t0 = _runqueue_wait_s(), time.perf_counter()
            kas.train_step(closure, opt, step)
            dt = time.perf_counter() - t0
            wall.append(dt)
            own.append(dt - (_runqueue_wait_s() - q0))
            if kas.state_of("blocks.1", 0) is SeedState.TRAINING:
                after_swap += 1
                if after_swap == 20:
                    break
        kas.close()
    finally:
        torch.set_num_threads(threads)

    return wall, own, events


def test_training_loop_never_waits_for_a_slow_kernel_load() -> None:
    failures = []
    for _ in range(3):
        wall, own, events = _run_with_a_swap()
        loaded = [e for e in events if e.to_state is SeedState.TRAINING]
        assert len(loaded) == 1, events
        assert loaded[0].step - events[0].step >= 2  # the load spanned steps; the loop went on
        assert max(wall) < FACTORY_SLEEP_S  # even by the wall clock no step waited for it
        window = own[5:]
        median = statistics.median(window)
        if max(window) <= 1.5 * median:
            return
        failures.append(
            f"max {max(window) * 1e3:.1f} ms vs median {median * 1e3:.1f} ms at step "
            f"{own.index(max(window))}, swap at step {loaded[0].step}"
        )
    raise AssertionError("; ".join(failures))
