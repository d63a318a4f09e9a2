"""Attr specs: each attr's default and a parser that validates and normalises
the written value (``kernel_size: 3`` → ``(3, 3)``). Parsers raise RuleError."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.ir.frozen import FrozenDict
from esper.ir.types import SYMBOL_RE, RuleError

Parser = Callable[[Any], Any]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class AttrSpec:
    """One attr of one op: name, written default (REQUIRED if none), parser, one-line doc."""

    name: str
    parse: Parser
    default: Any = REQUIRED
    doc: str = ""
    resolved_default: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        value = REQUIRED if self.default is REQUIRED else self.parse(self.default)
        object.__setattr__(self, "resolved_default", value)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def resolve(specs: Mapping[str, AttrSpec], written: Mapping[str, Any]) -> FrozenDict:
    """Fill defaults and normalise every attr; reject unknown and missing ones."""
    for name in written:
        if name not in specs:
            takes = ", ".join(specs) or "no attrs"
            raise RuleError(f"unknown attr {name!r} (takes: {takes})")
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if name in written:
            try:
                out[name] = spec.parse(written[name])
            except RuleError as exc:
                raise RuleError(f"attr {name!r}: {exc}") from None
        elif spec.default is REQUIRED:
            raise RuleError(f"missing required attr {name!r}")
        else:
            out[name] = spec.resolved_default
    return FrozenDict(out)


# --- parsers -----------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int | None = None) -> Parser:
    def parse(v: Any) -> int:
        if not _is_int(v):
            raise RuleError(f"expected an integer, got {v!r}")
        if lo is not None and v < lo:
            raise RuleError(f"must be >= {lo}, got {v}")
        return int(v)

    return parse


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise RuleError(f"expected true or false, got {v!r}")
    return v


def choice(*values: str) -> Parser:
    def parse(v: Any) -> str:
        if v not in values or not isinstance(v, str):
            raise RuleError(f"expected one of {', '.join(map(repr, values))}; got {v!r}")
        return v

    return parse


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Parser:
    """A finite number in [lo, hi) (or (lo, hi) with lo_open), normalised to float."""

    def parse(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RuleError(f"expected a number, got {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise RuleError(f"expected a finite number, got {v!r}")
        if lo is not None and (f < lo or (lo_open and f == lo)):
            raise RuleError(f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
        if hi is not None and f >= hi:
            raise RuleError(f"must be < {hi}, got {v!r}")
        return f

    return parse


def optional(inner: Parser) -> Parser:
    def parse(v: Any) -> Any:
        return None if v is None else inner(v)

    return parse


def pair(lo: int) -> Parser:
    """An int or ``[a, b]`` of ints >= lo, normalised to a 2-tuple."""
    one = integer(lo)

    def parse(v: Any) -> tuple[int, int]:
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise RuleError(f"expected an int or a pair, got {list(v)!r}")
            return (one(v[0]), one(v[1]))
        x = one(v)
        return (x, x)

    return parse


def padding(v: Any) -> tuple[int, int] | str:
    """conv padding: int, pair, ``"same"`` or ``"valid"`` (→ ``(0, 0)``)."""
    if v == "valid" and isinstance(v, str):
        return (0, 0)
    if v == "same" and isinstance(v, str):
        return "same"
    if isinstance(v, str):
        raise RuleError(f"expected an int, a pair, 'same' or 'valid'; got {v!r}")
    return pair(0)(v)


def int_list(lo: int, allow_scalar: bool = True, allow_empty: bool = False) -> Parser:
    """A list of ints >= lo (or one int, when allow_scalar) as a tuple."""
    one = integer(lo)

    def parse(v: Any) -> tuple[int, ...]:
        if isinstance(v, (list, tuple)):
            if not v and not allow_empty:
                raise RuleError("expected a non-empty list")
            return tuple(one(x) for x in v)
        if allow_scalar:
            return (one(v),)
        raise RuleError(f"expected a list of integers, got {v!r}")

    return parse


def _unique(values: tuple[int, ...]) -> tuple[int, ...]:
    if len(set(values)) != len(values):
        raise RuleError(f"repeats a dim: {list(values)!r}")
    return values


def reduce_dims(v: Any) -> tuple[int, ...] | None:
    """Reduction dims: null (all), an int, or a list of distinct ints."""
    if v is None:
        return None
    return _unique(int_list(-(2**31))(v))


def permutation(v: Any) -> tuple[int, ...]:
    return _unique(int_list(-(2**31), allow_scalar=False, allow_empty=True)(v))


def reshape_target(v: Any) -> tuple[int | str, ...]:
    """A reshape target: ints >= 1, symbols, and at most one -1."""
    if not isinstance(v, (list, tuple)):
        raise RuleError(f"expected a list of dims, got {v!r}")
    out: list[int | str] = []
    for d in v:
        if isinstance(d, str) and SYMBOL_RE.match(d):
            out.append(d)
        elif _is_int(d) and (d >= 1 or d == -1):
            out.append(int(d))
        else:
            raise RuleError(f"{d!r} is not an int >= 1, -1 or a symbol")
    if out.count(-1) > 1:
        raise RuleError(f"at most one -1 allowed, got {list(v)!r}")
    return tuple(out)


INIT = AttrSpec(
    "init",
    choice("default", "zeros", "normal"),
    "default",
    "parameter init: torch's own, all zeros (function-preserving), or N(0, 0.02) weights",
)
