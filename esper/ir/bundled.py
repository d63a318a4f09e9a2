"""The example blueprints shipped as package data (``esper/blueprints/*.json``)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from esper.ir.blueprint import BlueprintIR


def _dir() -> Path:
    return Path(str(resources.files("esper") / "blueprints"))


def bundled_names() -> list[str]:
    """Names of the bundled blueprints, sorted."""
    return sorted(p.stem for p in _dir().glob("*.json"))


def bundled_path(name: str) -> Path:
    """Path of one bundled blueprint's JSON file (KeyError if there is none)."""
    path = _dir() / f"{name}.json"
    if name not in bundled_names():
        raise KeyError(f"no bundled blueprint {name!r} (bundled: {', '.join(bundled_names())})")
    return path


@cache
def _load(name: str) -> BlueprintIR:
    return BlueprintIR.from_json(bundled_path(name).read_bytes())


def bundled() -> dict[str, BlueprintIR]:
    """Every bundled blueprint by name, parsed and validated (frozen, shared)."""
    return {name: _load(name) for name in bundled_names()}
