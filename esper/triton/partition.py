"""Split an optimised BlueprintIR into fusion groups and torch steps.

Matmul-like ops (``linear``, ``matmul``, ``conv2d``) stay on cuBLAS/cuDNN; a
``linear``'s bias moves into the group that consumes its output, so the bias
add and the bias grad ride along the epilogue kernel. Elementwise ops and row
reductions over the last dim (softmax, layer_norm, rms_norm, sum/mean/max) are
grouped greedily by their *frame* (the full tile shape ``[..., C]``): a unit
joins a producer's group when the frames match, every operand broadcasts as
full/row/col/scalar, and merging keeps the group graph acyclic. Everything else
(reshape, permute, concat, active dropout, reductions over other dims) is a
torch step. The result is a JSON-able plan (``esper.triton.plan``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esper.ir import BlueprintIR, IRNodeType
from esper.triton.plan import FusedStep, GroupInput, GroupOutput, Plan, TorchStep, Unit
from esper.triton.tiles import TileProgram

Op = IRNodeType
MAX_C = 16384  # a whole row must fit one program's registers

_UNARY = {
    Op.RELU: "relu", Op.SILU: "silu", Op.SIGMOID: "sigmoid", Op.TANH: "tanh",
}
_BINARY = {Op.ADD: "add", Op.SUB: "sub", Op.MUL: "mul", Op.DIV: "div"}
MATMUL_OPS = (Op.LINEAR, Op.MATMUL, Op.CONV2D)


def kind_of(shape: Sequence[Any], frame: Sequence[Any]) -> str | None:
    """How a tensor of ``shape`` broadcasts onto ``frame`` (None: not a tile kind)."""
    shape, frame = tuple(shape), tuple(frame)
    if len(shape) > len(frame):
        return None
    pad = (1,) * (len(frame) - len(shape)) + shape
    if pad == frame:
        return "full"
    if all(d == 1 for d in pad):
        return "scalar"
    if pad[-1] == frame[-1] and all(d == 1 for d in pad[:-1]):
        return "col"
    if pad[-1] == 1 and pad[:-1] == frame[:-1] and len(shape) == len(frame):
        return "row"
    return None


@dataclass
class _U:
    """A fusible unit before grouping: one IR node (or a linear's bias add)."""

    uid: int
    node: str
    op: str  # IR op value, or "bias"
    inputs: list[str]  # value names (activations)
    params: list[tuple[str, str]]  # (node id, param name), col kind
    out: str
    frame: tuple[Any, ...]
    out_kind: str  # "full" or "row"
    attrs: dict[str, Any] = field(default_factory=dict)


def _fusible(node: Any, attrs: dict[str, Any], shapes: dict[str, tuple[Any, ...]],
             own_params: dict[str, Any]) -> _U | None:
    """A unit for ``node`` when its op and operand shapes fit one row tile."""
    op = node.op
    ins = list(node.inputs)
    out_shape = shapes[node.id]
    plain = op in _UNARY or op in _BINARY or op in (Op.GELU, Op.SCALE, Op.IDENTITY)
    if plain or (op is Op.DROPOUT and attrs.get("p", 0.0) == 0.0):
        frame, out_kind = out_shape, "full"
    elif op is Op.SOFTMAX:
        frame, out_kind = out_shape, "full"
        if attrs["dim"] not in (-1, len(frame) - 1):
            return None
    elif op in (Op.LAYER_NORM, Op.RMS_NORM):
        frame, out_kind = out_shape, "full"
        if len(tuple(attrs["normalized_shape"])) != 1:
            return None
    elif op in (Op.SUM, Op.MEAN, Op.MAX):
        frame, out_kind = shapes[ins[0]], "row"
        dims = attrs.get("dim")
        rank = len(frame)
        if dims is None or [d % rank for d in dims] != [rank - 1] or rank < 2:
            return None
    else:
        return None
    if not frame or not isinstance(frame[-1], int) or not 1 < frame[-1] <= MAX_C:
        return None
    for v in ins:
        if kind_of(shapes[v], frame) is None:
            return None
    # norm gains/shifts, weight before bias (the lowering applies them in order)
    params: list[tuple[str, str]] = [(node.id, n) for n in ("weight", "bias") if n in own_params]
    return _U(-1, node.id, op.value, ins, params, node.id, tuple(frame), out_kind, attrs)


def _lower_unit(p: TileProgram, u: _U, val: dict[str, int], c: int) -> int:
    """Append unit ``u``'s tile ops to ``p``; return its output value id."""
    a = [val[v] for v in u.inputs]
    prm = [val[f"{n}.{k}"] for n, k in u.params]
    op, at = u.op, u.attrs
    if op == "bias":
        return p.op("add", a[0], prm[0])
    if op in {o.value for o in _BINARY}:
        return p.op(_BINARY[Op(op)], a[0], a[1])
    if op in {o.value for o in _UNARY}:
        return p.op(_UNARY[Op(op)], a[0])
    if op == "gelu":
        return p.op("gelu_tanh" if at.get("approximate") == "tanh" else "gelu", a[0])
    if op == "scale":
        return p.op("mulc", a[0], attr=float(at["value"]))
    if op in ("identity", "dropout"):
        return a[0]
    if op == "softmax":
        m = p.op("rmax", a[0], attr="nograd")
        e = p.op("exp", p.op("sub", a[0], m))
        return p.op("mul", e, p.op("recip", p.op("rsum", e)))
    if op == "layer_norm":
        mu = p.op("mulc", p.op("rsum", a[0]), attr=1.0 / c)
        d = p.op("sub", a[0], mu)
        var = p.op("mulc", p.op("rsum", p.op("mul", d, d)), attr=1.0 / c)
        y = p.op("mul", d, p.op("rsqrt", p.op("addc", var, attr=float(at["eps"]))))
        for (_, name), pv in zip(u.params, prm, strict=True):
            y = p.op("mul" if name == "weight" else "add", y, pv)
        return y
    if op == "rms_norm":
        ms = p.op("mulc", p.op("rsum", p.op("mul", a[0], a[0])), attr=1.0 / c)
        y = p.op("mul", a[0], p.op("rsqrt", p.op("addc", ms, attr=float(at["eps"]))))
        return p.op("mul", y, prm[0]) if prm else y
    if op == "sum":
        return p.op("rsum", a[0])
    if op == "mean":
        return p.op("mulc", p.op("rsum", a[0]), attr=1.0 / c)
    if op == "max":
        return p.op("rmax", a[0])
    raise NotImplementedError(f"no tile lowering for {op!r}")


def _creates_cycle(members: set[int], succ: dict[str, list[str]]) -> bool:
    """Whether a path leaves the merged group and comes back into it (through
    units or torch steps): such a merge would make the group wait for itself."""
    inside = {f"u{m}" for m in members}
    stack = [c for n in inside for c in succ.get(n, []) if c not in inside]
    seen: set[str] = set()
    while stack:
        x = stack.pop()
        if x in inside:
            return True
        if x in seen:
            continue
        seen.add(x)
        stack.extend(succ.get(x, []))
    return False


def partition(ir: BlueprintIR, attrs: dict[str, dict[str, Any]]) -> Plan:
    """Group ``ir`` (already optimised) into fused steps and torch steps.

    ``attrs``: every node's resolved attrs with graph-dependent defaults filled
    (``esper.compile.lowering.node_attrs``)."""
    schemas = ir.infer_shapes()
    shapes = {k: tuple(v.shape) for k, v in schemas.items()}
    order = list(ir.topological_order())
    param_shapes = ir.param_shapes()

    units: dict[int, _U] = {}
    steps_pre: list[tuple[str, Any]] = []  # ("torch", TorchStep) | ("unit", uid)
    for node in order:
        at = attrs[node.id]
        if node.op is Op.LINEAR and "bias" in param_shapes.get(node.id, {}):
            mm = f"{node.id}#mm"
            shapes[mm] = shapes[node.id]
            steps_pre.append(("torch", TorchStep(node=node.id, out=mm, inputs=list(node.inputs),
                                                 bias=False)))
            u = _U(len(units), node.id, "bias", [mm], [(node.id, "bias")], node.id,
                   shapes[node.id], "full")
            last = shapes[node.id][-1]
            if not (isinstance(last, int) and 1 < last <= MAX_C):
                steps_pre[-1][1].bias, steps_pre[-1][1].out = True, node.id
                continue
            units[u.uid] = u
            steps_pre.append(("unit", u.uid))
            continue
        fu = _fusible(node, at, shapes, param_shapes.get(node.id, {}))
        if fu is None:
            steps_pre.append(("torch", TorchStep(node=node.id, out=node.id,
                                                 inputs=list(node.inputs), bias=None)))
            continue
        fu.uid = len(units)
        units[fu.uid] = fu
        steps_pre.append(("unit", fu.uid))

    producer = {u.out: uid for uid, u in units.items()}
    consumers: dict[str, list[int]] = {}
    for uid, u in units.items():
        for v in u.inputs:
            consumers.setdefault(v, []).append(uid)
    # the step graph (units and torch steps) that cycle checks walk
    torch_out_consumers: dict[str, list[str]] = {}
    readers: dict[str, list[str]] = {}
    out_of: dict[str, str] = {}
    for kind, st in steps_pre:
        key = f"u{st}" if kind == "unit" else f"t:{st.out}"
        out_of[key] = units[st].out if kind == "unit" else st.out
        for v in (units[st].inputs if kind == "unit" else st.inputs):
            readers.setdefault(v, []).append(key)
            if kind == "torch":
                torch_out_consumers.setdefault(v, []).append(st.out)
    succ = {key: readers.get(value, []) for key, value in out_of.items()}
    group_of = {uid: uid for uid in units}
    members: dict[int, set[int]] = {uid: {uid} for uid in units}
    for uid in sorted(units):
        u = units[uid]
        for v in u.inputs:
            src = producer.get(v)
            if src is None:
                continue
            s = units[src]
            if s.frame != u.frame or kind_of(shapes[v], u.frame) != s.out_kind:
                continue
            ga, gb = group_of[src], group_of[uid]
            if ga == gb:
                continue
            merged = members[ga] | members[gb]
            if _creates_cycle(merged, succ):
                continue
            for m in members[gb]:
                group_of[m] = ga
            members[ga] = merged
            del members[gb]

    graph_outputs = set(ir.outputs)
    steps: list[TorchStep | FusedStep] = []
    seen_groups: set[int] = set()
    for kind, s in steps_pre:
        if kind == "torch":
            steps.append(s)
        elif group_of[s] not in seen_groups:
            g = group_of[s]
            seen_groups.add(g)
            steps.append(_build_group(len(seen_groups) - 1,
                                      [units[m] for m in sorted(members[g])], shapes,
                                      consumers, graph_outputs | set(torch_out_consumers)))
    steps = _toposort(steps, {i.name for i in ir.inputs})
    plan = Plan(inputs=[i.name for i in ir.inputs], outputs=list(ir.outputs), steps=steps)
    _unsplit_lonely_biases(plan)
    return plan


def _toposort(steps: list[TorchStep | FusedStep], ready: set[str]) -> list[TorchStep | FusedStep]:
    """Order steps so each runs after the producers of its inputs (stable)."""
    def needs(s: TorchStep | FusedStep) -> list[str]:
        if isinstance(s, TorchStep):
            return s.inputs
        return [i.value for i in s.inputs if i.param is None]

    def makes(s: TorchStep | FusedStep) -> list[str]:
        return [s.out] if isinstance(s, TorchStep) else [o.value for o in s.outputs]

    have, out, todo = set(ready), [], list(steps)
    while todo:
        for i, s in enumerate(todo):
            if all(v in have for v in needs(s)):
                out.append(s)
                have.update(makes(s))
                del todo[i]
                break
        else:
            raise RuntimeError("fusion produced a cyclic step graph")  # a partition bug
    return out


def _build_group(index: int, mem: list[_U], shapes: dict[str, tuple[Any, ...]],
                 cons: dict[str, list[int]], needed: set[str]) -> FusedStep:
    """``cons``: direct unit consumers of each value; ``needed``: values read by
    torch steps or returned by the graph."""
    frame = mem[0].frame
    c = int(frame[-1])
    p = TileProgram()
    val: dict[str, int] = {}
    inside = {u.out for u in mem}
    uids = {u.uid for u in mem}
    inputs: list[GroupInput] = []
    for u in mem:
        for v in u.inputs:
            if v not in inside and v not in val:
                kind = kind_of(shapes[v], frame)
                assert kind is not None  # _fusible checked every operand
                val[v] = p.load(v, kind)
                inputs.append(GroupInput(value=v, kind=kind, param=None))
        for n, k in u.params:
            key = f"{n}.{k}"
            if key not in val:
                val[key] = p.load(key, "col")
                inputs.append(GroupInput(value=key, kind="col", param=[n, k]))
        val[u.out] = _lower_unit(p, u, val, c)
    outputs: list[GroupOutput] = []
    for u in mem:
        used_outside = any(x not in uids for x in cons.get(u.out, []))
        if used_outside or u.out in needed:
            vid = val[u.out]
            kind = p.kind(vid)
            if kind != u.out_kind:  # e.g. identity of a row value: store as its own kind
                kind = u.out_kind
                vid = p.op("expand", vid) if kind == "full" else vid
            p.output(u.out, vid)
            outputs.append(GroupOutput(value=u.out, kind=kind, shape=list(shapes[u.out])))
    units = [Unit(node=u.node, op=u.op, inputs=u.inputs, out=u.out) for u in mem]
    return FusedStep(name=f"g{index}", c=c, frame=list(frame), inputs=inputs, outputs=outputs,
                     fwd=p, units=units)


def _unsplit_lonely_biases(plan: Plan) -> None:
    """A group that is only bias adds gains nothing over cuBLAS's fused bias: undo it."""
    keep: list[TorchStep | FusedStep] = []
    lonely: set[str] = set()
    for s in plan.steps:
        if isinstance(s, FusedStep) and all(u.op == "bias" for u in s.units):
            lonely.update(u.node for u in s.units)
            continue
        keep.append(s)
    for s in keep:
        if isinstance(s, TorchStep) and s.node in lonely and s.bias is False:
            s.bias, s.out = True, s.node
    plan.steps = keep


def row_count(frame: Sequence[Any], symbols: dict[str, int]) -> int:
    """Rows of a frame once its symbols are bound."""
    return math.prod(symbols[d] if isinstance(d, str) else int(d) for d in frame[:-1])
