"""Fault detection without per-step host syncs.

Three ways a seed fails, and where each is caught:
- it raises (forward or backward): caught on the host at once, the seed is
  excluded from every later forward, its output never reaches the host;
- it makes a NaN/Inf (output, input gradient, parameter gradient): the output
  is zeroed with ``torch.where`` on device and an ok-flag tensor is kept; the
  flags of the whole step are read with ONE device→host copy at the step
  boundary, before ``optimizer.step`` (and only while live seeds exist);
- it is too slow: timed with ``perf_counter`` on CPU, CUDA events on GPU (read
  at the same boundary copy).
A blended seed runs behind ``isolate``: an autograd node whose backward can
neither raise into the host's backward nor hand it a non-finite gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class Fault:
    """One seed's failure, as found."""

    seed: int
    reason: str


@dataclass(slots=True)
class FaultLog:
    """What one site saw during the current step; cleared at the boundary."""

    found: dict[int, str] = field(default_factory=dict)
    """Faults known on the host already (exceptions, CPU latency): seed → reason."""
    _flags: dict[tuple[tuple[tuple[int, ...], ...], str], torch.Tensor] = field(
        default_factory=dict
    )
    timings: list[tuple[list[int], torch.cuda.Event, torch.cuda.Event]] = field(
        default_factory=list
    )
    blended_fault: bool = False
    """A fault touched a group whose output the host saw this step (rerun needed)."""

    def flag(self, owners: list[list[int]], ok: torch.Tensor, what: str) -> None:
        """Keep device flag ``ok[i]`` vouching for seeds ``owners[i]``. Repeated
        forwards (accumulation, evaluation) AND into one tensor: memory stays
        bounded however many forwards a step holds."""
        key = (tuple(tuple(o) for o in owners), what)
        prev = self._flags.get(key)
        self._flags[key] = ok if prev is None else prev & ok

    @property
    def flags(self) -> list[tuple[list[list[int]], torch.Tensor, str]]:
        """(owners, ok, what failed) for every flag of the step."""
        return [([list(o) for o in own], ok, what) for (own, what), ok in self._flags.items()]

    def add(self, seeds: list[int], reason: str) -> None:
        for s in seeds:
            self.found.setdefault(s, reason)

    def clear(self) -> None:
        self.found.clear()
        self._flags.clear()
        self.timings.clear()
        self.blended_fault = False


def all_finite_rows(t: torch.Tensor) -> torch.Tensor:
    """``[S, ...] → bool[S]``: row s has no NaN/Inf. On device, no sync."""
    return torch.isfinite(t).flatten(1).all(dim=1)


def grads_finite(
    seeds: list[int], params_per_seed: list[list[torch.Tensor]]
) -> tuple[list[list[int]], torch.Tensor] | None:
    """One ok flag per existing gradient (None grads are fine), with the seed
    owning it: a fused max-norm over all gradients, on device, no sync."""
    grads: list[torch.Tensor] = []
    owners: list[list[int]] = []
    for seed, params in zip(seeds, params_per_seed, strict=True):
        for p in params:
            if p.grad is not None:
                grads.append(p.grad)
                owners.append([seed])
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads, float("inf")))
    return owners, torch.isfinite(norms)


class SeedTimer:
    """Times one seed (or group) forward: wall clock on CPU, events on CUDA."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda = enabled and device.type == "cuda"
        self.enabled = enabled
        self._t0 = 0.0
        self._start: torch.cuda.Event | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self, log: FaultLog, seeds: list[int], budget: float) -> bool:
        """Record the timing; True if known (on CPU) to be over ``budget`` now."""
        if not self.enabled:
            return False
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            assert self._start is not None
            log.timings.append((seeds, self._start, end))
            return False
        elapsed = time.perf_counter() - self._t0
        if elapsed > budget:
            log.add(seeds, f"latency {elapsed * 1e3:.1f} ms over budget {budget * 1e3:.1f} ms")
            return True
        return False


BackwardReport = Callable[[torch.Tensor | None, BaseException | None], None]


class _Isolated(torch.autograd.Function):
    """Runs ``branch(x)`` on a private copy of the host activation; backward
    runs the branch's graph inside a try and masks a non-finite input grad."""

    @staticmethod
    def forward(ctx, h, branch, report, *params):  # type: ignore[no-untyped-def]
        with torch.enable_grad():
            x = h.detach().requires_grad_(bool(ctx.needs_input_grad[0]))
            out = branch(x)
        ctx.inner = (x, out, params, report)
        return out.detach()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        x, out, params, report = ctx.inner
        ctx.inner = None
        wanted = [x] if x.requires_grad else []
        wanted += [p for p in params if p.requires_grad]
        none_params: list[torch.Tensor | None] = [None] * len(params)
        if not wanted or not out.requires_grad:
            return (None, None, None, *none_params)
        try:
            grads = list(torch.autograd.grad(out, wanted, g, allow_unused=True))
        except Exception as exc:
            report(None, exc)
            gx0 = torch.zeros_like(x) if x.requires_grad else None
            return (gx0, None, None, *none_params)
        gx = grads.pop(0) if x.requires_grad else None
        if gx is not None:
            ok = torch.isfinite(gx).all()
            gx = torch.where(ok, gx, 0.0)
            report(ok, None)
        it = iter(grads)
        param_grads = [next(it) if p.requires_grad else None for p in params]
        return (gx, None, None, *param_grads)


def isolate(
    h: torch.Tensor,
    branch: Callable[[torch.Tensor], torch.Tensor],
    report: BackwardReport,
    params: list[torch.Tensor],
) -> torch.Tensor:
    """``branch(h)`` as one autograd node the host's backward can trust."""
    out: torch.Tensor = _Isolated.apply(h, branch, report, *params)
    return out
