"""Who grows what, when: a pluggable policy the training loop consults at every
evaluation. A controller sees an ``Observation`` and returns decisions; Kasmina
itself moves TRAINING → GRAFTING → STABILIZATION on its schedule and the
controller gives the verdict that ends STABILIZATION.

``PlateauController`` (the default) is one documented heuristic:

1. **Germinate on a plateau.** When no seed is live, past ``warmup_steps`` and
   ``cooldown_steps`` after the last seed settled, and the best validation loss
   of the last ``patience`` evaluations improved on the best before them by less
   than ``min_improvement`` (relative; the defaults, 15% over 3 evaluations of 50
   steps, call learning that has slowed down a plateau, so that a run of a few
   thousand steps grows several times), offer one kernel: at the site with the
   largest gradient signal (the host loss's gradient norm at the site's
   activation, per example) among sites with a free slot and a usable kernel;
   of that site's kernels, the one tried least there (culls count double),
   first announced first. A kernel culled ``max_culls`` times at a site is not
   offered there again.
2. **Keep or cull.** The validation loss last seen while the seed was TRAINING
   (alpha 0: the host alone) is its baseline. While it blends, a loss above
   ``abort_factor`` * baseline culls it at once. After ``stabilize_steps`` in
   STABILIZATION it is FOSSILIZED if the loss is at most (1 + ``cull_tolerance``)
   * baseline, else CULLED: a graft that worsens validation loss is removed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from esper.kasmina import SeedEvent, SeedState
from esper.train.catalog import KernelInfo

S = SeedState


@dataclass(frozen=True)
class SeedView:
    site: str
    seed: int
    state: SeedState
    steps: int
    """Step boundaries spent in ``state``."""
    cache_key: str | None


@dataclass(frozen=True)
class Observation:
    """What a controller sees at an evaluation (after step ``step``)."""

    step: int
    val_loss: float
    train_loss: float
    site_signal: Mapping[str, float]
    seeds: Sequence[SeedView]
    """Every seed that is neither DORMANT nor FOSSILIZED."""
    free_slots: Mapping[str, int]
    """DORMANT slots per site."""
    kernels: Mapping[str, Sequence[KernelInfo]]
    """Per site, the loaded, not retired kernels that fit it."""
    events: Sequence[SeedEvent] = ()
    """Transitions since the previous observation (faults included)."""


@dataclass(frozen=True)
class Germinate:
    site: str
    cache_key: str
    reason: str


@dataclass(frozen=True)
class Transition:
    site: str
    seed: int
    to: SeedState
    reason: str


Decision = Germinate | Transition


class Controller(Protocol):
    """A growth policy. ``decide`` runs on the training thread; keep it cheap."""

    def decide(self, obs: Observation) -> Sequence[Decision]: ...


@dataclass
class PlateauController:
    """The default heuristic; see the module docstring."""

    warmup_steps: int = 250
    patience: int = 3
    min_improvement: float = 0.15
    cooldown_steps: int = 50
    stabilize_steps: int = 60
    cull_tolerance: float = 0.02
    abort_factor: float = 1.5
    max_culls: int = 2
    max_germinations: int | None = None
    _history: list[tuple[int, float]] = field(default_factory=list)
    _baseline: dict[tuple[str, int], float] = field(default_factory=dict)
    _tries: Counter[tuple[str, str]] = field(default_factory=Counter)
    _culls: Counter[tuple[str, str]] = field(default_factory=Counter)
    _settled_at: int = -1
    germinations: int = 0

    def decide(self, obs: Observation) -> list[Decision]:
        self._take_events(obs.events)
        self._history.append((obs.step, obs.val_loss))
        decisions: list[Decision] = []
        for seed in obs.seeds:
            verdict = self._judge(seed, obs.val_loss)
            if verdict is not None:
                decisions.append(verdict)
        live = [s for s in obs.seeds if s.state is not S.CULLED]
        if not live and not decisions and self._may_germinate(obs.step) and self.plateau():
            choice = self._choose(obs)
            if choice is not None:
                decisions.append(choice)
                self._tries[(choice.site, choice.cache_key)] += 1
                self.germinations += 1
        return decisions

    # --- keep or cull ------------------------------------------------------------

    def _judge(self, seed: SeedView, val: float) -> Decision | None:
        key = (seed.site, seed.seed)
        if seed.state in (S.GERMINATED, S.TRAINING):
            self._baseline[key] = val  # alpha 0: this is the host's own loss
            return None
        base = self._baseline.get(key)
        if base is None or seed.state not in (S.GRAFTING, S.STABILIZATION):
            return None
        if val > self.abort_factor * base:
            return Transition(seed.site, seed.seed, S.CULLED,
                              f"validation loss {val:.4g} > {self.abort_factor}x its "
                              f"pre-graft {base:.4g} while blending")
        if seed.state is S.STABILIZATION and seed.steps >= self.stabilize_steps:
            if val <= base * (1 + self.cull_tolerance):
                return Transition(seed.site, seed.seed, S.FOSSILIZED,
                                  f"validation loss {base:.4g} -> {val:.4g} after grafting")
            return Transition(seed.site, seed.seed, S.CULLED,
                              f"graft worsened validation loss {base:.4g} -> {val:.4g}")
        return None

    def _take_events(self, events: Sequence[SeedEvent]) -> None:
        for e in events:
            if e.to_state in (S.FOSSILIZED, S.CULLED):
                self._baseline.pop((e.site, e.seed), None)
                self._settled_at = max(self._settled_at, e.step)
                self._history.clear()  # the model changed: a new plateau must show
            if e.to_state is S.CULLED and e.cache_key is not None:
                self._culls[(e.site, e.cache_key)] += 1

    # --- when and what to grow -------------------------------------------------------

    def _may_germinate(self, step: int) -> bool:
        if self.max_germinations is not None and self.germinations >= self.max_germinations:
            return False
        if step < self.warmup_steps:
            return False
        return self._settled_at < 0 or step - self._settled_at >= self.cooldown_steps

    def plateau(self) -> bool:
        """The last ``patience`` evaluations improved on the best before them by
        less than ``min_improvement`` (relative)."""
        if len(self._history) <= self.patience:
            return False
        losses = [v for _, v in self._history]
        before = min(losses[: -self.patience])
        recent = min(losses[-self.patience :])
        return (before - recent) < self.min_improvement * before

    def _choose(self, obs: Observation) -> Germinate | None:
        best: tuple[float, str, KernelInfo] | None = None
        for site, kernels in obs.kernels.items():
            if obs.free_slots.get(site, 0) < 1:
                continue
            eligible = [k for k in kernels if self._culls[(site, k.cache_key)] < self.max_culls]
            if not eligible:
                continue
            kernel = min(
                enumerate(eligible),
                key=lambda ik: (self._tries[(site, ik[1].cache_key)]
                                + self._culls[(site, ik[1].cache_key)], ik[0]),
            )[1]
            signal = obs.site_signal.get(site, 0.0)
            if best is None or signal > best[0]:
                best = (signal, site, kernel)
        if best is None:
            return None
        signal, site, kernel = best
        return Germinate(site, kernel.cache_key,
                         f"plateau at validation loss {obs.val_loss:.4g}; {site} has the largest "
                         f"gradient signal ({signal:.3g})")
