"""Shared pieces of the Kasmina tests: a small host, kernels (healthy and
planted-faulty) and a loop that drives seeds through their lifecycle."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from esper.compile.reference import build_module
from esper.ir import BlueprintIR
from esper.kasmina import Kasmina, KasminaConfig, SeedState, add_seed_sites

D = 16


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Host(nn.Module):
    """Residual MLP; sites go at ``blocks.<i>``."""

    def __init__(self, d: int = D, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@cache
def residual_mlp_ir(d: int = D, hidden: int = 32, zero_out: bool = True) -> BlueprintIR:
    """The ARCHITECTURE.md example blueprint, at width ``d``."""
    y_attrs: dict[str, object] = {"out_features": d}
    if zero_out:
        y_attrs["init"] = "zeros"
    return BlueprintIR.from_json(
        json.dumps(
            {
                "schema_version": 1,
                "name": "residual_mlp",
                "inputs": [{"name": "x", "shape": ["B", d], "dtype": "float32"}],
                "nodes": [
                    {"id": "h", "op": "linear", "inputs": ["x"], "attrs": {"out_features": hidden}},
                    {"id": "a", "op": "gelu", "inputs": ["h"]},
                    {"id": "y", "op": "linear", "inputs": ["a"], "attrs": y_attrs},
                    {"id": "out", "op": "add", "inputs": ["x", "y"]},
                ],
                "outputs": ["out"],
            }
        )
    )


def ir_factory(d: int = D, zero_out: bool = True) -> Callable[[torch.device], nn.Module]:
    """A ModuleFactory from the reference backend (what a loaded artifact gives)."""
    ir = residual_mlp_ir(d, zero_out=zero_out)
    return lambda device: build_module(ir, device=device)


class Armed:
    """A switch the planted faults read: they behave until armed."""

    def __init__(self) -> None:
        self.on = False


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return torch.full_like(g, float("nan"))


class _RaiseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        raise RuntimeError("planted: backward raises")


class Faulty(nn.Module):
    """A residual kernel with a planted fault once ``armed``: ``raise``, ``nan``
    (NaN output), ``nan_grad`` (NaN gradients in backward), ``raise_grad``, ``slow``."""

    def __init__(self, kind: str, armed: Armed, d: int = D) -> None:
        super().__init__()
        self.kind = kind
        self.armed = armed
        self.fc = nn.Linear(d, d)
        nn.init.normal_(self.fc.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.armed.on:
            if self.kind == "raise":
                raise RuntimeError("planted: forward raises")
            if self.kind == "nan":
                y = y * float("nan")
            elif self.kind == "nan_grad":
                y = _NaNGrad.apply(y)
            elif self.kind == "raise_grad":
                y = _RaiseGrad.apply(y)
            elif self.kind == "slow":
                time.sleep(0.1)
        return x + y


def make(
    sites: tuple[str, ...] = ("blocks.0", "blocks.1"),
    seeds: int = 4,
    config: KasminaConfig | None = None,
    seed: int = 0,
    host: Host | None = None,
) -> tuple[Host, Kasmina, list[object]]:
    """A seeded host with sites; the events list collects what the sink gets."""
    torch.manual_seed(seed)
    host = host or Host()
    events: list[object] = []
    kas = add_seed_sites(
        host,
        {s: (("B", D), torch.float32) for s in sites},
        seeds_per_site=seeds,
        config=config or KasminaConfig(train_steps=None, stabilize_steps=None),
        sink=events.append,
    )
    return host, kas, events


def data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(n, 1, generator=g)


def closure_for(
    host: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = ((host(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def germinate(
    kas: Kasmina, site: str, seed: int | None, key: str, factory: Callable[..., nn.Module]
) -> None:
    """Offer a kernel and wait until it is TRAINING (two boundaries, waiting on the load)."""
    kas.offer_kernel(site, seed, key, factory)
    kas.step_boundary(kas.step + 1)
    kas.wait_for_loads()
    kas.step_boundary(kas.step + 1)


def to_state(kas: Kasmina, site: str, seed: int, state: SeedState) -> None:
    """Walk a TRAINING seed forward to ``state`` with controller transitions."""
    path = [SeedState.GRAFTING, SeedState.STABILIZATION, SeedState.FOSSILIZED]
    for nxt in path[: path.index(state) + 1] if state in path else []:
        kas.transition(site, seed, nxt, "test")
