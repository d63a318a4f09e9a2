"""Map a submitted blueprint's node ids onto an artifact's. Artifacts ship the
optimised IR in canonical form (ids ``n0, n1, …``, inputs ``x0, …``), so every
equivalent submission gets byte-identical files; validators and users who hold
the *submitted* IR use ``artifact_param_map``/``params_for`` to find its
parameters in an artifact's module (e.g. to evaluate the submitted IR in float64
with the module's own weights)."""

from __future__ import annotations

from typing import Any

import torch

from esper.compile.params import BlueprintModule, param_key, param_keys
from esper.compile.passes import optimize
from esper.compile.passes.rewrite import COMMUTATIVE, attrs_key, symbol_names
from esper.errors import CompileError
from esper.ir import BlueprintIR

_COMMUTATIVE_PORT = -1


def _colours(irs: tuple[BlueprintIR, ...]
             ) -> tuple[list[dict[str, int]], list[dict[str, str]]]:
    """Colour refinement run on both graphs with one shared palette: equal colours
    are indistinguishable by op, attrs, operands, consumers and output position.
    Also returns each node's symbol-normalised attrs key."""
    palette: dict[Any, int] = {}

    def paint(sig: Any) -> int:
        return palette.setdefault(sig, len(palette))

    colours: list[dict[str, int]] = []
    keys: list[dict[str, str]] = []
    for ir in irs:
        symbols = symbol_names(ir)
        keys.append({n.id: attrs_key(n, symbols) for n in ir.nodes})
        col = {i.name: paint(("in", k)) for k, i in enumerate(ir.inputs)}
        col.update({n.id: paint((n.op.value, keys[-1][n.id])) for n in ir.nodes})
        colours.append(col)
    consumers = []
    for ir in irs:
        uses: dict[str, list[tuple[str, int]]] = {i.name: [] for i in ir.inputs}
        uses.update({n.id: [] for n in ir.nodes})
        for n in ir.nodes:
            for port, src in enumerate(n.inputs):
                uses[src].append((n.id, _COMMUTATIVE_PORT if n.op in COMMUTATIVE else port))
        consumers.append(uses)
    rounds = max(len(ir.nodes) + len(ir.inputs) for ir in irs) + 1
    for _ in range(rounds):
        classes = sum(len(set(col.values())) for col in colours)
        new_colours = []
        for ir, col, uses in zip(irs, colours, consumers, strict=True):
            outs = {name: k for k, name in enumerate(ir.outputs)}
            inputs = {i.name for i in ir.inputs}
            new: dict[str, int] = {}
            for name in col:
                node = None if name in inputs else ir.node(name)
                operands: tuple[int, ...] = ()
                if node is not None:
                    operands = tuple(col[i] for i in node.inputs)
                    if node.op in COMMUTATIVE:
                        operands = tuple(sorted(operands))
                users = tuple(sorted((col[c], port) for c, port in uses[name]))
                new[name] = paint((col[name], operands, users, outs.get(name)))
            new_colours.append(new)
        colours = new_colours
        if sum(len(set(col.values())) for col in colours) == classes:
            break  # the partition is stable
    return colours, keys


def match_nodes(src: BlueprintIR, dst: BlueprintIR) -> dict[str, str]:
    """An isomorphism from ``src``'s names to ``dst``'s (inputs by position, nodes by
    structure, outputs in order). Raises CompileError when the graphs differ."""
    if len(src.inputs) != len(dst.inputs) or len(src.nodes) != len(dst.nodes):
        raise CompileError(f"blueprints {src.name!r} and {dst.name!r} are not the same graph")
    (col_src, col_dst), (key_src, key_dst) = _colours((src, dst))
    mapping = {a.name: b.name for a, b in zip(src.inputs, dst.inputs, strict=True)}
    by_colour: dict[int, list[str]] = {}
    for n in dst.nodes:
        by_colour.setdefault(col_dst[n.id], []).append(n.id)
    order = src.topological_order()
    used: set[str] = set()

    def fits(a_id: str, b_id: str) -> bool:
        a, b = src.node(a_id), dst.node(b_id)
        if a.op != b.op or key_src[a_id] != key_dst[b_id]:
            return False
        mapped = [mapping[i] for i in a.inputs]
        if a.op in COMMUTATIVE:
            return sorted(mapped) == sorted(b.inputs)
        return mapped == list(b.inputs)

    def search(k: int) -> bool:
        if k == len(order):
            return all(mapping[o] == d for o, d in zip(src.outputs, dst.outputs, strict=True))
        a_id = order[k].id
        for b_id in by_colour.get(col_src[a_id], []):
            if b_id in used or not fits(a_id, b_id):
                continue
            mapping[a_id] = b_id
            used.add(b_id)
            if search(k + 1):
                return True
            used.discard(b_id)
            del mapping[a_id]
        return False

    if len(src.outputs) != len(dst.outputs) or not search(0):
        raise CompileError(f"blueprints {src.name!r} and {dst.name!r} are not the same graph")
    return mapping


def artifact_param_map(submitted: BlueprintIR, artifact_ir: BlueprintIR) -> dict[str, str]:
    """Parameter key in ``submitted`` -> parameter key in a module built from
    ``artifact_ir`` (an artifact's ``ir.json``). Every parameter maps: the passes
    never drop or merge parameterised nodes an output needs."""
    optimised = optimize(submitted)
    ids = match_nodes(optimised, artifact_ir)
    return {param_key(node_id, name): param_key(ids[node_id], name)
            for node_id, name in param_keys(optimised)}


def params_for(submitted: BlueprintIR, module: BlueprintModule) -> dict[str, torch.Tensor]:
    """``module``'s parameters keyed as ``submitted`` would key them, ready for
    ``evaluate(submitted, inputs, params_for(submitted, module))``."""
    mapping = artifact_param_map(submitted, module.ir)
    return {ours: module.params[theirs] for ours, theirs in mapping.items()}

