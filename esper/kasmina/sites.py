"""Give any ``nn.Module`` host seed sites, without the host's code knowing Esper.

A site sits at the output of a named submodule (``"blocks.0"``, as in
``named_modules()``), as a forward hook that exists only while one of the
site's seeds runs. The host's modules, parameters and ``state_dict`` keys are
unchanged; seed parameters and site state live in the returned Kasmina.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from esper.kasmina.config import KasminaConfig
from esper.kasmina.lifecycle import EventSink
from esper.kasmina.objective import SeedObjective
from esper.kasmina.optim import OptimizerFactory
from esper.kasmina.plane import Kasmina


def add_seed_sites(
    host: nn.Module,
    sites: Mapping[str, Any],
    *,
    seeds_per_site: int = 4,
    config: KasminaConfig | None = None,
    sink: EventSink | None = None,
    seed_optimizer: OptimizerFactory | None = None,
    objective: SeedObjective | None = None,
) -> Kasmina:
    """Sites at the outputs of ``host``'s submodules named in ``sites``, each with
    a schema (SiteSchema, an ``esper.ir`` TensorSchema, or ``(shape, dtype)``)
    and ``seeds_per_site`` dormant seed slots. Raises AttributeError for a name
    that is not a submodule."""
    return Kasmina(
        host,
        sites,
        seeds_per_site=seeds_per_site,
        config=config,
        sink=sink,
        seed_optimizer=seed_optimizer,
        objective=objective,
    )


def remove_seed_sites(kasmina: Kasmina) -> None:
    """Unhook every site from the host and stop the loader (fossils stop running)."""
    kasmina.close()
