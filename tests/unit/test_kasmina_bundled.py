"""Every bundled blueprint as a seed kernel: batched (vmap) seeds, function-
preserving grafting (zero-initialised output projections), clean gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.compile.reference import build_module
from esper.ir import bundled
from esper.kasmina import KasminaConfig, SeedState, add_seed_sites
from esper.kasmina.batching import Mode

S = SeedState


class Affine(nn.Module):
    """A shape-agnostic host layer with parameters, so the site's activation
    carries a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.5))
        self.b = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + self.b


@pytest.mark.parametrize("name", sorted(bundled()))
def test_bundled_blueprint_runs_batched_and_grafts_function_preserving(name: str) -> None:
    ir = bundled()[name]
    schema = ir.inputs[0].schema
    torch.manual_seed(0)
    host = nn.Sequential(Affine(), Affine())
    kas = add_seed_sites(
        host, {"0": schema}, seeds_per_site=2,
        config=KasminaConfig(train_steps=None, stabilize_steps=None, graft_steps=2),
    )
    for _ in range(2):
        kas.offer_kernel("0", None, ir.canonical_hash(), lambda d: build_module(ir, device=d))
    kas.step_boundary(0)
    kas.wait_for_loads()
    kas.step_boundary(1)
    for k in range(2):
        kas.transition("0", k, S.GRAFTING, "test")
    shape = [2 if d == "B" else 3 if isinstance(d, str) else d for d in schema.shape]
    x = torch.randn(shape)
    (group,) = kas.site("0").running
    assert group.mode is Mode.BLEND and group.batched
    out = host(x)
    with torch.no_grad():
        kas.close()
        plain = host(x)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)  # zero-init: preserving
    out.square().mean().backward()
    report = kas.check_faults(2)
    assert not report.culled
    assert group.batched  # vmap handled the kernel: no fallback to a loop
    grads = [p.grad for k in range(2) for p in kas.site("0").module_of(k).parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
