"""Shape algebra over symbolic dims: broadcasting, matmul, reshape's ``-1``,
conv output sizes. Pure functions on tuples; they raise RuleError."""

from __future__ import annotations

from collections import Counter

from esper.ir.types import Dim, RuleError, Shape, fmt_shape


def axis(dim: int, rank: int, what: str = "dim") -> int:
    """Normalise a possibly negative axis into ``range(rank)``."""
    if not -rank <= dim < rank:
        raise RuleError(f"{what} {dim} is out of range for a rank-{rank} tensor")
    return dim + rank if dim < 0 else dim


def broadcast(a: Shape, b: Shape) -> Shape:
    """torch broadcasting, strict about symbols: a symbol matches itself or 1."""
    if a == b:
        return a
    la, lb = len(a), len(b)
    out: list[Dim] = []
    for i in range(1, max(la, lb) + 1):
        x = a[-i] if i <= la else 1
        y = b[-i] if i <= lb else 1
        if y in (x, 1):
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise RuleError(
                f"cannot broadcast {fmt_shape(a)} with {fmt_shape(b)}: "
                f"dim {-i} is {x!r} vs {y!r}"
            )
    out.reverse()
    return tuple(out)


def same_dim(x: Dim, y: Dim, what: str) -> None:
    if x != y:
        raise RuleError(f"{what}: {x!r} vs {y!r}")


def matmul(a: Shape, b: Shape) -> Shape:
    """torch.matmul's shape rule for operands of rank >= 1."""
    if not a or not b:
        raise RuleError(f"matmul needs operands of rank >= 1, got {fmt_shape(a)} @ {fmt_shape(b)}")
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise RuleError(
            f"matmul {fmt_shape(a)} @ {fmt_shape(b)}: contracted dims {a2[-1]!r} vs {b2[-2]!r}"
        )
    try:
        batch = broadcast(a2[:-2], b2[:-2])
    except RuleError as exc:
        raise RuleError(f"matmul {fmt_shape(a)} @ {fmt_shape(b)}: batch dims: {exc}") from None
    out = list(batch)
    if len(a) > 1:
        out.append(a2[-2])
    if len(b) > 1:
        out.append(b2[-1])
    return tuple(out)


def _monomial(shape: Shape) -> tuple[int, Counter[str]]:
    """A shape's element count as ``coefficient * product(symbols)``."""
    coeff = 1
    syms: Counter[str] = Counter()
    for d in shape:
        if isinstance(d, int):
            coeff *= d
        else:
            syms[d] += 1
    return coeff, syms


def reshape(src: Shape, target: Shape) -> Shape:
    """Solve ``target`` (ints >= 1, symbols of ``src``, at most one -1) against ``src``."""
    known = set(d for d in src if isinstance(d, str))
    for d in target:
        if isinstance(d, str) and d not in known:
            raise RuleError(
                f"reshape target names symbol {d!r}, which the input {fmt_shape(src)} lacks"
            )
    have_c, have_s = _monomial(src)
    fixed = tuple(d for d in target if d != -1)
    want_c, want_s = _monomial(fixed)
    if -1 not in target:
        if (have_c, have_s) != (want_c, want_s):
            raise RuleError(
                f"cannot reshape {fmt_shape(src)} to {fmt_shape(target)}: element counts differ"
            )
        return target
    left = have_s - want_s
    if want_s - have_s or have_c % want_c:
        raise RuleError(f"cannot reshape {fmt_shape(src)} to {fmt_shape(target)}: no -1 fits")
    rest_c = have_c // want_c
    rest_syms = sorted(left.elements())
    if not rest_syms:
        fill: Dim = rest_c
    elif rest_c == 1 and len(rest_syms) == 1:
        fill = rest_syms[0]
    else:
        expr = "*".join([str(rest_c)] * (rest_c != 1) + rest_syms)
        raise RuleError(
            f"cannot reshape {fmt_shape(src)} to {fmt_shape(target)}: -1 would be {expr}, "
            "which is not a single dim"
        )
    return tuple(fill if d == -1 else d for d in target)


def conv_out(size: Dim, k: int, stride: int, pad: int, dilation: int, *, what: str) -> Dim:
    """One spatial output size of a convolution (torch's formula, floor division)."""
    span = dilation * (k - 1) + 1
    if isinstance(size, str):
        # A symbol survives only when the output provably equals the input.
        if stride == 1 and 2 * pad == span - 1:
            return size
        raise RuleError(
            f"{what} is the symbol {size!r}, but this kernel/stride/padding changes it; "
            "make it a concrete int"
        )
    out = (size + 2 * pad - span) // stride + 1
    if out < 1:
        raise RuleError(f"{what} {size} is too small for kernel span {span} with padding {pad}")
    return out
