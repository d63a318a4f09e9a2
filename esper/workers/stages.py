"""The stage registry: stage name → the event it consumes, how to build its
handler, and the runtime settings that suit it. Later issues replace a
stage's entry (real compile, validate, deploy); the runtime stays as it is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from esper.bus import events as ev
from esper.bus.topology import consumer_spec
from esper.errors import ConfigError
from esper.settings import Settings
from esper.workers import passthrough
from esper.workers.runtime import Handler


@dataclass(frozen=True)
class Stage:
    """``make_handler(settings)`` builds the handler once per worker process.
    ``batch`` is how many messages share a transaction: 1 for slow handlers
    (a compile), larger for quick bookkeeping ones."""

    name: str
    event_type: type[ev.EsperEvent]
    make_handler: Callable[[Settings], Handler]
    concurrency: int = 4
    batch: int = 32

    def __post_init__(self) -> None:
        expected = consumer_spec(self.name).event_type
        if self.event_type is not expected:
            raise ConfigError(
                f"stage {self.name} consumes {expected.__name__}, not {self.event_type.__name__}"
            )


def _targets(settings: Settings) -> tuple[str, ...]:
    if not settings.targets:
        return ("cpu",)
    return tuple(t.strip() for t in settings.targets.split(",") if t.strip())


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> None:
    """Add or replace a stage's entry."""
    STAGES[stage.name] = stage


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def passthrough_requested(settings: Settings) -> bool:
    """``ESPER_PASSTHROUGH=1``: the stages record kernels without compiling or
    validating (bus benchmarks, runtime tests)."""
    return settings.passthrough


def _compile_handler(settings: Settings) -> Handler:
    if passthrough_requested(settings):
        return passthrough.compile_handler(_targets(settings))
    from esper.stages.compile import make_compile_handler  # loads torch: only when compiling

    return make_compile_handler(settings)


# batch=1: a compile holds its transaction (and claims) for seconds; one message each.
register(Stage("compile", ev.BlueprintSubmitted, _compile_handler, concurrency=4, batch=1))


def _validate_handler(settings: Settings) -> Handler:
    if passthrough_requested(settings):
        return passthrough.validate_handler()
    from esper.stages.validate import make_validate_handler  # torch-free; sandboxes load it

    return make_validate_handler(settings)


# One validation at a time per process: each holds its kernel row and a sandbox for
# seconds, and a GPU validator's latency measurements must not overlap.
register(Stage("validate", ev.KernelCompiled, _validate_handler, concurrency=1, batch=1))


def _deploy_handler(settings: Settings) -> Handler:
    if passthrough_requested(settings):
        return passthrough.deploy_handler()
    from esper.stages.deploy import make_deploy_handler  # torch-free bookkeeping

    return make_deploy_handler(settings)


register(Stage("deploy", ev.KernelValidated, _deploy_handler))
