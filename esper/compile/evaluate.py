"""Float64 functional evaluation of an IR: the ground truth validators compare
kernels against. Composite ops (linear, conv2d, softmax, the norms, gelu, silu)
are written out from their definitions rather than through the torch kernels the
reference backend calls, so the two check each other. Differentiable: pass leaf
tensors with ``requires_grad`` and call ``backward`` on the result."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from esper.compile.inputs import bind_inputs, resolve_shape
from esper.compile.lowering import RunContext, node_attrs, reduce_dims
from esper.compile.params import param_keys
from esper.errors import CompileError
from esper.ir import BlueprintIR, IRNodeType

Op = IRNodeType
T = torch.Tensor
EvalRule = Callable[[dict[str, Any], Sequence[T], dict[str, T], RunContext], T]


def _linear(a: dict[str, Any], x: Sequence[T], p: dict[str, T], c: RunContext) -> T:
    y = torch.matmul(x[0], p["weight"].transpose(0, 1))
    return y + p["bias"] if "bias" in p else y


def _same_padding(kernel: int, dilation: int) -> tuple[int, int]:
    # torch pads 'same' with total d*(k-1), the odd extra element at the end.
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def _conv2d(a: dict[str, Any], x: Sequence[T], p: dict[str, T], c: RunContext) -> T:
    inp, w = x[0], p["weight"]
    unbatched = inp.dim() == 3
    if unbatched:
        inp = inp.unsqueeze(0)
    (kh, kw), (sh, sw), (dh, dw) = w.shape[-2:], a["stride"], a["dilation"]
    pad = a["padding"]
    if pad == "valid":
        top = bottom = left = right = 0
    elif pad == "same":
        (top, bottom), (left, right) = _same_padding(kh, dh), _same_padding(kw, dw)
    else:
        (top, left), (bottom, right) = pad, pad
    inp = F.pad(inp, (left, right, top, bottom))
    n, ch, h, wd = inp.shape
    groups, out_ch = a["groups"], w.shape[0]
    cols = F.unfold(inp, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # N, C*kh*kw, L
    cols = cols.view(n, groups, (ch // groups) * kh * kw, -1)
    weights = w.reshape(groups, out_ch // groups, -1)
    out = torch.einsum("gok,ngkl->ngol", weights, cols)
    h_out = (h - dh * (kh - 1) - 1) // sh + 1
    w_out = (wd - dw * (kw - 1) - 1) // sw + 1
    out = out.reshape(n, out_ch, h_out, w_out)
    if "bias" in p:
        out = out + p["bias"].view(1, out_ch, 1, 1)
    return out.squeeze(0) if unbatched else out


def _gelu(a: dict[str, Any], x: Sequence[T], p: dict[str, T], c: RunContext) -> T:
    v = x[0]
    if a["approximate"] == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)
        return 0.5 * v * (1.0 + torch.tanh(inner))
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def _softmax(a: dict[str, Any], x: Sequence[T], p: dict[str, T], c: RunContext) -> T:
    v = x[0]
    # The shift changes nothing mathematically (nor the gradient); it only avoids overflow.
    e = torch.exp(v - torch.amax(v, dim=a["dim"], keepdim=True).detach())
    return e / torch.sum(e, dim=a["dim"], keepdim=True)


def _norm_dims(a: dict[str, Any], v: T) -> tuple[int, ...]:
    return tuple(range(v.dim() - len(a["normalized_shape"]), v.dim()))


def _layer_norm(a: dict[str, Any], x: Sequence[T], p: dict[str, T], c: RunContext) -> T:
    v = x[0]
    dims = _norm_dims(a, v)
    centred = v - torch.mean(v, dim=dims, keepdim=True)
    var = torch.mean(centred * centred, dim=dims, keepdim=True)  # biased, as torch
    y = centred / torch.sqrt(var + a["eps"])
    if "weight" in p:
        y = y * p["weight"]
    if "bias" in p:
        y = y + p["bias"]
    return y


def _rms_norm(a: dict[str, Any], x: Sequence[T], p: dict[str, T], c: RunContext) -> T:
    v = x[0]
    ms = torch.mean(v * v, dim=_norm_dims(a, v), keepdim=True)
    y = v / torch.sqrt(ms + a["eps"])
    return y * p["weight"] if "weight" in p else y


def _reduce(fn: Callable[..., T]) -> EvalRule:
    def rule(a: dict[str, Any], x: Sequence[T], p: dict[str, T], c: RunContext) -> T:
        return fn(x[0], dim=reduce_dims(a.get("dim"), x[0].dim()), keepdim=a["keepdim"])

    return rule


EVALUATION: dict[IRNodeType, EvalRule] = {
    Op.LINEAR: _linear,
    Op.MATMUL: lambda a, x, p, c: torch.matmul(x[0], x[1]),
    Op.CONV2D: _conv2d,
    Op.ADD: lambda a, x, p, c: x[0] + x[1],
    Op.SUB: lambda a, x, p, c: x[0] - x[1],
    Op.MUL: lambda a, x, p, c: x[0] * x[1],
    Op.DIV: lambda a, x, p, c: x[0] / x[1],
    Op.RELU: lambda a, x, p, c: torch.where(x[0] > 0, x[0], torch.zeros_like(x[0])),
    Op.GELU: _gelu,
    Op.SILU: lambda a, x, p, c: x[0] * torch.sigmoid(x[0]),
    Op.SIGMOID: lambda a, x, p, c: torch.sigmoid(x[0]),
    Op.TANH: lambda a, x, p, c: torch.tanh(x[0]),
    Op.SOFTMAX: _softmax,
    Op.LAYER_NORM: _layer_norm,
    Op.RMS_NORM: _rms_norm,
    Op.DROPOUT: lambda a, x, p, c: x[0],  # evaluation semantics: dropout is the identity
    Op.SUM: _reduce(torch.sum),
    Op.MEAN: _reduce(torch.mean),
    Op.MAX: _reduce(torch.amax),
    Op.RESHAPE: lambda a, x, p, c: torch.reshape(x[0], resolve_shape(a["shape"], c.symbols)),
    Op.PERMUTE: lambda a, x, p, c: torch.permute(x[0], tuple(a["dims"])),
    Op.CONCAT: lambda a, x, p, c: torch.cat(list(x), dim=a["dim"]),
    Op.IDENTITY: lambda a, x, p, c: x[0],
    Op.SCALE: lambda a, x, p, c: x[0] * a["value"],
}

_missing = set(IRNodeType) - set(EVALUATION)
assert not _missing, f"evaluation table lacks {sorted(m.value for m in _missing)}"


def evaluate(
    ir: BlueprintIR,
    inputs: Sequence[T],
    params: Mapping[str, T],
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[T, ...]:
    """Outputs of ``ir`` (in output order) computed in ``dtype``, every float input
    and parameter upcast first. ``params`` is keyed like ``BlueprintModule.params``
    (see ``esper.compile.params``; extra keys are ignored). Dropout is the identity.
    Dtype-dependent defaults (``rms_norm`` eps None) follow the blueprint's
    declared dtypes, as in every backend (``lowering.node_attrs``)."""
    symbols = bind_inputs(ir, inputs)
    ctx = RunContext(symbols=symbols, training=False)

    def up(t: T) -> T:
        return t.to(dtype) if t.is_floating_point() else t

    env: dict[str, T] = {i.name: up(t) for i, t in zip(ir.inputs, inputs, strict=True)}
    keys = param_keys(ir)
    by_node: dict[str, dict[str, T]] = {}
    for (node_id, name), key in keys.items():
        if key not in params:
            raise CompileError(f"node {node_id!r}: parameter {name!r} (key {key!r}) not given")
        by_node.setdefault(node_id, {})[name] = up(params[key])
    attrs = node_attrs(ir)
    for node in ir.topological_order():
        args = [env[i] for i in node.inputs]
        try:
            env[node.id] = EVALUATION[node.op](attrs[node.id], args, by_node.get(node.id, {}), ctx)
        except Exception as exc:
            exc.add_note(f"while evaluating node {node.id!r} ({node.op.value}) of {ir.name!r}")
            raise
    return tuple(env[o] for o in ir.outputs)
