"""Canonical operand order for commutative ops (``add``, ``mul``): operands sorted
by a structural hash of the subgraph that computes them (independent of node
ids and symbol names; ties broken by id), so equivalent graphs reach backends alike."""

from __future__ import annotations

import hashlib

from esper.compile.passes.rewrite import COMMUTATIVE, Rewrite, attrs_key, symbol_names
from esper.ir import BlueprintIR


def structural_hashes(ir: BlueprintIR) -> dict[str, str]:
    """name -> hash of what computes it: inputs by position, nodes by op, attrs and
    their operands' hashes (commutative operands unordered). Parameterised nodes
    with equal attrs hash alike; that only matters as a tie, never for merging."""
    symbols = symbol_names(ir)
    hashes = {i.name: hashlib.sha256(f"input:{k}".encode()).hexdigest()
              for k, i in enumerate(ir.inputs)}
    for node in ir.topological_order():
        operands = [hashes[i] for i in node.inputs]
        if node.op in COMMUTATIVE:
            operands.sort()
        text = f"{node.op.value}|{attrs_key(node, symbols)}|{','.join(operands)}"
        hashes[node.id] = hashlib.sha256(text.encode()).hexdigest()
    return hashes


def canonicalize_operands(ir: BlueprintIR) -> BlueprintIR:
    hashes = structural_hashes(ir)
    rw = Rewrite(ir)
    changed = False
    for node in ir.topological_order():
        inputs = list(node.inputs)
        if node.op in COMMUTATIVE:
            ordered = sorted(inputs, key=lambda name: (hashes[name], name))
            changed |= ordered != inputs
            inputs = ordered
        rw.keep(node, inputs=inputs)
    return rw.build() if changed else ir
