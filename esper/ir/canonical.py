"""The canonical form of a blueprint — itself a valid blueprint JSON — and its
sha256. Ids, file order, name, metadata and symbol names are erased; ops,
resolved attrs, edges (with operand order, except for commutative ops), input
schemas, output order and sharing are kept."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from esper.ir.frozen import thaw
from esper.ir.jsonio import dumps
from esper.ir.labelling import canonical_order
from esper.ir.ops import OPS

if TYPE_CHECKING:
    from esper.ir.blueprint import BlueprintIR
    from esper.ir.graph import Analysis
    from esper.ir.model import IRNode


def symbol_map(ir: BlueprintIR) -> dict[str, str]:
    """Symbols renamed ``S0, S1, …`` by first appearance in the (ordered) inputs."""
    out: dict[str, str] = {}
    for inp in ir.inputs:
        for d in inp.shape:
            if isinstance(d, str) and d not in out:
                out[d] = f"S{len(out)}"
    return out


def _attrs_json(node: IRNode, symbols: dict[str, str]) -> str:
    spec = OPS[node.op]
    if not spec.symbolic_attrs:
        cached = node.__dict__.get("_attrs_json")
        if cached is None:
            cached = node.__dict__["_attrs_json"] = dumps(thaw(node.resolved_attrs))
        return cached  # type: ignore[no-any-return]
    plain: dict[str, Any] = thaw(node.resolved_attrs)
    for name in spec.symbolic_attrs:
        plain[name] = [symbols.get(d, d) if isinstance(d, str) else d for d in plain[name]]
    return dumps(plain)


def canonical_json(ir: BlueprintIR, an: Analysis) -> str:
    """Compact canonical JSON; parsing it gives a blueprint with the same hash."""
    n_in = len(ir.inputs)
    symbols = symbol_map(ir)
    nodes = ir.nodes
    labels = [(node.op.value, _attrs_json(node, symbols)) for node in nodes]
    rank = {lab: i for i, lab in enumerate(sorted(set(labels)))}
    comm = [OPS[node.op].commutative for node in nodes]
    order = canonical_order(
        n_in,
        labels=[rank[lab] for lab in labels],
        commutative=comm,
        args=an.args,
        topo=an.order,
        outputs=an.outputs,
    )
    names = [f"x{i}" for i in range(n_in)] + [""] * len(nodes)
    pos = list(range(n_in)) + [0] * len(nodes)
    for k, j in enumerate(order):
        names[n_in + j] = f"n{k}"
        pos[n_in + j] = n_in + k
    parts = []
    for j in order:
        refs = an.args[j]
        if comm[j]:
            refs = tuple(sorted(refs, key=pos.__getitem__))
        op, attrs = labels[j]
        parts.append(
            f'{{"id":"{names[n_in + j]}","op":"{op}","inputs":['
            + ",".join(f'"{names[t]}"' for t in refs)
            + f'],"attrs":{attrs}}}'
        )
    inputs = [
        {
            "name": f"x{i}",
            "shape": [symbols[d] if isinstance(d, str) else d for d in inp.shape],
            "dtype": inp.dtype.value,
        }
        for i, inp in enumerate(ir.inputs)
    ]
    outputs = ",".join(f'"{names[t]}"' for t in an.outputs)
    return (
        f'{{"schema_version":1,"name":"","inputs":{dumps(inputs)},"nodes":['
        + ",".join(parts)
        + f'],"outputs":[{outputs}],"metadata":{{}}}}'
    )


def digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
