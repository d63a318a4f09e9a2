"""Reverse-mode differentiation of tile programs.

The backward program recomputes the forward values it needs from the saved group
inputs (cheap elementwise work instead of stored activations), then walks the
forward ops in reverse, applying one rule per op. A grad that reaches a
broadcast operand is reduced to the operand's kind: ``row`` grads sum over the
row, ``col``/``scalar`` grads become per-program partial sums over rows that the
launcher adds up (a bias grad costs no extra pass over memory)."""

from __future__ import annotations

from collections.abc import Callable

from esper.triton.tiles import TileProgram

GRAD_PREFIX = "grad_"


def reduce_to(p: TileProgram, g: int, kind: str) -> int:
    """Sum grad ``g`` down to an operand of ``kind`` (undo a broadcast)."""
    gk = p.kind(g)
    if gk == kind:
        return g
    if kind == "full":
        return p.op("expand", g)
    if kind == "row" and gk == "full":
        return p.op("rsum", g)
    if kind == "col":
        # a full grad sums over rows; a row-broadcast (or scalar) grad is the same
        # for every column: its sum over rows, broadcast along the columns
        if gk == "full":
            return p.op("csum", g)
        return p.op("expand_col", p.op("csum", g) if gk == "row" else g)
    if kind == "scalar":
        if gk in ("full", "col"):
            g = p.op("rsum", g)
        if p.kind(g) == "row":
            g = p.op("csum", g)
        return g
    raise NotImplementedError(f"cannot reduce a {gk} grad to a {kind} operand")


def _rank(kind: str) -> int:
    return {"scalar": 0, "row": 1, "col": 1, "full": 2}[kind]


# rule(p, args, y, g) -> grad contribution per arg (None: no grad to that arg)
Rule = Callable[[TileProgram, tuple[int, ...], int, int, object], list[int | None]]


def _bwd_helper(name: str, use_out: bool = False) -> Rule:
    def rule(p: TileProgram, a: tuple[int, ...], y: int, g: int, attr: object) -> list[int | None]:
        return [p.op(name, y if use_out else a[0], g)]

    return rule


RULES: dict[str, Rule] = {
    "add": lambda p, a, y, g, at: [g, g],
    "sub": lambda p, a, y, g, at: [g, p.op("neg", g)],
    "mul": lambda p, a, y, g, at: [p.op("mul", g, a[1]), p.op("mul", g, a[0])],
    "div": lambda p, a, y, g, at: [
        p.op("div", g, a[1]),
        p.op("neg", p.op("div", p.op("mul", g, y), a[1])),
    ],
    "neg": lambda p, a, y, g, at: [p.op("neg", g)],
    "mulc": lambda p, a, y, g, at: [p.op("mulc", g, attr=at)],
    "addc": lambda p, a, y, g, at: [g],
    "exp": lambda p, a, y, g, at: [p.op("mul", g, y)],
    "recip": lambda p, a, y, g, at: [p.op("neg", p.op("mul", g, p.op("mul", y, y)))],
    "relu": _bwd_helper("relu_bwd"),
    "gelu": _bwd_helper("gelu_bwd"),
    "gelu_tanh": _bwd_helper("gelu_tanh_bwd"),
    "silu": _bwd_helper("silu_bwd"),
    "sigmoid": _bwd_helper("sigmoid_bwd", use_out=True),
    "tanh": _bwd_helper("tanh_bwd", use_out=True),
    "rsqrt": _bwd_helper("rsqrt_bwd", use_out=True),
    "rsum": lambda p, a, y, g, at: [g],
    "rmax": lambda p, a, y, g, at: (
        [None] if at == "nograd" else [p.op("mul", p.op("onehot_argmax", a[0], y), g)]
    ),
}


def backward_program(fwd: TileProgram, needs_grad: list[bool] | None = None) -> TileProgram:
    """The backward tile program of ``fwd``.

    Inputs: every forward input (recomputation), then ``grad_<out>`` for every
    forward output. Outputs: ``grad_<in>`` for every forward input whose
    ``needs_grad`` is true, of that input's kind (partial sums for col/scalar)."""
    p = TileProgram()
    remap: dict[int, int] = {}
    for name, kind in fwd.inputs:
        p.load(name, kind)
    for i, v in enumerate(fwd.vals):
        if v.op == "load":
            remap[i] = p.load(*fwd.inputs[v.attr])
        elif v.op == "const":
            remap[i] = p.const(v.attr)
        else:
            remap[i] = p.op(v.op, *(remap[a] for a in v.args), attr=v.attr)

    adj: dict[int, int] = {}

    def accumulate(vid: int, g: int) -> None:
        adj[vid] = g if vid not in adj else p.op("add", adj[vid], g)

    for name, vid in fwd.outputs:
        accumulate(vid, p.load(GRAD_PREFIX + name, fwd.kind(vid)))

    for i in range(len(fwd.vals) - 1, -1, -1):
        v = fwd.vals[i]
        if i not in adj or v.op in ("load", "const"):
            continue
        rule = RULES.get(v.op)
        if rule is None:
            raise NotImplementedError(f"no derivative rule for tile op {v.op!r}")
        args = tuple(remap[a] for a in v.args)
        grads = rule(p, args, remap[i], adj[i], v.attr)
        for a, ga in zip(v.args, grads, strict=True):
            if ga is None or fwd.vals[a].op == "const":
                continue
            # Reduce only: a grad of a lower kind (a row grad of a full value)
            # broadcasts in later ops and is expanded once, at the output.
            down = _rank(p.kind(ga)) > _rank(fwd.kind(a))
            accumulate(a, reduce_to(p, ga, fwd.kind(a)) if down else ga)

    needs = needs_grad if needs_grad is not None else [True] * len(fwd.inputs)
    loads = {v.attr: i for i, v in enumerate(fwd.vals) if v.op == "load"}
    for idx, (name, kind) in enumerate(fwd.inputs):
        if not needs[idx]:
            continue
        src = loads.get(idx)
        if src is None or src not in adj:  # an input no output depends on
            g = p.op("mulc", p.load(name, kind), attr=0.0)
        else:
            g = reduce_to(p, adj[src], kind)
        p.output(GRAD_PREFIX + name, g)
    return p
