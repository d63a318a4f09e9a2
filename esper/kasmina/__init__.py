"""Kasmina, the execution plane: seed sites in a live host model, their
GPU-resident state, lifecycle, fault isolation, kernel hot-load and checkpoints.

    kas = add_seed_sites(model, {"blocks.0": schema, "blocks.3": schema}, seeds_per_site=4)
    kas.offer_kernel("blocks.0", None, cache_key, factory)   # any thread; loads off-thread
    for step in ...:
        loss = kas.train_step(closure, optimizer, step)     # faults culled, boundary applied
    save_checkpoint(path, kas)  /  load_checkpoint(path, fresh_kas, resolve, host_optimizer=opt)

Seeds are residual branches at a site's activation h: ``y = h + Σ alpha_k·delta_k(h)``
(layer.py); TRAINING seeds fit the host's pseudo-residual on ``h.detach()``
(objective.py); faults are flagged on device and read once per step (faults.py).
"""

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
