"""Kasmina, the execution plane: seed sites in a live host model, their
GPU-resident state, lifecycle, fault isolation, kernel hot-load and checkpoints."""

from esper.kasmina.config import KasminaConfig
from esper.kasmina.kernels import ModuleFactory
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.lifecycle import (
    BLENDED_STATES,
    LIVE_STATES,
    TRANSITIONS,
    EventSink,
    SeedEvent,
    SeedState,
    check_transition,
)
from esper.kasmina.objective import GradientResidual, SeedObjective
from esper.kasmina.optim import SeedOptimizer, move_params
from esper.kasmina.plane import FaultReport, Kasmina
from esper.kasmina.schema import SiteSchema
from esper.kasmina.sites import add_seed_sites, remove_seed_sites

__all__ = [
    "BLENDED_STATES",
    "LIVE_STATES",
    "TRANSITIONS",
    "EventSink",
    "FaultReport",
    "GradientResidual",
    "Kasmina",
    "KasminaConfig",
    "KasminaLayer",
    "ModuleFactory",
    "SeedEvent",
    "SeedObjective",
    "SeedOptimizer",
    "SeedState",
    "SiteSchema",
    "add_seed_sites",
    "check_transition",
    "move_params",
    "remove_seed_sites",
]
