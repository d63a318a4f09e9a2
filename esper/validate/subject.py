"""What the checks work on: the artifact's module loaded through the trainers'
loader, the blueprint as submitted, and helpers to make inputs, compute the
float64 reference and run the module with uninitialised memory poisoned."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.deterministic

from esper.compile.backend import ModuleFactory
from esper.compile.evaluate import evaluate
from esper.compile.params import BlueprintModule
from esper.compile.reference import build_module
from esper.ir import BlueprintIR
from esper.validate.policy import ValidationPolicy

T = torch.Tensor


@dataclass
class Subject:
    """A loaded artifact ready to be checked. ``module`` carries random (seeded)
    parameters so no zero-initialised projection hides an error upstream; the
    graft check builds a fresh module with the declared init from ``factory``."""

    ir: BlueprintIR  # as submitted: the reference computes this graph
    factory: ModuleFactory
    module: BlueprintModule
    device: torch.device
    dtype_name: str
    key_map: dict[str, str]  # submitted parameter key -> the module's key
    policy: ValidationPolicy
    batch_sizes: tuple[int, ...]
    tol: float
    target: str
    backend: str
    atomic_reductions: bool = False
    """The artifact declares sums finished with atomics: their order, and so their
    last bits, may differ run to run (judged by ``check_determinism``'s bound)."""
    _eager: BlueprintModule | None = field(default=None, repr=False)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.compute_dtype

    @property
    def ref_device(self) -> torch.device:
        """Where the float64 reference runs: the validator's device (a GPU's float64
        is IEEE double too, and a conv block's reference takes seconds on CPU)."""
        return self.device

    @property
    def mid_batch(self) -> int:
        """A batch size for single-size checks: the largest non-power-of-two, if any."""
        odd = [b for b in self.batch_sizes if b & (b - 1)]
        return max(odd) if odd else max(self.batch_sizes)

    def eager(self) -> BlueprintModule:
        """The reference backend's module on the same device, dtype and parameters."""
        if self._eager is None:
            eager = build_module(self.module.ir, device=self.device, dtype=self.dtype).eval()
            with torch.no_grad():
                for key, p in eager.params.items():
                    p.copy_(self.module.params[key])
            self._eager = eager
        return self._eager


def randomize_parameters(module: BlueprintModule, seed: int) -> None:
    """Seeded parameters of typical scale: matrices ~ N(0, 1/fan_in), gains near 1,
    shifts near 0 (every projection nonzero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in module.params.items():
            if p.dim() >= 2:
                fan_in = max(1, p[0].numel())
                v = torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
            elif key.endswith("__weight"):
                v = 1.0 + 0.25 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            else:
                v = 0.25 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(v.to(device=p.device, dtype=p.dtype))


def bind_symbols(ir: BlueprintIR, batch: int, other: int) -> dict[str, int]:
    """The first symbolic dim (in input order) is the batch; the k-th other symbol
    gets ``other + k`` (distinct sizes catch transposed dims)."""
    symbols: dict[str, int] = {}
    for spec in ir.inputs:
        for d in spec.shape:
            if isinstance(d, str) and d not in symbols:
                symbols[d] = batch if not symbols else other + len(symbols) - 1
    return symbols


def fit_batches(ir: BlueprintIR, policy: ValidationPolicy, *, interpreted: bool,
                gpu: bool) -> tuple[int, ...]:
    """The policy's batch sizes that keep the inputs within the element budget
    (CPU: ``cpu_max_elements``, so a [B, 64, 32, 32] conv block stays quick in
    fp16); 1 and a non-power-of-two (3 if none fits) always remain."""
    sizes = policy.interpret_batch_sizes if interpreted else policy.batch_sizes
    if gpu:
        return sizes
    symbols = bind_symbols(ir, 1, policy.symbol_size)
    per_batch = sum(math.prod(symbols[d] if isinstance(d, str) else d for d in spec.shape)
                    for spec in ir.inputs)
    kept = {1, *(b for b in sizes if b * per_batch <= policy.cpu_max_elements)}
    if all(b & (b - 1) == 0 for b in kept):
        kept.add(3)
    return tuple(sorted(kept))


@dataclass(frozen=True)
class Inputs:
    """One set of inputs: ``module`` in the kernel's dtype on its device, and
    ``ref``, the very same values in float64 (rounding to the kernel's dtype is not
    the kernel's error) on the reference device."""

    module: list[T]
    ref: list[T]

    def leaves(self) -> tuple[list[T], list[T]]:
        """Fresh leaf copies (float inputs require grad) for a backward pass."""
        mod = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in self.module]
        ref = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in self.ref]
        return mod, ref


def make_inputs(s: Subject, batch: int, seed: int, *, scale: float = 1.0,
                other: int | None = None) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    symbols = bind_symbols(s.ir, batch, s.policy.symbol_size if other is None else other)
    mod, ref = [], []
    for spec in s.ir.inputs:
        shape = [symbols[d] if isinstance(d, str) else d for d in spec.shape]
        declared = spec.dtype.value
        if declared == "int64":
            x = torch.randint(0, 4, shape, generator=g)
        elif declared == "bool":
            x = torch.rand(shape, generator=g) < 0.5
        else:
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(s.dtype)
        mod.append(x.to(s.device))
        ref.append((x.double() if x.is_floating_point() else x).to(s.ref_device))
    return Inputs(mod, ref)


def reference_params(s: Subject, *, requires_grad: bool = False) -> dict[str, T]:
    """The module's parameters keyed as the submitted IR keys them, in float64."""
    return {
        ours: s.module.params[theirs].detach().to(s.ref_device, torch.float64)
        .requires_grad_(requires_grad)
        for ours, theirs in s.key_map.items()
    }


def reference(s: Subject, xs: Sequence[T], params: dict[str, T]) -> tuple[T, ...]:
    """The float64 ground truth of the submitted blueprint."""
    return evaluate(s.ir, xs, params)


def run(module: torch.nn.Module, xs: Sequence[T]) -> tuple[T, ...]:
    out = module(*xs)
    return out if isinstance(out, tuple) else (out,)


def cotangents(want: Sequence[T], s: Subject, seed: int) -> tuple[list[T], list[T]]:
    """Random output gradients: (kernel dtype on device, the same values in float64)."""
    g = torch.Generator().manual_seed(seed)
    mod, ref = [], []
    for w in want:
        c = torch.randn(w.shape, generator=g, dtype=torch.float64).to(s.dtype)
        mod.append(c.to(s.device))
        ref.append(c.double().to(s.ref_device))
    return mod, ref


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Deterministic algorithms, and every uninitialised float allocation
    (``torch.empty``, ``empty_like``, ``new_empty``…) filled with NaN (integers with
    their max), so an output element a kernel never writes cannot pass."""
    det = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        torch.use_deterministic_algorithms(det, warn_only=warn)
