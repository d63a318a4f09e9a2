"""The canonical form of a blueprint — itself a valid blueprint JSON — and its
sha256. Ids, file order, name, metadata and symbol names are erased; ops,
resolved attrs, edges (with operand order, except for commutative ops), input
schemas, output order and sharing are kept."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
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


_SAFE = re.compile(r"[A-Za-z0-9_.\-]*\Z")


def _enc(v: Any) -> str:
    """JSON for a resolved attr value (bool, int, float, str, None, tuples)."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)  # what json.dumps writes for finite numbers
    if isinstance(v, str):
        return f'"{v}"' if _SAFE.match(v) else dumps(v)
    if isinstance(v, tuple):
        return "[" + ",".join([_enc(x) for x in v]) + "]"
    return dumps(thaw(v))


def attrs_json(attrs: Mapping[str, Any], renamed: tuple[str, ...] = (),
               symbols: Mapping[str, str] | None = None) -> str:
    """Resolved attrs as compact JSON, keys sorted; symbols in ``renamed`` attrs mapped."""
    parts = []
    for k in sorted(attrs):
        v = attrs[k]
        if k in renamed and symbols is not None:
            v = tuple([symbols.get(d, d) if isinstance(d, str) else d for d in v])
        parts.append(f'"{k}":{_enc(v)}')
    return "{" + ",".join(parts) + "}"


def node_tail(node: IRNode, symbols: Mapping[str, str]) -> str:
    """``],"attrs":{...}}`` — the part of a node's canonical JSON after its operands.

    Computed once per node when no attr names a symbol (see IRNode)."""
    tail = node.__dict__.get("_tail")
    if tail is None:
        spec = OPS[node.op]
        tail = '],"attrs":' + attrs_json(node.resolved_attrs, spec.symbolic_attrs, symbols) + "}"
    return tail  # type: ignore[no-any-return]


def canonical_json(ir: BlueprintIR, an: Analysis) -> str:
    """Compact canonical JSON; parsing it gives a blueprint with the same hash."""
    n_in = len(ir.inputs)
    symbols = symbol_map(ir)
    nodes = ir.nodes
    # A label is op + resolved attrs; its rank orders structurally different nodes.
    heads = [f'","op":"{node.op}","inputs":[' for node in nodes]
    tails = [node_tail(node, symbols) for node in nodes]
    labels = [h + t for h, t in zip(heads, tails, strict=True)]
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
    names = [f'"x{i}"' for i in range(n_in)] + [""] * len(nodes)
    pos = list(range(n_in)) + [0] * len(nodes)
    for k, j in enumerate(order):
        names[n_in + j] = f'"n{k}"'
        pos[n_in + j] = n_in + k
    args = an.args
    parts = []
    for j in order:
        refs = args[j]
        if comm[j]:
            refs = tuple(sorted(refs, key=pos.__getitem__))
        parts.append(
            '{"id":' + names[n_in + j][:-1] + heads[j] + ",".join([names[t] for t in refs])
            + tails[j]
        )
    inputs = [
        {
            "name": f"x{i}",
            "shape": [symbols[d] if isinstance(d, str) else d for d in inp.shape],
            "dtype": inp.dtype.value,
        }
        for i, inp in enumerate(ir.inputs)
    ]
    outputs = ",".join([names[t] for t in an.outputs])
    return (
        f'{{"schema_version":1,"name":"","inputs":{dumps(inputs)},"nodes":['
        + ",".join(parts)
        + f'],"outputs":[{outputs}],"metadata":{{}}}}'
    )


def digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
