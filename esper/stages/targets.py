"""Which targets the compile stage builds for (``ESPER_TARGETS``) and which backend
builds each: ``triton`` for ``cuda:sm_XX`` when it is registered and supports the
arch, else the ``torch`` reference (the fallback is recorded, never silent)."""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from esper.compile.backend import available_backends, get_backend
from esper.errors import ConfigError

log = logging.getLogger(__name__)

_TARGET = re.compile(r"cpu|cuda:sm_\d{2,3}")
# Backends that register themselves when their module is imported.
_SELF_REGISTERING = {"triton": "esper.triton.backend"}


def local_gpu_target() -> str | None:
    """``cuda:sm_<major><minor>`` of this machine's first GPU, or None without one."""
    import torch  # lazy: only the default target list needs it

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"cuda:sm_{major}{minor}"


def resolve_targets(
    spec: str | None, *, local_gpu: Callable[[], str | None] = local_gpu_target
) -> tuple[str, ...]:
    """``spec`` is a comma list such as ``"cpu,cuda:sm_90"`` (order kept, duplicates
    dropped); empty or None means ``cpu`` plus the local GPU's arch if there is one."""
    if spec is None or not spec.strip():
        gpu = local_gpu()
        return ("cpu",) if gpu is None else ("cpu", gpu)
    targets: list[str] = []
    for part in spec.split(","):
        target = part.strip()
        if not target:
            continue
        if not _TARGET.fullmatch(target):
            raise ConfigError(
                f"ESPER_TARGETS: {target!r} is not a target (expected cpu or cuda:sm_XX)"
            )
        if target not in targets:
            targets.append(target)
    if not targets:
        raise ConfigError(f"ESPER_TARGETS={spec!r} names no target")
    return tuple(targets)


@dataclass(frozen=True)
class BackendChoice:
    """The backend that compiles ``target``; ``fallback`` says why it is not the
    preferred one (None when it is)."""

    target: str
    backend: str
    fallback: str | None = None


def _registered(name: str) -> bool:
    if name in available_backends():
        return True
    module = _SELF_REGISTERING.get(name)
    if module is None:
        return False
    try:
        importlib.import_module(module)
    except Exception as exc:  # a missing or broken optional backend must not stop the stage
        log.warning("backend %s unavailable: %s", name, exc)
        return False
    return name in available_backends()


def choose_backend(target: str) -> BackendChoice:
    """``triton`` for CUDA targets when available and able, else ``torch``."""
    if not target.startswith("cuda:"):
        return BackendChoice(target, "torch")
    if not _registered("triton"):
        return BackendChoice(target, "torch", "triton backend is not registered")
    if not get_backend("triton").supports(target):
        return BackendChoice(target, "torch", f"triton backend does not support {target}")
    return BackendChoice(target, "triton")
