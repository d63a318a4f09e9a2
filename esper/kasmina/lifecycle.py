"""The seed lifecycle: states, the one explicit transition table, and the
record every transition produces (published later as ``esper.seed.<event>``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from esper.errors import IllegalTransition


class SeedState(IntEnum):
    """A seed slot's state. Values are stored in the site's int8 state tensor."""

    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    GRAFTING = 3
    STABILIZATION = 4
    FOSSILIZED = 5
    CULLED = 6

    @property
    def event(self) -> str:
        """The ``<event>`` of ``esper.seed.<event>`` for entering this state."""
        return self.name.lower()


S = SeedState

TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    S.DORMANT: frozenset({S.GERMINATED}),
    S.GERMINATED: frozenset({S.TRAINING, S.CULLED}),
    S.TRAINING: frozenset({S.GRAFTING, S.CULLED}),
    S.GRAFTING: frozenset({S.STABILIZATION, S.CULLED}),
    S.STABILIZATION: frozenset({S.FOSSILIZED, S.CULLED}),
    S.FOSSILIZED: frozenset(),  # permanent: the seed is part of the host now
    S.CULLED: frozenset({S.DORMANT}),  # only after the embargo
}
"""Allowed moves. ``DORMANT → GERMINATED → TRAINING → GRAFTING → STABILIZATION
→ FOSSILIZED``; any live state → ``CULLED → DORMANT``."""

LIVE_STATES = frozenset({S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION})
"""States a fault or a controller can cull from."""

BLENDED_STATES = frozenset({S.GRAFTING, S.STABILIZATION, S.FOSSILIZED})
"""States whose output is added to the host's activation (alpha > 0)."""

RUNNING_STATES = frozenset({S.TRAINING}) | BLENDED_STATES
"""States whose kernel runs in the forward pass."""


def check_transition(site: str, seed: int, src: SeedState, dst: SeedState) -> None:
    """Raise IllegalTransition unless ``src → dst`` is in the table."""
    if dst not in TRANSITIONS[src]:
        allowed = ", ".join(s.name for s in sorted(TRANSITIONS[src])) or "nothing"
        raise IllegalTransition(
            f"seed {site}[{seed}]: {src.name} → {dst.name} is illegal "
            f"({src.name} may go to {allowed})"
        )


@dataclass(frozen=True, slots=True)
class SeedEvent:
    """One transition of one seed: what the trainer publishes and stores."""

    site: str
    seed: int
    from_state: SeedState
    to_state: SeedState
    step: int
    reason: str
    cache_key: str | None = None

    @property
    def event(self) -> str:
        """``germinated``, ``training``, …, ``culled``, ``dormant``."""
        return self.to_state.event

    def as_dict(self) -> dict[str, str | int | None]:
        return {
            "site": self.site,
            "seed": self.seed,
            "from_state": self.from_state.name,
            "to_state": self.to_state.name,
            "step": self.step,
            "reason": self.reason,
            "cache_key": self.cache_key,
        }


EventSink = Callable[[SeedEvent], None]
"""Receives every SeedEvent, on the training thread, at the step boundary."""
