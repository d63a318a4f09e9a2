"""Whether a plan that was not measured should run its fused kernels or the
blueprint's plain torch ops (``plan.serve``).

A fused plan pays for itself by launching fewer kernels and moving fewer bytes
than the torch ops it replaces; it costs a Python backward in place of C++
autograd (on an H200 host, 0.1-0.3 ms more host time per step for a block of
cuDNN/cuBLAS calls). Where the fusion saves almost nothing that cost is all
that is left: a ``conv2d`` whose one-op epilogue is fused, or a ``linear``
whose bias the group takes over from ``addmm`` (which adds it for free), had
the same device time as eager on the H200 and lost 5-25% to it on the host.

So without a measurement the plan is served only when its groups remove at
least ``MIN_SAVED`` kernels per step, counting for each group the elementwise
ops it merges beyond the first (a ``linear``'s bias counted free) and
``ROW_REDUCTION_SAVED`` for a row reduction, whose torch backward takes several
kernels (layer_norm: input grad, then weight and bias grads). With a GPU at
compile time tuning measures instead, and this prediction only sets how clear a
win the fused plan must show there (``margin``)."""

from __future__ import annotations

from esper.triton.plan import FusedStep, Plan

FREE_UNITS = frozenset({"bias", "identity", "dropout"})
ROW_REDUCTION_SAVED = 2
MIN_SAVED = 2
# the whole-step win tuning asks of a fused plan over the torch ops
MARGIN_PREDICTED_WIN = 0.02  # measurement noise
MARGIN_PREDICTED_LOSS = 0.05  # noise, and the host-bound regime a short timing misses


def kernels_saved(g: FusedStep) -> int:
    """Kernels per forward (and about as many per backward) that fusing ``g`` removes."""
    ops = [u for u in g.units if u.op not in FREE_UNITS]
    saved = max(0, len(ops) - 1)
    if any(v.op in ("rsum", "rmax") for v in g.fwd.vals):
        saved += ROW_REDUCTION_SAVED
    return saved


def predicted_serve(plan: Plan) -> str:
    """``"schedule"`` when the fused plan should beat the torch ops, else ``"reference"``."""
    return "schedule" if sum(kernels_saved(g) for g in plan.groups()) >= MIN_SAVED \
        else "reference"


def margin(plan: Plan) -> float:
    """How much faster than the torch ops a measured fused plan must be to be kept."""
    return MARGIN_PREDICTED_WIN if predicted_serve(plan) == "schedule" \
        else MARGIN_PREDICTED_LOSS
