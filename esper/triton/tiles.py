"""Tile programs: the small SSA language a fusion group lowers to before codegen.

Every value lives on a 2-D tile of ``rows x C`` (C = the group's static last dim,
rows = all leading dims flattened, symbolic). A value's *kind* says how it spans
the tile: ``full`` [rows, C], ``row`` [rows, 1], ``col`` [1, C] (a parameter such
as a bias), ``scalar`` [1, 1]. Binary ops broadcast by kind. One op table says
each op's arity and result kind; codegen and autodiff both read it. Nothing here
imports torch or triton."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("scalar", "row", "col", "full")


def join(a: str, b: str) -> str:
    """The kind of a broadcast between values of kinds ``a`` and ``b``."""
    if a == b:
        return a
    if a == "scalar":
        return b
    if b == "scalar":
        return a
    return "full"


def _same(*kinds: str) -> str:
    out = "scalar"
    for k in kinds:
        out = join(out, k)
    return out


def _rowreduce(k: str) -> str:
    return {"full": "row", "col": "scalar", "row": "row", "scalar": "scalar"}[k]


def _colreduce(k: str) -> str:
    return {"full": "col", "row": "scalar", "col": "col", "scalar": "scalar"}[k]


@dataclass(frozen=True)
class OpInfo:
    """Arity and result-kind rule of one tile op."""

    arity: int
    kind: Callable[..., str]


OPS: dict[str, OpInfo] = {
    # elementwise, forward
    **{u: OpInfo(1, _same) for u in (
        "neg", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "exp", "rsqrt", "recip",
    )},
    **{b: OpInfo(2, _same) for b in ("add", "sub", "mul", "div")},
    "mulc": OpInfo(1, _same),  # attr: float
    "addc": OpInfo(1, _same),  # attr: float
    # reductions over the last dim (stay in the row) and over rows (partial sums)
    "rsum": OpInfo(1, _rowreduce),
    "rmax": OpInfo(1, _rowreduce),  # attr "nograd": a stabiliser, not differentiated
    "csum": OpInfo(1, _colreduce),
    # backward helpers: (saved forward value, incoming grad) -> grad
    "relu_bwd": OpInfo(2, _same),
    "gelu_bwd": OpInfo(2, _same),
    "gelu_tanh_bwd": OpInfo(2, _same),
    "silu_bwd": OpInfo(2, _same),
    "sigmoid_bwd": OpInfo(2, _same),  # (y, g)
    "tanh_bwd": OpInfo(2, _same),  # (y, g)
    "rsqrt_bwd": OpInfo(2, _same),  # (y, g)
    "onehot_argmax": OpInfo(2, lambda x, m: "full" if "full" in (x, m) else join(x, m)),
    "expand": OpInfo(1, lambda k: "full"),
    "expand_col": OpInfo(1, lambda k: "col"),  # scalar -> col (a row-broadcast grad's sum)
}


@dataclass(frozen=True)
class Val:
    """One SSA value: op, argument value ids, kind, and an op attribute."""

    op: str
    args: tuple[int, ...]
    kind: str
    attr: Any = None


@dataclass
class TileProgram:
    """A straight-line tile program: loads of named inputs, ops, named outputs."""

    vals: list[Val] = field(default_factory=list)
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)
    outputs: list[tuple[str, int]] = field(default_factory=list)  # (name, value id)
    _memo: dict[tuple[Any, ...], int] = field(default_factory=dict, repr=False)

    def _add(self, v: Val) -> int:
        key = (v.op, v.args, v.kind, repr(v.attr))
        if key in self._memo:  # local CSE keeps recomputation in backward cheap
            return self._memo[key]
        self.vals.append(v)
        self._memo[key] = len(self.vals) - 1
        return len(self.vals) - 1

    def load(self, name: str, kind: str) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        for i, (n, _) in enumerate(self.inputs):
            if n == name:
                return self._add(Val("load", (), self.inputs[i][1], i))
        self.inputs.append((name, kind))
        return self._add(Val("load", (), kind, len(self.inputs) - 1))

    def const(self, value: float) -> int:
        return self._add(Val("const", (), "scalar", float(value)))

    def op(self, name: str, *args: int, attr: Any = None) -> int:
        info = OPS[name]
        if len(args) != info.arity:
            raise ValueError(f"tile op {name} takes {info.arity} args, got {len(args)}")
        kind = info.kind(*(self.vals[a].kind for a in args))
        return self._add(Val(name, tuple(args), kind, attr))

    def output(self, name: str, vid: int) -> None:
        self.outputs.append((name, vid))

    def kind(self, vid: int) -> str:
        return self.vals[vid].kind

    def live(self) -> list[bool]:
        """Which values the outputs need (dead-code elimination)."""
        need = [False] * len(self.vals)
        for _, vid in self.outputs:
            need[vid] = True
        for i in range(len(self.vals) - 1, -1, -1):
            if need[i]:
                for a in self.vals[i].args:
                    need[a] = True
        return need

    def has_col_reduction(self) -> bool:
        """Whether some live output is a partial sum over rows (col or scalar kind)."""
        return any(self.kind(v) in ("col", "scalar") for _, v in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "vals": [[v.op, list(v.args), v.kind, v.attr] for v in self.vals],
            "inputs": [list(x) for x in self.inputs],
            "outputs": [list(x) for x in self.outputs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TileProgram:
        prog = cls()
        prog.vals = [Val(op, tuple(args), kind, attr) for op, args, kind, attr in data["vals"]]
        prog.inputs = [(n, k) for n, k in data["inputs"]]
        prog.outputs = [(n, int(v)) for n, v in data["outputs"]]
        return prog
