"""The backend interface every compiler implements, and the registry that names them.

A backend turns an (optimised) IR into files for one target and, given a verified
artifact's manifest and files, returns a factory that builds a runnable module.
This module imports no torch, so the cache and the workers can use the options
without loading a compiler."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from esper.errors import UnknownBackendError

if TYPE_CHECKING:
    import torch

    from esper.artifacts import ArtifactManifest
    from esper.compile.params import BlueprintModule
    from esper.ir import BlueprintIR

class ModuleFactory(Protocol):
    """Builds the artifact's module on a device; the dtype is the artifact's."""

    def __call__(self, device: torch.device | str) -> BlueprintModule: ...


class CompileOptions(BaseModel):
    """Codegen options; their ``model_dump()`` is part of the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: str = "float32"
    autotune: bool = True
    extra: dict[str, Any] = Field(default_factory=dict)


class CompiledFiles(BaseModel):
    """What ``Backend.compile`` produces: the artifact's files (name -> bytes), the
    options that shaped them (recorded in the manifest) and stage timings (seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: dict[str, bytes]
    options: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """One compiler. ``compile`` runs in compile workers (no GPU needed); ``load``
    runs in trainers and validators, only on files whose signature was verified."""

    name: str

    def supports(self, target: str) -> bool:
        """Whether this backend can produce code for ``target`` (``cpu``, ``cuda:sm_90``)."""
        ...

    def compile(self, ir: BlueprintIR, target: str, options: CompileOptions) -> CompiledFiles:
        """Compile an optimised IR for ``target``."""
        ...

    def load(self, manifest: ArtifactManifest, files: Mapping[str, bytes]) -> ModuleFactory:
        """Return a factory ``device -> BlueprintModule`` for a verified artifact."""
        ...


# Built-in backends register themselves when first asked for, so that naming one
# never requires the caller to have imported its module.
_BUILTINS: dict[str, str] = {
    "torch": "esper.compile.reference:TorchBackend",
    "triton": "esper.triton.backend:TritonBackend",
}
_REGISTRY: dict[str, Backend] = {}
_LOCK = threading.Lock()


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Make ``backend`` available under ``backend.name``. Registering a second,
    different backend under a taken name raises unless ``replace``."""
    name = backend.name
    with _LOCK:
        current = _REGISTRY.get(name)
        if current is not None and current is not backend and not replace:
            raise ValueError(f"a backend named {name!r} is already registered")
        _REGISTRY[name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (built-ins load on first use)."""
    with _LOCK:
        found = _REGISTRY.get(name)
    if found is not None:
        return found
    spec = _BUILTINS.get(name)
    if spec is None:
        known = ", ".join(sorted(set(_REGISTRY) | set(_BUILTINS)))
        raise UnknownBackendError(f"unknown backend {name!r} (known: {known})")
    module_name, _, attr = spec.partition(":")
    backend = getattr(importlib.import_module(module_name), attr)()
    with _LOCK:
        return _REGISTRY.setdefault(name, backend)


def available_backends() -> list[str]:
    """Names of every registered or built-in backend."""
    with _LOCK:
        return sorted(set(_REGISTRY) | set(_BUILTINS))
