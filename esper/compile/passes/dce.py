"""Dead-node elimination: drop every node no output depends on. A validated IR
has no dead nodes (the IR rejects them), but the other passes create some while
rewriting, so every rewrite is pruned with ``live_nodes`` before it is rebuilt.
Graph inputs always stay: they are the module's call signature."""

from __future__ import annotations

from esper.compile.passes.rewrite import Rewrite
from esper.ir import BlueprintIR


def eliminate_dead_nodes(ir: BlueprintIR) -> BlueprintIR:
    rw = Rewrite(ir)
    for node in ir.topological_order():
        rw.keep(node)
    return rw.build() if len(rw.live()) < len(ir.nodes) else ir
