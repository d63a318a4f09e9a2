"""Common-subexpression elimination: two nodes with the same op, resolved attrs
and inputs (in either order for add/mul) compute the same value, so users of the
later one read the earlier one. Never merges parameterised nodes (each owns its
parameters) nor dropout (each draws its own mask)."""

from __future__ import annotations

from esper.compile.passes.rewrite import COMMUTATIVE, NEVER_MERGE, Rewrite, attrs_key
from esper.ir import BlueprintIR


def eliminate_common_subexpressions(ir: BlueprintIR) -> BlueprintIR:
    rw = Rewrite(ir)
    seen: dict[tuple[str, str, tuple[str, ...]], str] = {}
    merged = False
    for node in ir.topological_order():
        inputs = [rw.resolve(i) for i in node.inputs]
        if node.op in NEVER_MERGE:
            rw.keep(node, inputs=inputs)
            continue
        operands = tuple(sorted(inputs)) if node.op in COMMUTATIVE else tuple(inputs)
        key = (node.op.value, attrs_key(node), operands)
        if key in seen and rw.may_drop(node, seen[key]):
            rw.drop(node, seen[key])
            merged = True
            continue
        seen.setdefault(key, node.id)
        rw.keep(node, inputs=inputs)
    return rw.build() if merged else ir
