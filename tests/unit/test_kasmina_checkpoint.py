"""Checkpoint → resume into a fresh host: same outputs, same losses after."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from esper.kasmina import Kasmina, KasminaConfig, SeedState
from esper.kasmina.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from tests.unit.kasmina_kit import (
    Host,
    closure_for,
    data,
    germinate,
    ir_factory,
    make,
    to_state,
)

S = SeedState
CFG = KasminaConfig(train_steps=None, graft_steps=3, stabilize_steps=None, embargo_steps=50)
FACTORIES = {"wide": ir_factory(zero_out=False), "zero": ir_factory()}


def _train(kas: Kasmina, opt: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    closure = closure_for(kas.host, opt, *data())
    return [kas.train_step(closure, opt, kas.step + 1).detach() for _ in range(steps)]


def test_resume_gives_identical_outputs_and_losses(tmp_path: Path) -> None:
    host, kas, _ = make(config=CFG)
    opt = torch.optim.Adam(host.parameters(), lr=1e-2)
    x, _ = data()
    germinate(kas, "blocks.0", 0, "wide", FACTORIES["wide"])
    to_state(kas, "blocks.0", 0, S.STABILIZATION)
    _train(kas, opt, 3)
    kas.transition("blocks.0", 0, S.FOSSILIZED, "test")  # its params join opt
    germinate(kas, "blocks.0", 1, "wide", FACTORIES["wide"])
    germinate(kas, "blocks.1", 2, "zero", FACTORIES["zero"])
    germinate(kas, "blocks.1", 3, "zero", FACTORIES["zero"])
    germinate(kas, "blocks.1", 0, "wide", FACTORIES["wide"])
    to_state(kas, "blocks.0", 1, S.GRAFTING)
    to_state(kas, "blocks.1", 0, S.STABILIZATION)
    kas.cull("blocks.1", 3, "test")
    _train(kas, opt, 2)
    states = {(s, k): kas.state_of(s, k) for s in ("blocks.0", "blocks.1") for k in range(4)}
    assert {S.FOSSILIZED, S.GRAFTING, S.TRAINING, S.CULLED} <= set(states.values())

    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, kas)
    with torch.no_grad():
        out_at_save = host(x)
    after = _train(kas, opt, 6)
    later_states = {(s, k): kas.state_of(s, k) for (s, k) in states}
    kas.close()

    # Fresh process state: another init, another RNG position.
    torch.manual_seed(1234)
    host2 = Host()
    _, kas2, events2 = make(config=CFG, host=host2)
    opt2 = torch.optim.Adam(host2.parameters(), lr=1e-2)
    resolved: list[str] = []

    def resolve(key: str):  # type: ignore[no-untyped-def]
        resolved.append(key)
        return FACTORIES[key]

    step = load_checkpoint(path, kas2, resolve, host_optimizer=opt2)
    assert step == kas.step - 6
    assert sorted(set(resolved)) == ["wide", "zero"]
    assert {(s, k): kas2.state_of(s, k) for (s, k) in states} == states
    for layer in kas2.sites.values():
        assert layer.state.mirror_matches_device()
    with torch.no_grad():
        assert torch.equal(host2(x), out_at_save)
    again = _train(kas2, opt2, 6)
    assert all(torch.equal(a, b) for a, b in zip(after, again, strict=True))
    assert {(s, k): kas2.state_of(s, k) for (s, k) in states} == later_states
    assert events2  # the resumed run keeps emitting events


def test_checkpoint_is_safetensors_with_json_metadata(tmp_path: Path) -> None:
    _, kas, _ = make(config=CFG)
    germinate(kas, "blocks.0", 1, "zero", FACTORIES["zero"])
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, kas)
    meta = read_metadata(path)
    assert meta["sites"]["blocks.0"]["slots"][1] == {
        "state": "TRAINING", "steps": 0, "kernel_slot": 0, "cache_key": "zero"
    }
    assert meta["sites"]["blocks.0"]["kernels"] == ["zero"]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        json.loads(f.metadata()["esper.kasmina"])
    assert "host/blocks.0.fc.weight" in keys
    assert "kasmina/layers.blocks__0.state.lifecycle" in keys
    assert any(k.startswith("kasmina/layers.blocks__0.seeds.1.") for k in keys)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"[:8]  # not a pickle
    with pytest.raises(ValueError, match="fresh"):
        load_checkpoint(path, kas, FACTORIES.__getitem__)


def test_a_seed_still_loading_at_save_loads_again_on_resume(tmp_path: Path) -> None:
    def slow(device: torch.device) -> torch.nn.Module:
        time.sleep(0.3)
        return FACTORIES["zero"](device)

    _, kas, _ = make(config=CFG)
    kas.offer_kernel("blocks.1", 2, "zero", slow)
    kas.step_boundary(0)
    assert kas.state_of("blocks.1", 2) is S.GERMINATED
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, kas)
    kas.close()
    _, kas2, _ = make(config=CFG, seed=5)
    load_checkpoint(path, kas2, lambda key: slow)
    assert kas2.state_of("blocks.1", 2) is S.GERMINATED
    kas2.wait_for_loads()
    kas2.step_boundary(1)
    assert kas2.state_of("blocks.1", 2) is S.TRAINING
    kas2.close()
