"""Kasmina on CUDA: no host sync in the forward/backward of dormant and active
sites, and planted faults culled with the host bit-for-bit a seedless host."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch

from esper.kasmina import KasminaConfig, SeedEvent, SeedState
from tests.unit.kasmina_kit import (
    Armed,
    Faulty,
    Host,
    closure_for,
    data,
    germinate,
    ir_factory,
    make,
    to_state,
)

pytestmark = pytest.mark.gpu
S = SeedState
CUDA = torch.device("cuda")


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Any synchronising CUDA call inside raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_forward_backward_and_quiet_boundaries_never_sync() -> None:
    cfg = KasminaConfig(train_steps=None, stabilize_steps=None, graft_steps=10)
    host, kas, _ = make(
        sites=("blocks.0", "blocks.1", "blocks.2"), seeds=4, config=cfg, host=Host().to(CUDA)
    )
    opt = torch.optim.Adam(host.parameters(), lr=1e-3)
    x, y = (t.to(CUDA) for t in data())
    # dormant sites only
    with no_host_sync():
        out = host(x)
        ((out - y) ** 2).mean().backward()
    # blocks.0: 2 TRAINING seeds (one vmapped group); blocks.1: 2 GRAFTING + 1 fossil;
    # blocks.2: dormant
    for site, n in (("blocks.0", 2), ("blocks.1", 3)):
        for _ in range(n):
            kas.offer_kernel(site, None, "k", ir_factory(zero_out=False))
    kas.step_boundary(0)
    kas.wait_for_loads()
    kas.step_boundary(1)
    for k in range(3):
        to_state(kas, "blocks.1", k, S.FOSSILIZED if k == 2 else S.GRAFTING)
    closure = closure_for(host, opt, x, y)
    kas.train_step(closure, opt, 2)  # warm-up: lazy inits
    for step in range(3, 6):
        with no_host_sync():
            opt.zero_grad(set_to_none=True)
            kas.seed_optimizer.zero_grad()
            out = host(x)
            ((out - y) ** 2).mean().backward()
            kas.train_seeds()
        report = kas.check_faults(step)  # the step's one sync, by design
        assert not report.culled
        opt.step()
        kas.seed_optimizer.step()
        with no_host_sync():
            kas.step_boundary(step)  # no transition: device-side tick only
    assert kas.state_of("blocks.1", 0) is S.GRAFTING
    assert abs(float(kas.site("blocks.1").state.alpha[0]) - 0.5) < 1e-6  # (4+1)/10
    assert all(layer.state.mirror_matches_device() for layer in kas.sites.values())
    kas.close()


@pytest.mark.parametrize("kind", ["raise", "nan", "nan_grad", "raise_grad", "slow"])
def test_faulty_seed_on_gpu_is_culled_and_host_matches_seedless_host(kind: str) -> None:
    cfg = KasminaConfig(
        train_steps=None, stabilize_steps=None, graft_steps=2, max_seed_latency_s=0.05
    )
    host, kas, events = make(config=cfg, host=Host().to(CUDA))
    plain = copy.deepcopy(host)
    opt = torch.optim.Adam(host.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    x, y = (t.to(CUDA) for t in data())
    armed = Armed()
    germinate(kas, "blocks.0", 0, "bad", lambda d: Faulty(kind, armed).to(d))
    to_state(kas, "blocks.0", 0, S.GRAFTING)
    armed.on = True
    for step in range(kas.step + 1, kas.step + 4):
        kas.train_step(closure_for(host, opt, x, y), opt, step)
        closure_for(plain, ref_opt, x, y)()
        ref_opt.step()
    for p, q in zip(host.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    culled = [e for e in events if isinstance(e, SeedEvent) and e.event == "culled"]
    assert len(culled) == 1 and culled[0].from_state is S.GRAFTING
