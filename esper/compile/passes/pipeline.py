"""``optimize``: the passes in order, repeated to a fixed point, with a check that
the outputs' schemas are unchanged."""

from __future__ import annotations

from collections.abc import Callable

from esper.compile.passes.canonical import canonicalize_operands
from esper.compile.passes.cse import eliminate_common_subexpressions
from esper.compile.passes.dce import eliminate_dead_nodes
from esper.compile.passes.fold import fold_scale_identity
from esper.errors import CompileError
from esper.ir import BlueprintIR

Pass = Callable[[BlueprintIR], BlueprintIR]

PASSES: tuple[Pass, ...] = (
    fold_scale_identity,
    canonicalize_operands,
    eliminate_common_subexpressions,
    eliminate_dead_nodes,
)
MAX_ROUNDS = 8


def optimize(ir: BlueprintIR) -> BlueprintIR:
    """Semantics-preserving rewrites; parameterised nodes keep their ids. Returns
    ``ir`` itself when nothing applies (so re-optimising is cheap)."""
    current = ir
    for _ in range(MAX_ROUNDS):
        start = current
        for run in PASSES:
            current = run(current)
        if current is start:
            break
    if current is ir:
        return ir
    before, after = ir.output_schemas(), current.output_schemas()
    if after != before:
        raise CompileError(
            f"blueprint {ir.name!r}: optimisation changed the output schemas "
            f"{before} -> {after} (a pass is wrong)"
        )
    return current
