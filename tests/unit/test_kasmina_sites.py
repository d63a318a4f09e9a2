"""Seed sites on a plain host: transparency, bit-for-bit TRAINING, blending,
batched seeds, fossilization into the host's optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from esper.kasmina import KasminaConfig, SeedState, SiteSchema, add_seed_sites, move_params
from esper.kasmina.batching import Mode
from tests.unit.kasmina_kit import (
    D,
    Host,
    closure_for,
    data,
    germinate,
    ir_factory,
    make,
    residual_mlp_ir,
    to_state,
)

S = SeedState


def test_host_keeps_its_state_dict_and_parameters() -> None:
    torch.manual_seed(0)
    host = Host()
    keys = list(host.state_dict())
    params = list(host.parameters())
    kas = add_seed_sites(host, {"blocks.0": (("B", D), "float32")}, seeds_per_site=2)
    germinate(kas, "blocks.0", 0, "k", ir_factory())
    assert list(host.state_dict()) == keys
    assert list(host.parameters()) == params
    seed_ids = {id(p) for p in kas.parameters()}
    assert seed_ids and not seed_ids & {id(p) for p in params}
    with pytest.raises(AttributeError):
        add_seed_sites(host, {"blocks.9": (("B", D), "float32")})


def test_schema_accepts_ir_schemas_and_rejects_misfit_activations() -> None:
    ir = residual_mlp_ir()
    assert SiteSchema.of(ir.inputs[0].schema) == SiteSchema(("B", D), torch.float32)
    torch.manual_seed(0)
    host = Host()
    kas = add_seed_sites(host, {"blocks.0": (("B", 8), "float32")}, seeds_per_site=1)
    germinate(kas, "blocks.0", 0, "k", ir_factory(d=8))
    with pytest.raises(ValueError, match="does not fit"):
        host(torch.randn(4, D))


def test_training_seed_leaves_host_output_and_grads_bit_for_bit_unchanged() -> None:
    host, kas, _ = make()
    plain = copy.deepcopy(host)
    germinate(kas, "blocks.0", None, "a", ir_factory(zero_out=False))
    germinate(kas, "blocks.0", None, "a", ir_factory(zero_out=False))
    germinate(kas, "blocks.1", None, "b", ir_factory(zero_out=False))
    assert kas.state_of("blocks.0", 1) is S.TRAINING
    x, y = data()
    out = host(x)
    ref = plain(x)
    assert torch.equal(out, ref)
    ((out - y) ** 2).mean().backward()
    ((ref - y) ** 2).mean().backward()
    for p, q in zip(host.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    kas.train_seeds()
    seed_grads = [p.grad for p in kas.site("blocks.0").module_of(0).parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in seed_grads)


def test_training_seed_learns_the_residual_target() -> None:
    cfg = KasminaConfig(train_steps=None, stabilize_steps=None)
    host, kas, _ = make(config=cfg, sites=("blocks.1",))
    opt = torch.optim.SGD(host.parameters(), lr=0.0)  # frozen host: a fixed target
    x, y = data()
    germinate(kas, "blocks.1", 0, "k", ir_factory())
    losses = []
    for step in range(60):
        kas.train_step(closure_for(host, opt, x, y), opt, step)
        losses.append(float(kas.site("blocks.1").seed_losses[0]))
    assert losses[-1] < 0.2 * losses[1]


def test_grafting_blends_alpha_times_the_seed_delta() -> None:
    cfg = KasminaConfig(train_steps=None, stabilize_steps=None, graft_steps=4)
    host, kas, _ = make(config=cfg, sites=("blocks.0",))
    germinate(kas, "blocks.0", 1, "k", ir_factory(zero_out=False))
    to_state(kas, "blocks.0", 1, S.GRAFTING)
    seed = kas.site("blocks.0").module_of(1)
    x, _ = data()
    with torch.no_grad():
        h = host.blocks[0](x)  # hooked: includes the blend
        kas.close()  # unhook
        h0 = host.blocks[0](x)
        expected = h0 + 0.25 * (seed(h0) - h0)
    torch.testing.assert_close(h, expected)
    assert not torch.equal(h, h0)


def test_seeds_sharing_a_kernel_run_batched_like_separate_calls() -> None:
    host, kas, _ = make(sites=("blocks.0",), seeds=4)
    for _ in range(4):
        kas.offer_kernel("blocks.0", None, "same", ir_factory(zero_out=False))
    kas.step_boundary(0)
    kas.wait_for_loads()
    kas.step_boundary(1)
    for k in range(4):
        to_state(kas, "blocks.0", k, S.GRAFTING)
    layer = kas.site("blocks.0")
    (group,) = layer.running
    assert group.mode is Mode.BLEND and group.batched and group.seeds == [0, 1, 2, 3]
    x, _ = data()
    h = host.blocks[0].fc(x).tanh() + x
    batched = group.run(h)
    separate = torch.stack([layer.module_of(k)(h) for k in range(4)])
    torch.testing.assert_close(batched, separate, rtol=1e-6, atol=1e-6)
    # and gradients reach each seed's own parameters
    batched.square().sum().backward()
    assert all(p.grad is not None for k in range(4) for p in layer.module_of(k).parameters())


def test_fossil_joins_host_optimizer_with_its_adam_state() -> None:
    cfg = KasminaConfig(train_steps=None, stabilize_steps=None, graft_steps=2)
    host, kas, events = make(config=cfg, sites=("blocks.0",))
    opt = torch.optim.Adam(host.parameters(), lr=1e-3)
    x, y = data()
    germinate(kas, "blocks.0", 0, "k", ir_factory())
    kas.transition("blocks.0", 0, S.GRAFTING, "test")
    for _ in range(3):
        kas.train_step(closure_for(host, opt, x, y), opt, kas.step + 1)
    assert kas.state_of("blocks.0", 0) is S.STABILIZATION
    params = list(kas.site("blocks.0").module_of(0).parameters())
    seed_opt = kas.seed_optimizer.optimizer
    assert seed_opt is not None
    before = {id(p): (seed_opt.state[p]["exp_avg"].clone(), int(seed_opt.state[p]["step"]))
              for p in params}
    kas.transition("blocks.0", 0, S.FOSSILIZED, "stable")
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in params)
    assert all(p not in seed_opt.state for p in params)
    for p in params:
        exp_avg, step = before[id(p)]
        assert torch.equal(opt.state[p]["exp_avg"], exp_avg) and int(opt.state[p]["step"]) == step
    kas.train_step(closure_for(host, opt, x, y), opt, kas.step + 1)
    assert all(int(opt.state[p]["step"]) == before[id(p)][1] + 1 for p in params)
    assert [e.event for e in events][-1] == "fossilized"
    assert kas.site("blocks.0").running[0].mode is Mode.FOSSIL


def test_move_params_carries_adam_moments_exactly() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    twin = copy.deepcopy(b)
    src = torch.optim.Adam(b.parameters(), lr=1e-2)
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, o in ((b, src), (twin, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    dst = torch.optim.Adam(a.parameters(), lr=1e-2)
    move_params(b.parameters(), src, dst)
    assert src.param_groups == [] and not src.state
    for _ in range(2):
        for m, o in ((b, dst), (twin, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(b.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # same trajectory as if never moved: moments kept
    with pytest.raises(ValueError, match="already"):
        move_params(b.parameters(), None, dst)
    with pytest.raises(ValueError, match="same optimizer class"):
        move_params(b.parameters(), dst, torch.optim.SGD(a.parameters(), lr=0.1))


class _InPlaceHost(torch.nn.Module):
    """Edits a site's activation in place after the site (ResNet's ``out += identity``)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        h += x
        return self.head(torch.relu(h))


def test_host_editing_the_activation_in_place_does_not_hurt_a_training_seed() -> None:
    torch.manual_seed(0)
    host = _InPlaceHost()
    kas = add_seed_sites(host, {"block": (("B", D), "float32")}, seeds_per_site=1)
    germinate(kas, "block", 0, "k", ir_factory())
    opt = torch.optim.SGD(host.parameters(), lr=0.01)
    x, y = data()
    for step in range(kas.step + 1, kas.step + 4):
        kas.train_step(closure_for(host, opt, x, y), opt, step)
    assert kas.state_of("block", 0) is S.TRAINING
    assert 0 in kas.site("block").seed_losses
