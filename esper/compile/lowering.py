"""The lowering table: one rule per IR op, expressed with torch ops. This is the
semantic reference every other backend is checked against, and the fallback a
fused backend may use for a node it does not fuse."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from esper.compile.dtypes import torch_dtype
from esper.compile.inputs import resolve_shape
from esper.ir import BlueprintIR, IRNodeType

Op = IRNodeType


@dataclass
class RunContext:
    """Per-call state a rule may need: bound symbols and train/eval mode."""

    symbols: dict[str, int] = field(default_factory=dict)
    training: bool = False


# A rule gets the node's resolved attrs, its input tensors (in the node's order),
# its parameters by name (``weight``/``bias``; absent when the node has none) and
# the run context, and returns the node's one output tensor.
Rule = Callable[[dict[str, Any], Sequence[torch.Tensor], dict[str, torch.Tensor], RunContext],
                torch.Tensor]


def node_attrs(ir: BlueprintIR) -> dict[str, dict[str, Any]]:
    """Every node's resolved attrs, with what depends on the graph filled in:
    ``rms_norm`` eps None becomes ``finfo(declared input dtype).eps``. The
    blueprint's declared dtype, not the dtype a module computes in, so every
    backend, every compiled dtype and the float64 evaluator use one eps."""
    out: dict[str, dict[str, Any]] = {}
    for node in ir.nodes:
        attrs = dict(node.resolved_attrs)
        if node.op is IRNodeType.RMS_NORM and attrs.get("eps") is None:
            dtype = torch_dtype(ir.schema_of(node.inputs[0]).dtype)
            attrs["eps"] = torch.finfo(dtype).eps
        out[node.id] = attrs
    return out


def reduce_dims(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """``sum``/``mean``/``max`` ``dim`` attr as a tuple of axes (None = every axis)."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        return (dim,)
    return tuple(dim)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Rule:
    return lambda a, x, p, c: fn(x[0])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Rule:
    return lambda a, x, p, c: fn(x[0], x[1])


def _conv2d(a: dict[str, Any], x: Sequence[torch.Tensor], p: dict[str, torch.Tensor],
            c: RunContext) -> torch.Tensor:
    return F.conv2d(x[0], p["weight"], p.get("bias"), stride=a["stride"], padding=a["padding"],
                    dilation=a["dilation"], groups=a["groups"])


def _sum(a: dict[str, Any], x: Sequence[torch.Tensor], p: dict[str, torch.Tensor],
         c: RunContext) -> torch.Tensor:
    return torch.sum(x[0], dim=reduce_dims(a.get("dim"), x[0].dim()), keepdim=a["keepdim"])


def _mean(a: dict[str, Any], x: Sequence[torch.Tensor], p: dict[str, torch.Tensor],
          c: RunContext) -> torch.Tensor:
    return torch.mean(x[0], dim=reduce_dims(a.get("dim"), x[0].dim()), keepdim=a["keepdim"])


def _max(a: dict[str, Any], x: Sequence[torch.Tensor], p: dict[str, torch.Tensor],
         c: RunContext) -> torch.Tensor:
    # amax: values only; on ties the gradient is shared equally among the maxima.
    return torch.amax(x[0], dim=reduce_dims(a.get("dim"), x[0].dim()), keepdim=a["keepdim"])


LOWERING: dict[IRNodeType, Rule] = {
    Op.LINEAR: lambda a, x, p, c: F.linear(x[0], p["weight"], p.get("bias")),
    Op.MATMUL: _binary(torch.matmul),
    Op.CONV2D: _conv2d,
    Op.ADD: _binary(torch.add),
    Op.SUB: _binary(torch.sub),
    Op.MUL: _binary(torch.mul),
    Op.DIV: _binary(torch.div),
    Op.RELU: _unary(F.relu),
    Op.GELU: lambda a, x, p, c: F.gelu(x[0], approximate=a["approximate"]),
    Op.SILU: _unary(F.silu),
    Op.SIGMOID: _unary(torch.sigmoid),
    Op.TANH: _unary(torch.tanh),
    Op.SOFTMAX: lambda a, x, p, c: F.softmax(x[0], dim=a["dim"]),
    Op.LAYER_NORM: lambda a, x, p, c: F.layer_norm(
        x[0], list(a["normalized_shape"]), p.get("weight"), p.get("bias"), a["eps"]),
    Op.RMS_NORM: lambda a, x, p, c: F.rms_norm(
        x[0], list(a["normalized_shape"]), p.get("weight"), a["eps"]),
    Op.DROPOUT: lambda a, x, p, c: F.dropout(x[0], a["p"], training=c.training),
    Op.SUM: _sum,
    Op.MEAN: _mean,
    Op.MAX: _max,
    Op.RESHAPE: lambda a, x, p, c: torch.reshape(x[0], resolve_shape(a["shape"], c.symbols)),
    Op.PERMUTE: lambda a, x, p, c: torch.permute(x[0], tuple(a["dims"])),
    Op.CONCAT: lambda a, x, p, c: torch.cat(list(x), dim=a["dim"]),
    Op.IDENTITY: lambda a, x, p, c: x[0],
    Op.SCALE: lambda a, x, p, c: x[0] * a["value"],
}

_missing = set(IRNodeType) - set(LOWERING)
assert not _missing, f"lowering table lacks {sorted(m.value for m in _missing)}"
