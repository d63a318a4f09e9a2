"""Graceful degradation: planted faulty kernels are culled at once and the host
trains exactly as if they never existed; no NaN ever reaches the host."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esper.kasmina import KasminaConfig, SeedEvent, SeedState
from tests.unit.kasmina_kit import (
    Armed,
    Faulty,
    closure_for,
    data,
    germinate,
    ir_factory,
    make,
    to_state,
)

S = SeedState
KINDS = ["raise", "nan", "nan_grad", "raise_grad", "slow"]
WHY = {
    "raise": "forward raised",
    "nan": "non-finite",
    "nan_grad": "non-finite",
    "raise_grad": "raised",
    "slow": "latency",
}


@pytest.mark.parametrize("phase", [S.TRAINING, S.GRAFTING, S.STABILIZATION])
@pytest.mark.parametrize("kind", KINDS)
def test_faulty_seed_is_culled_and_host_trains_as_if_it_never_existed(
    kind: str, phase: SeedState
) -> None:
    cfg = KasminaConfig(
        train_steps=None, stabilize_steps=None, graft_steps=2, max_seed_latency_s=0.05
    )
    host, kas, events = make(config=cfg)
    plain = copy.deepcopy(host)
    opt = torch.optim.Adam(host.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    x, y = data()
    armed = Armed()
    germinate(kas, "blocks.0", 0, "bad", lambda d: Faulty(kind, armed).to(d))
    germinate(kas, "blocks.1", 0, "good", ir_factory(zero_out=False))  # a bystander, TRAINING
    to_state(kas, "blocks.0", 0, phase)
    armed.on = True
    first = kas.step + 1
    for step in range(first, first + 3):
        loss = kas.train_step(closure_for(host, opt, x, y), opt, step)
        ref_loss = closure_for(plain, ref_opt, x, y)()
        ref_opt.step()
        assert torch.equal(loss, ref_loss)
        for p, q in zip(host.parameters(), plain.parameters(), strict=True):
            assert torch.isfinite(p).all()
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])
    culled = [e for e in events if isinstance(e, SeedEvent) and e.event == "culled"]
    assert len(culled) == 1
    assert (culled[0].site, culled[0].seed, culled[0].from_state, culled[0].step) == (
        "blocks.0", 0, phase, first
    )
    assert WHY[kind] in culled[0].reason
    assert kas.site("blocks.0").module_of(0) is None
    assert kas.state_of("blocks.1", 0) is S.TRAINING  # the healthy seed lives on


def test_one_broken_seed_in_a_batched_group_is_the_only_one_culled() -> None:
    cfg = KasminaConfig(train_steps=None, stabilize_steps=None, graft_steps=2)
    host, kas, _ = make(config=cfg, sites=("blocks.0",), seeds=3)
    opt = torch.optim.Adam(host.parameters(), lr=1e-2)
    x, y = data()
    for _ in range(3):
        kas.offer_kernel("blocks.0", None, "k", ir_factory(zero_out=False))
    kas.step_boundary(0)
    kas.wait_for_loads()
    kas.step_boundary(1)
    for k in range(3):
        to_state(kas, "blocks.0", k, S.GRAFTING)
    assert kas.site("blocks.0").running[0].batched
    with torch.no_grad():  # a kernel whose parameters went bad: only its rows are NaN
        next(iter(kas.site("blocks.0").module_of(1).parameters())).fill_(float("inf"))
    kas.train_step(closure_for(host, opt, x, y), opt, 2)
    assert [kas.state_of("blocks.0", k) for k in range(3)] == [S.GRAFTING, S.CULLED, S.GRAFTING]
    assert all(torch.isfinite(p).all() for p in host.parameters())


class _NoVmap(nn.Module):
    """Python control flow on its own parameters: fine alone, not under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc.weight.sum() > 1e9:
            return x
        return x + self.fc(x)


def test_a_kernel_vmap_cannot_batch_runs_seed_by_seed_unharmed() -> None:
    host, kas, events = make(sites=("blocks.0",), seeds=2)
    opt = torch.optim.Adam(host.parameters(), lr=1e-2)
    for _ in range(2):
        kas.offer_kernel("blocks.0", None, "k", lambda d: _NoVmap().to(d))
    kas.step_boundary(0)
    kas.wait_for_loads()
    kas.step_boundary(1)
    x, y = data()
    for step in range(2, 5):
        kas.train_step(closure_for(host, opt, x, y), opt, step)
    assert [kas.state_of("blocks.0", k) for k in range(2)] == [S.TRAINING, S.TRAINING]
    assert not kas.site("blocks.0").running[0].batched
    assert all(e.event != "culled" for e in events if isinstance(e, SeedEvent))
    assert all(isinstance(kas.site("blocks.0").seed_losses[k], torch.Tensor) for k in range(2))
