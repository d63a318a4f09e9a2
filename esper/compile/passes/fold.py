"""Folding of ``scale``/``identity`` chains: ``identity(x)`` -> ``x``,
``scale(x, 1.0)`` -> ``x``, ``scale(scale(x, a), b)`` -> ``scale(x, a*b)`` (the
outer node keeps its id; the inner one dies in DCE when nothing else reads it)."""

from __future__ import annotations

from typing import Any

from esper.compile.passes.rewrite import Rewrite
from esper.ir import BlueprintIR, IRNodeType


def fold_scale_identity(ir: BlueprintIR) -> BlueprintIR:
    rw = Rewrite(ir)
    kept: dict[str, dict[str, Any]] = {}
    changed = False
    for node in ir.topological_order():
        if node.op is IRNodeType.IDENTITY and rw.may_drop(node, rw.resolve(node.inputs[0])):
            rw.drop(node, rw.resolve(node.inputs[0]))
            changed = True
            continue
        if node.op is IRNodeType.SCALE:
            source = rw.resolve(node.inputs[0])
            value = float(node.resolved_attrs["value"])
            inner = kept.get(source)
            if inner is not None and inner["op"] == IRNodeType.SCALE.value:
                value *= float(inner["attrs"]["value"])
                source = inner["inputs"][0]
                changed = True
            if value == 1.0 and rw.may_drop(node, source):
                rw.drop(node, source)
                changed = True
                continue
            kept[node.id] = rw.keep(node, inputs=[source], attrs={"value": value})
            continue
        kept[node.id] = rw.keep(node)
    return rw.build() if changed else ir
