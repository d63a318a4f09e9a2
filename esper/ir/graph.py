"""Graph-level validation in plain Python: ids, references, Kahn's order, cycles,
outputs, unused tensors, and dtype/shape inference through the op table."""

from __future__ import annotations

import difflib
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esper.ir.base import ir_error, node_error
from esper.ir.ops import OPS
from esper.ir.types import DType, RuleError, Shape

if TYPE_CHECKING:
    from esper.ir.blueprint import BlueprintIR
    from esper.ir.model import IRNode


@dataclass(frozen=True, slots=True)
class Analysis:
    """What validation learned, indexed densely: inputs are ``0..I-1``, node ``j``
    of the file is ``I + j``."""

    index: dict[str, int]
    args: tuple[tuple[int, ...], ...]  # per node (file order): its operands
    order: tuple[int, ...]  # node positions (file order) in Kahn's order
    shapes: tuple[Shape, ...]  # per tensor (inputs then nodes)
    dtypes: tuple[DType, ...]
    outputs: tuple[int, ...]


def _suggest(name: str, known: dict[str, int]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _index(ir: BlueprintIR) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, inp in enumerate(ir.inputs):
        if inp.name in index:
            raise ir_error(f"input {inp.name!r}: duplicate input name")
        index[inp.name] = i
    n_in = len(ir.inputs)
    for j, node in enumerate(ir.nodes):
        if node.id in index:
            prev = index[node.id]
            other = "an input" if prev < n_in else f"node #{prev - n_in}"
            raise node_error(node.id, node.op, f"duplicate id (also used by {other})")
        index[node.id] = n_in + j
    return index


def _args(ir: BlueprintIR, index: dict[str, int]) -> list[tuple[int, ...]]:
    out = []
    for node in ir.nodes:
        try:
            out.append(tuple([index[name] for name in node.inputs]))
        except KeyError:
            missing = next(n for n in node.inputs if n not in index)
            raise node_error(
                node.id,
                node.op,
                f"input {missing!r} is not defined (no graph input or node has that name"
                f"{_suggest(missing, index)})",
            ) from None
    return out


def _find_cycle(nodes: tuple[IRNode, ...], args: list[tuple[int, ...]], left: set[int],
                n_in: int) -> list[int]:
    """A cycle among the nodes Kahn could not order, walking operands backwards."""
    seen: dict[int, int] = {}
    walk: list[int] = []
    j = min(left)
    while j not in seen:
        seen[j] = len(walk)
        walk.append(j)
        j = next(a - n_in for a in args[j] if a - n_in in left)
    cycle = walk[seen[j] :]
    cycle.reverse()  # walked consumer -> operand; report in data-flow order
    k = cycle.index(min(cycle))  # start at the node earliest in the file
    return cycle[k:] + cycle[:k]


def _kahn(ir: BlueprintIR, args: list[tuple[int, ...]], n_in: int) -> list[int]:
    """Kahn's algorithm; ties go to the node earliest in the file (deterministic)."""
    n = len(args)
    indeg = [0] * n
    users: list[list[int]] = [[] for _ in range(n)]
    for j, a in enumerate(args):
        for t in a:
            if t >= n_in:
                indeg[j] += 1
                users[t - n_in].append(j)
    ready = [j for j in range(n) if indeg[j] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        j = heapq.heappop(ready)
        order.append(j)
        for u in users[j]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < n:
        left = set(range(n)) - set(order)
        cyc = _find_cycle(ir.nodes, args, left, n_in)
        path = " -> ".join(f"{ir.nodes[j].id!r} ({ir.nodes[j].op.value})" for j in cyc)
        first = ir.nodes[cyc[0]]
        raise ir_error(
            f"cycle: {path} -> {first.id!r}", first.id, first.op.value
        )
    return order


def _outputs(ir: BlueprintIR, index: dict[str, int]) -> tuple[int, ...]:
    if not ir.outputs:
        raise ir_error("outputs: a blueprint needs at least one output")
    seen: set[str] = set()
    for name in ir.outputs:
        if name not in index:
            raise ir_error(
                f"output {name!r} names nothing (no graph input or node has that name"
                f"{_suggest(name, index)})"
            )
        if name in seen:
            raise ir_error(f"output {name!r} is listed twice")
        seen.add(name)
    return tuple(index[name] for name in ir.outputs)


def _check_used(ir: BlueprintIR, args: list[tuple[int, ...]], outputs: tuple[int, ...]) -> None:
    used = set(outputs)
    for a in args:
        used.update(a)
    n_in = len(ir.inputs)
    for i, inp in enumerate(ir.inputs):
        if i not in used:
            raise ir_error(f"input {inp.name!r} is never used (no node reads it, not an output)")
    for j, node in enumerate(ir.nodes):
        if n_in + j not in used:
            raise node_error(
                node.id, node.op, "is never used (no node reads it and it is not an output)"
            )


def _infer(ir: BlueprintIR, args: list[tuple[int, ...]], order: list[int]
           ) -> tuple[list[Shape], list[DType]]:
    n_in = len(ir.inputs)
    shapes: list[Shape] = [inp.shape for inp in ir.inputs] + [()] * len(ir.nodes)
    dtypes: list[DType] = [inp.dtype for inp in ir.inputs] + [DType.float32] * len(ir.nodes)
    nodes = ir.nodes
    for j in order:
        node, a = nodes[j], args[j]
        spec = OPS[node.op]
        dt = dtypes[a[0]]
        for t in a:
            if dtypes[t] is not dt:
                names = ", ".join(f"{n!r} is {dtypes[x].value}" for n, x in zip(node.inputs, a,
                                                                                 strict=True))
                raise node_error(node.id, node.op, f"inputs mix dtypes ({names}); "
                                 "Esper does no implicit promotion")
        if dt not in spec.dtypes:
            raise node_error(node.id, node.op, f"needs {spec.dtype_class} inputs, got {dt.value}")
        try:
            shapes[n_in + j] = spec.shape([shapes[t] for t in a], node.resolved_attrs)
        except RuleError as exc:
            raise node_error(node.id, node.op, str(exc)) from None
        dtypes[n_in + j] = dt
    return shapes, dtypes


def analyse(ir: BlueprintIR) -> Analysis:
    """Validate the whole graph; raise IRValidationError naming the node and op."""
    index = _index(ir)
    args = _args(ir, index)
    n_in = len(ir.inputs)
    order = _kahn(ir, args, n_in)
    outputs = _outputs(ir, index)
    _check_used(ir, args, outputs)
    shapes, dtypes = _infer(ir, args, order)
    return Analysis(index, tuple(args), tuple(order), tuple(shapes), tuple(dtypes), outputs)
