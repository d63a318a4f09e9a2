"""Checks that need the real device: performance (latency of forward+backward
vs the eager reference backend on the same GPU), resources (peak memory of
forward+backward vs eager), and coverage (what the numerics were verified on).
On a CPU validator the first two are recorded as skipped, never faked."""

from __future__ import annotations

import statistics

import torch

from esper.validate import report as r
from esper.validate.subject import Subject, cotangents, make_inputs
from esper.validate.subject import run as run_module

T = torch.Tensor


def _perf_batch(s: Subject) -> int:
    """A batch size that gives the first input about ``perf_elements`` elements."""
    per_row = 1
    symbols_seen: list[str] = []
    for d in s.ir.inputs[0].shape:
        if isinstance(d, str):
            if symbols_seen:
                per_row *= s.policy.perf_symbol_size + len(symbols_seen) - 1
            symbols_seen.append(d)
        else:
            per_row *= int(d)
    return max(1, s.policy.perf_elements // max(1, per_row))


def _step_fn(module: torch.nn.Module, xs: list[T], cots: list[T]):  # type: ignore[no-untyped-def]
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in xs]

    def step() -> None:
        module.zero_grad(set_to_none=True)
        for x in leaves:
            x.grad = None
        outs = run_module(module, leaves)
        pairs = [(o, c) for o, c in zip(outs, cots, strict=True) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])

    return step


def _perf_data(s: Subject) -> tuple[int, list[T], list[T]]:
    batch = _perf_batch(s)
    xs = make_inputs(s, batch, seed=s.policy.seed + 600, other=s.policy.perf_symbol_size)
    with torch.no_grad():
        shapes = run_module(s.eager(), xs.module)
    cots, _ = cotangents(shapes, s, seed=s.policy.seed + 601)
    return batch, xs.module, cots


def check_performance(s: Subject) -> r.CheckRecord:
    """Median fwd+bwd latency, kernel / eager, interleaved runs on one GPU."""
    if s.device.type != "cuda":
        return r.skipped(r.PERFORMANCE, "not measured: performance is checked on GPU "
                         "validators only")
    batch, xs, cots = _perf_data(s)
    kernel, eager = _step_fn(s.module, xs, cots), _step_fn(s.eager(), xs, cots)
    for _ in range(s.policy.perf_warmup):
        kernel()
        eager()
    torch.cuda.synchronize(s.device)
    times: dict[str, list[float]] = {"kernel": [], "eager": []}
    for _ in range(s.policy.perf_iters):
        for name, fn in (("kernel", kernel), ("eager", eager)):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    k_ms, e_ms = statistics.median(times["kernel"]), statistics.median(times["eager"])
    ratio = k_ms / e_ms if e_ms > 0 else float("inf")
    bound = 1.0 + s.policy.perf_budget
    details = {"kernel_ms": k_ms, "eager_ms": e_ms, "batch": batch,
               "iters": s.policy.perf_iters, "over_budget": "reject"}
    msg = (f"fwd+bwd {k_ms:.3f} ms vs eager {e_ms:.3f} ms (x{ratio:.3f}) at batch {batch}; "
           f"budget x{bound:.2f}")
    if ratio > bound:
        return r.failed(r.PERFORMANCE, msg + ": rejected (the reference backend's own kernel "
                        "serves this blueprint instead)", figure=ratio, bound=bound, **details)
    return r.passed(r.PERFORMANCE, msg, figure=ratio, bound=bound, **details)


def _peak(step, device: torch.device) -> int:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def check_resources(s: Subject) -> r.CheckRecord:
    """Peak memory allocated by one fwd+bwd (beyond inputs and parameters), vs eager."""
    if s.device.type != "cuda":
        return r.skipped(r.RESOURCES, "not measured on CPU: peak memory is measured with "
                         "torch.cuda.max_memory_allocated on GPU validators only")
    batch, xs, cots = _perf_data(s)
    kernel, eager = _step_fn(s.module, xs, cots), _step_fn(s.eager(), xs, cots)
    kernel()  # first calls may allocate workspaces once; measure steady state
    eager()
    k, e = _peak(kernel, s.device), _peak(eager, s.device)
    ratio = k / e if e > 0 else (1.0 if k == 0 else float("inf"))
    limit = s.policy.memory_budget * e + s.policy.memory_slack_bytes
    details = {"kernel_bytes": k, "eager_bytes": e, "batch": batch,
               "slack_bytes": s.policy.memory_slack_bytes}
    msg = (f"peak fwd+bwd memory {k / 2**20:.1f} MiB vs eager {e / 2**20:.1f} MiB "
           f"(x{ratio:.2f}); budget x{s.policy.memory_budget:.2f} + "
           f"{s.policy.memory_slack_bytes / 2**20:.0f} MiB")
    if k > limit:
        return r.failed(r.RESOURCES, msg, figure=ratio, bound=s.policy.memory_budget, **details)
    return r.passed(r.RESOURCES, msg, figure=ratio, bound=s.policy.memory_budget, **details)


def check_coverage(s: Subject, *, interpreted: bool, device_name: str) -> r.CheckRecord:
    """What the numerics were verified on; a CUDA kernel checked on CPU says so."""
    if s.target.startswith("cuda") and s.device.type == "cpu":
        how = " under the Triton interpreter (TRITON_INTERPRET=1)" if interpreted else ""
        return r.passed(r.COVERAGE, f"{r.CPU_NUMERICS_NOTE}{how}; device numerics and "
                        "performance not verified", device=device_name, target=s.target)
    return r.passed(r.COVERAGE, f"numerics verified on {device_name}", device=device_name,
                    target=s.target)

