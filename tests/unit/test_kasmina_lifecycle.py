"""The seed lifecycle: the transition table, the schedule at step boundaries,
the events, and the GPU-resident state mirroring the Python side."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from esper.errors import EsperError, IllegalTransition
from esper.kasmina import TRANSITIONS, KasminaConfig, SeedEvent, SeedState, check_transition
from tests.unit.kasmina_kit import Host, closure_for, data, germinate, ir_factory, make

S = SeedState


def test_transition_table_is_the_architecture_one() -> None:
    main = [S.DORMANT, S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.FOSSILIZED]
    for src, dst in itertools.pairwise(main):
        check_transition("s", 0, src, dst)
    for live in (S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION):
        check_transition("s", 0, live, S.CULLED)
    check_transition("s", 0, S.CULLED, S.DORMANT)
    assert TRANSITIONS[S.FOSSILIZED] == frozenset()
    allowed = {(a, b) for a, bs in TRANSITIONS.items() for b in bs}
    assert len(allowed) == 5 + 4 + 1


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.DORMANT, S.TRAINING),
        (S.TRAINING, S.FOSSILIZED),
        (S.FOSSILIZED, S.CULLED),
        (S.CULLED, S.GERMINATED),
        (S.DORMANT, S.CULLED),
        (S.GRAFTING, S.TRAINING),
    ],
)
def test_illegal_transitions_raise(src: SeedState, dst: SeedState) -> None:
    with pytest.raises(IllegalTransition, match=f"{src.name} → {dst.name}"):
        check_transition("blocks.0", 3, src, dst)
    assert issubclass(IllegalTransition, EsperError)
    assert issubclass(IllegalTransition, RuntimeError)


def test_controller_illegal_transition_raises_and_changes_nothing() -> None:
    _, kas, events = make()
    with pytest.raises(IllegalTransition):
        kas.transition("blocks.0", 0, S.GRAFTING, "skip ahead")
    assert kas.state_of("blocks.0", 0) is S.DORMANT
    assert events == []


def test_full_schedule_with_events_alpha_ramp_and_device_mirror() -> None:
    cfg = KasminaConfig(train_steps=3, graft_steps=4, stabilize_steps=2, embargo_steps=2)
    host, kas, events = make(config=cfg)
    opt = torch.optim.Adam(host.parameters(), lr=1e-2)
    x, y = data()
    closure = closure_for(host, opt, x, y)
    layer = kas.site("blocks.0")
    seen: list[tuple[SeedState, float]] = []
    kas.offer_kernel("blocks.0", 2, "k-res", ir_factory(zero_out=False))
    for step in range(16):
        kas.train_step(closure, opt, step)
        if kas.state_of("blocks.0", 2) is S.GERMINATED:
            kas.wait_for_loads()  # make the test's timeline deterministic
        seen.append((kas.state_of("blocks.0", 2), float(layer.state.alpha[2])))
        assert layer.state.mirror_matches_device()
    states = [e.to_state for e in events if isinstance(e, SeedEvent)]
    assert states == [S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.FOSSILIZED]
    first = events[0]
    assert isinstance(first, SeedEvent)
    assert (first.site, first.seed, first.from_state, first.step) == ("blocks.0", 2, S.DORMANT, 0)
    assert first.cache_key == "k-res" and first.event == "germinated" and first.reason
    alphas = [a for s, a in seen if s is S.GRAFTING]
    assert alphas == [0.25, 0.5, 0.75, 1.0]  # the ramp: (s+1)/n over n = 4 steps
    assert all(a == 1.0 for s, a in seen if s in (S.STABILIZATION, S.FOSSILIZED))
    assert all(a == 0.0 for s, a in seen if s in (S.GERMINATED, S.TRAINING))
    steps = [e.step for e in events if isinstance(e, SeedEvent)]
    assert steps == sorted(steps)
    assert all(isinstance(e.as_dict()["to_state"], str) for e in events if isinstance(e, SeedEvent))


def test_cull_then_embargo_then_dormant_and_reusable() -> None:
    cfg = KasminaConfig(train_steps=None, stabilize_steps=None, embargo_steps=3)
    _, kas, events = make(config=cfg)
    germinate(kas, "blocks.1", 0, "k", ir_factory())
    assert kas.state_of("blocks.1", 0) is S.TRAINING
    kas.cull("blocks.1", 0, "validation loss worse")
    assert kas.state_of("blocks.1", 0) is S.CULLED
    assert kas.site("blocks.1").module_of(0) is None
    # During the embargo the slot takes no kernel: an offer for it is dropped.
    kas.offer_kernel("blocks.1", 0, "k", ir_factory())
    kas.step_boundary(kas.step + 1)
    assert kas.state_of("blocks.1", 0) is S.CULLED
    for _ in range(2):
        kas.step_boundary(kas.step + 1)
    assert kas.state_of("blocks.1", 0) is S.DORMANT
    last = events[-1]
    assert isinstance(last, SeedEvent) and last.reason == "embargo over"
    germinate(kas, "blocks.1", None, "k", ir_factory())
    assert kas.state_of("blocks.1", 0) is S.TRAINING


def test_any_slot_offer_picks_free_dormant_slots_in_order() -> None:
    _, kas, _ = make(seeds=2)
    for _ in range(3):
        kas.offer_kernel("blocks.0", None, "k", ir_factory())
    kas.step_boundary(0)
    assert [kas.state_of("blocks.0", k) for k in range(2)] == [S.GERMINATED, S.GERMINATED]
    kas.wait_for_loads()
    kas.step_boundary(1)
    assert [kas.state_of("blocks.0", k) for k in range(2)] == [S.TRAINING, S.TRAINING]
    with pytest.raises(IndexError):
        kas.offer_kernel("blocks.0", 5, "k", ir_factory())
    kas.close()


def test_a_kernel_that_fails_to_load_is_culled_with_the_reason() -> None:
    _, kas, events = make()

    def broken(device: torch.device) -> torch.nn.Module:
        raise OSError("artifact unreadable")

    def wrong_shape(device: torch.device) -> torch.nn.Module:
        return torch.nn.Linear(16, 8)

    kas.offer_kernel("blocks.0", 0, "bad", broken)
    kas.offer_kernel("blocks.0", 1, "misfit", wrong_shape)
    germinate_boundaries = 2
    for _ in range(germinate_boundaries):
        kas.wait_for_loads()
        kas.step_boundary(kas.step + 1)
    assert kas.state_of("blocks.0", 0) is S.CULLED
    assert kas.state_of("blocks.0", 1) is S.CULLED
    reasons = {e.seed: e.reason for e in events if isinstance(e, SeedEvent) and e.event == "culled"}
    assert "artifact unreadable" in reasons[0]
    assert "schema" in reasons[1]


def test_dormant_sites_leave_no_hook_on_the_host() -> None:
    host, kas, _ = make()
    assert all(len(b._forward_hooks) == 0 for b in host.blocks)
    germinate(kas, "blocks.0", 0, "k", ir_factory())
    assert len(host.blocks[0]._forward_hooks) == 1
    assert len(host.blocks[1]._forward_hooks) == 0
    kas.cull("blocks.0", 0, "done")
    assert len(host.blocks[0]._forward_hooks) == 0
    assert isinstance(host, Host)


def test_offers_from_other_threads_are_taken_at_the_boundary() -> None:
    _, kas, events = make(seeds=4)
    threads = [
        threading.Thread(target=kas.offer_kernel, args=("blocks.0", None, f"k{i}", ir_factory()))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events == []  # nothing moves between boundaries
    kas.step_boundary(0)
    assert sorted(e.cache_key for e in events if isinstance(e, SeedEvent)) == [
        "k0", "k1", "k2", "k3"
    ]
    assert {kas.state_of("blocks.0", k) for k in range(4)} == {S.GERMINATED}
    kas.wait_for_loads()
    kas.step_boundary(1)
    assert {kas.state_of("blocks.0", k) for k in range(4)} == {S.TRAINING}
    kas.close()
