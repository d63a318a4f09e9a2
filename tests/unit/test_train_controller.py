"""The growth policy and the kernel catalog, without servers: when the plateau
controller germinates, where, what, and when it keeps or culls a graft; which
kernels fit which sites; the demo's PNG writer."""

from __future__ import annotations

import zlib

import pytest
import torch

from esper.bus import events as ev
from esper.demo.png import Canvas
from esper.kasmina import SeedEvent, SeedState, SiteSchema
from esper.train.catalog import (
    KernelCatalog,
    KernelInfo,
    KernelStatus,
    fits,
    prefer_native,
)
from esper.train.controller import (
    Germinate,
    Observation,
    PlateauController,
    SeedView,
    Transition,
)

S = SeedState
SITE = SiteSchema.of((("B", 64), "float32"))


def kernel(key: str, *, target: str = "cpu", backend: str = "torch", bp: str | None = None,
           shape: tuple[int | str, ...] = ("N", 64), status: KernelStatus = KernelStatus.LOADED,
           ) -> KernelInfo:
    return KernelInfo(
        cache_key=key, kernel_id="id-" + key, blueprint_hash=bp or key * 8, target=target,
        backend=backend, dtype="float32",
        seed_schema=ev.TensorSpec(shape=shape, dtype="float32"), artifact_digest=None,
        artifact_location=None, name=key, status=status, factory=lambda d: torch.nn.Identity(),
    )


def obs(step: int, val: float, *, seeds: tuple[SeedView, ...] = (), free: int = 2,
        kernels: tuple[KernelInfo, ...] = (), signal: dict[str, float] | None = None,
        events: tuple[SeedEvent, ...] = ()) -> Observation:
    return Observation(
        step=step, val_loss=val, train_loss=val,
        site_signal=signal or {"stem": 1.0, "mid": 2.0}, seeds=seeds,
        free_slots={"stem": free, "mid": free},
        kernels={"stem": list(kernels), "mid": list(kernels)}, events=events,
    )


def test_fits_needs_rank_dtype_and_sizes() -> None:
    assert fits(ev.TensorSpec(shape=("B", 64), dtype="float32"), SITE)
    assert fits(ev.TensorSpec(shape=("N", "D"), dtype="float32"), SITE)  # generic kernel
    assert not fits(ev.TensorSpec(shape=(8, 64), dtype="float32"), SITE)  # fixed batch
    assert not fits(ev.TensorSpec(shape=("B", 128), dtype="float32"), SITE)
    assert not fits(ev.TensorSpec(shape=("B", 64), dtype="float16"), SITE)
    assert not fits(ev.TensorSpec(shape=("B", "T", 64), dtype="float32"), SITE)
    assert not fits(None, SITE)


def test_catalog_usable_skips_retired_and_retirement_sticks() -> None:
    cat = KernelCatalog()
    cat.announce(kernel("a"))
    cat.announce(kernel("b", shape=("B", 128)))
    cat.announce(kernel("c", status=KernelStatus.LOADING))
    assert [k.cache_key for k in cat.usable(SITE)] == ["a"]
    cat.retire("a", "operator")
    assert cat.usable(SITE) == []
    cat.update("a", status=KernelStatus.LOADED)  # a late load cannot un-retire it
    assert cat.get("a").status is KernelStatus.RETIRED  # type: ignore[union-attr]
    cat.retire("z", "before it was announced")
    assert not cat.announce(kernel("a"))
    cat.announce(kernel("z"))
    assert cat.get("z").status is KernelStatus.RETIRED  # type: ignore[union-attr]


def test_prefer_native_keeps_one_kernel_per_blueprint() -> None:
    portable = kernel("t", target="cpu", backend="torch", bp="x" * 64)
    native = kernel("g", target="cuda:sm_90", backend="triton", bp="x" * 64)
    other = kernel("o", target="cpu", backend="torch", bp="y" * 64)
    assert prefer_native([portable, native, other], "cuda:sm_90") == [native, other]
    assert prefer_native([portable, native, other], "cpu") == [portable, other]


def test_no_germination_before_warmup_or_while_improving() -> None:
    c = PlateauController(warmup_steps=100, patience=2, min_improvement=0.1)
    k = kernel("a")
    assert c.decide(obs(49, 1.0, kernels=(k,))) == []
    assert c.decide(obs(99, 0.8, kernels=(k,))) == []
    assert c.decide(obs(149, 0.6, kernels=(k,))) == []  # 25% better: not a plateau
    assert c.decide(obs(199, 0.5, kernels=(k,))) == []


def test_plateau_germinates_at_the_site_with_the_largest_signal() -> None:
    c = PlateauController(warmup_steps=0, patience=2, min_improvement=0.1)
    k = kernel("a")
    for step, val in ((49, 1.0), (99, 0.99)):
        assert c.decide(obs(step, val, kernels=(k,))) == []
    (d,) = c.decide(obs(149, 0.98, kernels=(k,), signal={"stem": 3.0, "mid": 1.0}))
    assert isinstance(d, Germinate) and (d.site, d.cache_key) == ("stem", "a")
    assert "plateau" in d.reason


def test_full_site_or_no_kernel_means_no_germination() -> None:
    c = PlateauController(warmup_steps=0, patience=1, min_improvement=0.5)
    c.decide(obs(49, 1.0))
    assert c.decide(obs(99, 1.0)) == []  # no kernel
    assert c.decide(obs(149, 1.0, kernels=(kernel("a"),), free=0)) == []


def test_a_live_seed_blocks_growth_and_is_kept_or_culled_on_its_val_loss() -> None:
    c = PlateauController(warmup_steps=0, patience=1, min_improvement=0.5, stabilize_steps=20,
                          cull_tolerance=0.02, abort_factor=1.5)
    k = kernel("a")
    training = SeedView("mid", 0, S.TRAINING, 5, "a")
    assert c.decide(obs(49, 1.0, seeds=(training,), kernels=(k,))) == []
    assert c.decide(obs(99, 1.0, seeds=(training,), kernels=(k,))) == []
    grafting = SeedView("mid", 0, S.GRAFTING, 5, "a")
    assert c.decide(obs(149, 1.01, seeds=(grafting,), kernels=(k,))) == []
    early = SeedView("mid", 0, S.STABILIZATION, 10, "a")
    assert c.decide(obs(199, 0.9, seeds=(early,), kernels=(k,))) == []
    done = SeedView("mid", 0, S.STABILIZATION, 20, "a")
    (keep,) = c.decide(obs(249, 0.9, seeds=(done,), kernels=(k,)))
    assert keep == Transition("mid", 0, S.FOSSILIZED, keep.reason)

    worse = PlateauController(warmup_steps=0, patience=1, stabilize_steps=20)
    worse.decide(obs(49, 1.0, seeds=(training,)))
    (cull,) = worse.decide(obs(99, 1.1, seeds=(done,)))
    assert isinstance(cull, Transition) and cull.to is S.CULLED and "worsened" in cull.reason

    blowup = PlateauController(warmup_steps=0, patience=1, abort_factor=1.5)
    blowup.decide(obs(49, 1.0, seeds=(training,)))
    (abort,) = blowup.decide(obs(99, 2.0, seeds=(grafting,)))
    assert isinstance(abort, Transition) and abort.to is S.CULLED


def test_culled_kernels_are_tried_last_and_then_not_at_all() -> None:
    c = PlateauController(warmup_steps=0, patience=1, min_improvement=0.5, cooldown_steps=0,
                          max_culls=1)
    a, b = kernel("a"), kernel("b")
    c.decide(obs(49, 1.0, kernels=(a, b), signal={"stem": 0.0, "mid": 1.0}))
    (first,) = c.decide(obs(99, 1.0, kernels=(a, b), signal={"stem": 0.0, "mid": 1.0}))
    assert isinstance(first, Germinate) and first.cache_key == "a"
    culled = SeedEvent("mid", 0, S.TRAINING, S.CULLED, 120, "fault", "a")
    c.decide(obs(149, 1.0, kernels=(a, b), events=(culled,), signal={"stem": 0.0, "mid": 1.0}))
    (second,) = c.decide(obs(199, 1.0, kernels=(a, b), signal={"stem": 0.0, "mid": 1.0}))
    assert isinstance(second, Germinate) and second.cache_key == "b"
    assert c.germinations == 2


@pytest.mark.parametrize("size", [(3, 2), (40, 17)])
def test_png_writer_makes_a_valid_png(size: tuple[int, int]) -> None:
    w, h = size
    canvas = Canvas(w, h)
    canvas.line((0, 0), (w - 1, h - 1), (255, 0, 0), width=2)
    canvas.text(1, 1, "LOSS 0.12")
    data = canvas.to_png()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == w and int.from_bytes(data[20:24], "big") == h
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4: idat], "big")
    raw = zlib.decompress(data[idat + 4: idat + 4 + length])
    assert len(raw) == h * (1 + 3 * w)
    assert canvas.pixels[0, 0].tolist() == [255, 0, 0]
