"""How close a kernel must come to the float64 ground truth, per dtype, and the
two error measures every numeric check uses, for a tensor ``got`` and its float64
reference ``ref``:

- relative error (the figure held to the dtype's bound):
  ``||got - ref||_2 / ||ref||_2``, the usual tensor-wise measure;
- element error (held to ``ELEMENT_FACTOR`` x the bound):
  ``max_i |got_i - ref_i| / (|ref_i| + rms(ref))``, so one wrong element cannot
  hide in a large tensor (the RMS floor judges elements near zero against the
  tensor's scale instead of blowing up where the reference crosses zero).

Elements where the reference is not finite, or beyond the dtype's range, are left
out; a non-finite result where the reference is finite makes both infinite.

Gradients are judged against the scale of their whole backward pass (``scale``,
the RMS of every reference gradient): a gradient that is analytically zero — a
key bias under softmax, whose shift cancels — holds only rounding noise of that
scale, and its own (zero) norm would make any noise look infinitely wrong."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are compared, not by the worker
    import torch

# Relative error bounds by dtype (issue 6). "tf32" applies to float32 kernels
# on a device where matmuls may run in TF32 (policy ``allow_tf32``).
REL_TOLERANCE: dict[str, float] = {
    "float32": 1e-4,
    "tf32": 2e-3,
    "float16": 2e-3,
    "bfloat16": 2e-2,
}

# The element error may reach this multiple of the bound: rounding in fp16/bf16
# reductions (an eager torch fp16 backward reaches ~2e-3) without letting a
# single element stray far (1% off fails fp32 by 10x).
ELEMENT_FACTOR = 10.0

# Where the eager reference backend itself misses a bound on the validator's device
# (cuDNN's bf16 conv weight gradient reaches ~2.2e-2 on an H200), a kernel may be
# within EAGER_FACTOR x eager's own error on the same inputs — never beyond
# EAGER_CAP x the dtype's bounds (as torch.compile's accuracy checks allow 2x eager).
EAGER_FACTOR = 2.0
EAGER_CAP = 5.0

# Graft safety: at the declared init a seed changes the host by at most this
# (max abs; zero-initialised projections make the change exactly 0 in any dtype).
GRAFT_BOUND = 1e-6

# A guard against 0/0 for an all-zero reference; any error then counts in full.
_FLOOR = 1e-30


def tolerance(dtype: str, *, tf32: bool = False) -> float:
    """The relative error bound for a kernel computing in ``dtype``."""
    if dtype == "float32" and tf32:
        return REL_TOLERANCE["tf32"]
    try:
        return REL_TOLERANCE[dtype]
    except KeyError:
        raise ValueError(
            f"no tolerance for dtype {dtype!r} (one of {sorted(REL_TOLERANCE)})"
        ) from None


@dataclass(frozen=True, slots=True)
class Comparison:
    """The outcome of comparing one tensor with its reference."""

    error: float  # relative (norm-wise); inf when non-finite where ref is finite
    element_error: float  # the largest element error
    nonfinite: int  # elements non-finite in ``got`` where the reference is finite
    compared: int  # elements compared (reference finite and representable)

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0 and math.isfinite(self.error)


def rms_of(tensors: list[torch.Tensor]) -> float:
    """The RMS over every finite element of ``tensors`` together (float64)."""
    import torch

    total, count = 0.0, 0
    for t in tensors:
        v = t.detach().to(torch.float64)
        v = v[torch.isfinite(v)]
        total += float(v.square().sum())
        count += v.numel()
    return math.sqrt(total / count) if count else 0.0


def representable(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask of reference elements a ``dtype`` result could hold: finite and in range."""
    import torch

    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    return torch.isfinite(ref) & (ref.abs() <= limit)


def compare(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            scale: float = 0.0) -> Comparison:
    """``got`` (any dtype) against ``ref`` (float64), on ``ref``'s device; ``scale``
    is an RMS floor for the reference (0: its own RMS only)."""
    import torch

    ref64 = ref.detach().to(torch.float64)
    got64 = got.detach().to(device=ref64.device, dtype=torch.float64)
    if got64.shape != ref64.shape:
        raise ValueError(f"shape {tuple(got64.shape)} differs from the reference's "
                         f"{tuple(ref64.shape)}")
    mask = representable(ref64, dtype)
    compared = int(mask.sum())
    if compared == 0:
        return Comparison(error=0.0, element_error=0.0, nonfinite=0, compared=0)
    g, r = got64[mask], ref64[mask]
    bad = int((~torch.isfinite(g)).sum())
    if bad:
        return Comparison(error=math.inf, element_error=math.inf, nonfinite=bad,
                          compared=compared)
    diff = g - r
    rms = max(float(r.norm()) / math.sqrt(compared), scale, _FLOOR)
    element = float((diff.abs() / (r.abs() + rms)).max())
    error = float(diff.norm()) / (rms * math.sqrt(compared))
    return Comparison(error=error, element_error=element, nonfinite=0, compared=compared)
