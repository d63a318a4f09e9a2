"""What a validation demands: shapes, budgets, timeouts and what to do at the
edges (a CUDA kernel on a CPU-only validator, a kernel slower than eager).

Decisions recorded here:
- A CUDA kernel validated on a CPU-only validator may deploy (``cuda_on_cpu =
  "allow"``, the default); its report carries the check ``coverage`` with
  "numerics verified on CPU". ``"defer"`` leaves such kernels to a GPU validator
  (the message is redelivered until one takes it).
- A kernel slower than eager by more than ``perf_budget`` is REJECTED (check
  ``performance``; the reason's message says so), not swapped for the reference
  backend here: a validated event vouches for one artifact's bytes, and a
  reference-backend kernel of the same blueprint is another artifact that needs
  its own validation. A trainer without a kernel for a blueprint keeps its host
  as it is (nothing is grafted), which is always safe.
- Extra backend modules (e.g. test backends) are imported in the sandbox only if
  their dotted name starts with one of ``ALLOWED_MODULE_PREFIXES``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from esper.validate.tolerances import GRAFT_BOUND

ALLOWED_MODULE_PREFIXES = ("esper.", "tests.fixtures.")
EXTRA_BACKENDS_ENV = "ESPER_EXTRA_BACKENDS"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_module_name(name: str) -> str:
    """A dotted module name under an allowed prefix, or ValueError."""
    if not _MODULE.match(name) or not name.startswith(ALLOWED_MODULE_PREFIXES):
        raise ValueError(
            f"backend module {name!r} is not allowed (dotted names under "
            f"{', '.join(ALLOWED_MODULE_PREFIXES)} only)"
        )
    return name


class ValidationPolicy(BaseModel):
    """Settings of one validation; travels to the sandbox inside the request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_sizes: tuple[int, ...] = (1, 7, 16)
    """Batch sizes for the numeric checks (1 and a non-power-of-two at least)."""
    interpret_batch_sizes: tuple[int, ...] = (1, 3, 4)
    """Smaller ones for Triton kernels run by the (slow) interpreter on CPU."""
    cpu_max_elements: int = 1 << 17
    """On CPU, batch sizes whose inputs exceed this many elements are dropped (1 and
    3 stay): fp16/bf16 convolutions are slow there."""
    symbol_size: int = 5
    """Size of every symbolic dim other than the batch (the k-th gets size + k)."""
    seed: int = 0
    large_scale: dict[str, float] = Field(
        default_factory=lambda: {"float32": 1e4, "bfloat16": 1e4, "float16": 1e2}
    )
    """Input scale of the large-magnitude finiteness probe, per dtype."""
    allow_tf32: bool = False
    """Let fp32 matmuls run in TF32 on GPU (then fp32 is held to the tf32 bound)."""
    graft_bound: float = GRAFT_BOUND
    graft: Literal["require", "report"] = "require"
    """"require": a kernel that changes the host at its declared init is rejected."""
    determinism_bound: int = 0
    """Elements allowed to differ between two identical runs (0: bit-identical)."""
    atomic_ulps: float = 4.0
    """For artifacts that declare atomic reductions: how far (units in the last
    place of the dtype, at the tensor's largest magnitude) two runs may differ."""
    cuda_on_cpu: Literal["allow", "defer"] = "allow"
    perf_budget: float = 0.10
    """Rejected when kernel latency > (1 + budget) x eager (GPU validators only)."""
    perf_elements: int = 1 << 22
    """Elements of the first input at the performance shape (batch chosen to fit)."""
    perf_symbol_size: int = 16
    perf_warmup: int = 2
    perf_iters: int = 8
    """Timed rounds per measurement; each times ``perf_inner`` steps of both, and
    each side is judged by its best round (host noise only adds time)."""
    perf_inner: int = 4
    memory_budget: float = 1.5
    """Rejected when peak fwd+bwd memory > budget x eager's (+ slack) (GPU only)."""
    memory_slack_bytes: int = 1 << 20
    timeout_s: float = 120.0
    """Wall clock for one validation once the sandbox is up; then it is killed.
    With ``start_timeout_s`` it stays under the worker's 300 s handler timeout."""
    start_timeout_s: float = 120.0
    """Wall clock for a sandbox process to import torch and report ready."""
    backend_modules: tuple[str, ...] = ()
    """Modules the sandbox imports to register extra backends (allow-listed)."""

    @field_validator("batch_sizes", "interpret_batch_sizes")
    @classmethod
    def _batches(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        return v

    @field_validator("backend_modules")
    @classmethod
    def _modules(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_module_name(m) for m in v)

    @classmethod
    def with_extra_backends(cls, environ: Mapping[str, str], **overrides: object
                            ) -> ValidationPolicy:
        """The default policy plus ``ESPER_EXTRA_BACKENDS`` (comma-separated modules)."""
        raw = environ.get(EXTRA_BACKENDS_ENV, "")
        modules = tuple(m.strip() for m in raw.split(",") if m.strip())
        return cls.model_validate({"backend_modules": modules, **overrides})
