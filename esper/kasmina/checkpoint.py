"""Checkpoints of a host with seed sites: one safetensors file, no pickle.

Tensors: the host's ``state_dict`` (``host/…``), the Kasmina's (``kasmina/…``:
seed parameters and every site's state tensors), the host and seed optimizers'
per-parameter state (``optim/…``) and the RNG states (``rng/…``). Everything
else — lifecycle mirror, kernel cache keys, optimizer hyperparameters, fossil
order — is JSON in the file's metadata. Kernels are not stored: resuming
re-acquires each by cache key through ``resolve(cache_key) -> factory``.

Save at a step boundary (after ``train_step``); load into a freshly built host
and ``add_seed_sites`` with the same sites, before building anything else on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.optim import Optimizer

from esper.kasmina.kernels import KernelEntry, ModuleFactory, build_checked
from esper.kasmina.lifecycle import RUNNING_STATES, SeedState
from esper.kasmina.optim import move_params
from esper.kasmina.plane import Kasmina
from esper.kasmina.schema import SiteSchema
from esper.kasmina.state import SeedSlot

if TYPE_CHECKING:
    from esper.compile.params import BlueprintModule

FORMAT = 1
META_KEY = "esper.kasmina"

Resolver = Callable[[str], ModuleFactory]
"""``resolve(cache_key) -> factory``: the trainer's kernel cache lookup."""


def save_checkpoint(
    path: str | Path,
    kasmina: Kasmina,
    *,
    host_optimizer: Optimizer | None = None,
    rng: bool = True,
) -> None:
    """Write host + seeds + optimizers (+ RNG) to ``path`` (see module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    _put(tensors, "host/", kasmina.host.state_dict())
    _put(tensors, "kasmina/", kasmina.state_dict())
    host_opt = host_optimizer or kasmina.host_optimizer
    optim_meta: dict[str, Any] = {}
    if host_opt is not None:
        optim_meta["host"] = _flatten_optimizer(host_opt.state_dict(), "optim/host", tensors)
    seed_sd = kasmina.seed_optimizer.state_dict()
    if seed_sd is not None:
        optim_meta["seeds"] = _flatten_optimizer(seed_sd, "optim/seeds", tensors)
    if rng:
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_initialized():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = state
    fossils_in_host = [key not in kasmina.seed_optimizer for key in kasmina.fossil_order]
    meta = {
        "format": FORMAT,
        "step": kasmina.step,
        "config": asdict(kasmina.config),
        "sites": {
            name: {
                "schema": layer.schema.to_json(),
                "kernels": layer.kernels.keys(),
                "slots": [
                    {
                        "state": s.state.name,
                        "steps": s.steps,
                        "kernel_slot": s.kernel_slot,
                        "cache_key": s.cache_key,
                    }
                    for s in layer.state.slots
                ],
            }
            for name, layer in kasmina.sites.items()
        },
        "seed_optimizer_keys": [list(k) for k in kasmina.seed_optimizer.in_order()],
        "fossil_order": [list(k) for k in kasmina.fossil_order],
        "fossils_in_host": fossils_in_host if host_opt is not None else [],
        "optim": optim_meta,
    }
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(out, str(path), metadata={META_KEY: json.dumps(meta)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON metadata (step, sites, lifecycle, cache keys)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a Kasmina checkpoint (no {META_KEY} metadata)")
    meta: dict[str, Any] = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    return meta


def load_checkpoint(
    path: str | Path,
    kasmina: Kasmina,
    resolve: Resolver,
    *,
    host_optimizer: Optimizer | None = None,
) -> int:
    """Restore into a fresh host + Kasmina (same sites, no seeds yet); returns the
    step saved. Running seeds' kernels are rebuilt now (``resolve`` then
    ``factory(device)``); a seed that was still loading is offered again and
    loads off the training thread as usual."""
    meta = read_metadata(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    _check_sites(kasmina, meta)
    device = kasmina.device
    kasmina.host.load_state_dict(_take(tensors, "host/"))

    factories: dict[str, ModuleFactory] = {}

    def factory_of(key: str) -> ModuleFactory:
        if key not in factories:
            factories[key] = resolve(key)
        return factories[key]

    modules: dict[tuple[str, int], nn.Module] = {}
    reload: list[tuple[str, int]] = []
    for name, site in meta["sites"].items():
        layer = kasmina.site(name)
        layer.kernels.entries = [KernelEntry(k, _Lazy(factory_of, k)) for k in site["kernels"]]
        for k, saved in enumerate(site["slots"]):
            slot = SeedSlot(
                SeedState[saved["state"]], saved["steps"], saved["kernel_slot"], saved["cache_key"]
            )
            layer.state.slots[k] = slot
            if slot.state in RUNNING_STATES:
                assert slot.cache_key is not None
                module = build_checked(factory_of(slot.cache_key), device, layer.schema)
                module.train()
                layer.install(k, module)
                modules[(name, k)] = module
            elif slot.state is SeedState.GERMINATED:
                reload.append((name, k))

    for site_name, seed in meta["seed_optimizer_keys"]:
        kasmina.seed_optimizer.add((site_name, seed), modules[(site_name, seed)].parameters())
    kasmina.fossil_order = [(s, k) for s, k in meta["fossil_order"]]
    if host_optimizer is not None:
        kasmina.host_optimizer = host_optimizer
        for (s, k), in_host in zip(kasmina.fossil_order, meta["fossils_in_host"], strict=False):
            if in_host:
                move_params(modules[(s, k)].parameters(), None, host_optimizer)

    kasmina.load_state_dict(_take(tensors, "kasmina/"))
    optim = meta["optim"]
    if "seeds" in optim:
        kasmina.seed_optimizer.load_state_dict(
            _unflatten_optimizer(optim["seeds"], tensors, kasmina.seed_optimizer.optimizer)
        )
    if host_optimizer is not None and "host" in optim:
        host_optimizer.load_state_dict(
            _unflatten_optimizer(optim["host"], tensors, host_optimizer)
        )
    if "rng/cpu" in tensors:
        torch.set_rng_state(tensors["rng/cpu"])
    cuda_rng = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)

    kasmina.step = int(meta["step"])
    kasmina.recount()
    for name, layer in kasmina.sites.items():
        layer.changed = False  # the device tensors came from the file, matching the mirror
        layer.refresh()
        for site_name, k in reload:
            if site_name == name:
                kasmina.start_load(layer, k)
    return kasmina.step


class _Lazy:
    """A factory that resolves its cache key only when first used (a kernel
    table may list keys no seed uses any more, e.g. retired ones)."""

    def __init__(self, factory_of: Callable[[str], ModuleFactory], key: str) -> None:
        self._factory_of = factory_of
        self._key = key

    def __call__(self, device: torch.device | str) -> BlueprintModule:
        return self._factory_of(self._key)(device)


def _check_sites(kasmina: Kasmina, meta: dict[str, Any]) -> None:
    sites = kasmina.sites
    if set(sites) != set(meta["sites"]):
        raise ValueError(f"checkpoint sites {sorted(meta['sites'])} != {sorted(sites)}")
    for name, site in meta["sites"].items():
        layer = sites[name]
        if SiteSchema.from_json(site["schema"]) != layer.schema:
            raise ValueError(f"site {name}: checkpoint schema {site['schema']} != {layer.schema}")
        if len(site["slots"]) != len(layer.state):
            raise ValueError(f"site {name}: {len(site['slots'])} seed slots saved, "
                             f"{len(layer.state)} here")
        if any(s.state is not SeedState.DORMANT for s in layer.state.slots):
            raise ValueError(f"site {name} already has seeds: load into a fresh Kasmina")


def _put(out: dict[str, torch.Tensor], prefix: str, sd: dict[str, torch.Tensor]) -> None:
    for k, v in sd.items():
        out[prefix + k] = v


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _flatten_optimizer(
    sd: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Optimizer state_dict → JSON skeleton; tensors go to ``tensors``."""
    state: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                name = f"{prefix}/state/{idx}/{k}"
                tensors[name] = v
                state[str(idx)][k] = {"tensor": name}
            else:
                state[str(idx)][k] = {"value": v}
    for group in sd["param_groups"]:
        for k, v in group.items():
            if isinstance(v, torch.Tensor):
                raise ValueError(f"optimizer hyperparameter {k} is a tensor: not supported")
    return {"state": state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(
    skeleton: dict[str, Any], tensors: dict[str, torch.Tensor], into: Optimizer | None
) -> dict[str, Any]:
    state = {
        int(idx): {
            k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()
        }
        for idx, entry in skeleton["state"].items()
    }
    groups = [dict(g) for g in skeleton["param_groups"]]
    if into is not None:  # JSON made tuples lists (Adam's betas): restore the live types
        for saved, live in zip(groups, into.param_groups, strict=False):
            for k, v in saved.items():
                if isinstance(live.get(k), tuple) and isinstance(v, list):
                    saved[k] = tuple(v)
    return {"state": state, "param_groups": groups}
