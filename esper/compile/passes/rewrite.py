"""A small editable view of an IR for the passes: nodes as plain dicts in
topological order, a rename map applied to every edge and output, and a way
back to a validated ``BlueprintIR``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esper.ir import PARAMETERISED, BlueprintIR, IRNode, IRNodeType

# Nodes that own parameters, or randomness: two of them are never the same value.
NEVER_MERGE = PARAMETERISED | {IRNodeType.DROPOUT}
COMMUTATIVE = frozenset({IRNodeType.ADD, IRNodeType.MUL})


def attrs_key(node: IRNode, symbols: dict[str, str] | None = None) -> str:
    """The node's resolved attrs as canonical JSON (defaults filled); with
    ``symbols``, dim symbols inside list attrs (``reshape`` targets) are renamed."""
    attrs: dict[str, object] = dict(node.resolved_attrs)
    if symbols:
        for name, value in attrs.items():
            if isinstance(value, (tuple, list)):
                attrs[name] = [symbols.get(v, v) if isinstance(v, str) else v for v in value]
    return json.dumps(attrs, sort_keys=True, default=str)


def symbol_names(ir: BlueprintIR) -> dict[str, str]:
    """Dim symbols renamed by first appearance in the inputs, so that two graphs
    differing only in symbol names compare equal."""
    out: dict[str, str] = {}
    for inp in ir.inputs:
        for d in inp.shape:
            if isinstance(d, str) and d not in out:
                out[d] = f"S{len(out)}"
    return out


def live_nodes(nodes: Sequence[dict[str, Any]], outputs: Sequence[str]) -> list[dict[str, Any]]:
    """The nodes (as dicts) some output depends on, in their given order."""
    by_id = {n["id"]: n for n in nodes}
    live: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in live or name not in by_id:  # not a node: a graph input
            continue
        live.add(name)
        stack.extend(by_id[name]["inputs"])
    return [n for n in nodes if n["id"] in live]


@dataclass
class Rewrite:
    """Nodes kept so far (in topological order) and the renames decided so far."""

    ir: BlueprintIR
    nodes: list[dict[str, Any]] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        while name in self.rename:
            name = self.rename[name]
        return name

    def keep(self, node: IRNode, *, inputs: list[str] | None = None,
             attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keep ``node`` with its inputs renamed (or replaced) and attrs (or replaced)."""
        kept = {
            "id": node.id,
            "op": node.op.value,
            "inputs": inputs if inputs is not None else [self.resolve(i) for i in node.inputs],
            "attrs": dict(attrs if attrs is not None else node.attrs),
        }
        self.nodes.append(kept)
        return kept

    def may_drop(self, node: IRNode, replacement: str) -> bool:
        """Whether ``node`` can be replaced by ``replacement`` everywhere: not when
        both are outputs (an IR lists each output once), so there it stays."""
        return node.id not in self.ir.outputs or replacement not in self.outputs()

    def drop(self, node: IRNode, replacement: str) -> None:
        """Remove ``node``; its users read ``replacement`` instead."""
        self.rename[node.id] = replacement

    def outputs(self) -> list[str]:
        return [self.resolve(o) for o in self.ir.outputs]

    def live(self) -> list[dict[str, Any]]:
        """The kept nodes some output still depends on."""
        return live_nodes(self.nodes, self.outputs())

    def build(self) -> BlueprintIR:
        """The rewritten, validated IR; nodes left dead by the rewrite are dropped
        (a valid IR has none)."""
        data = self.ir.to_dict()
        data["nodes"] = self.live()
        data["outputs"] = self.outputs()
        return BlueprintIR.from_dict(data)
