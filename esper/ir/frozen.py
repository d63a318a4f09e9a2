"""Immutable JSON values: written attrs are frozen so a frozen model stays frozen."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NoReturn

from esper.ir.types import RuleError


class FrozenDict(dict[str, Any]):
    """A ``dict`` that refuses mutation and hashes by content.

    It subclasses ``dict`` so ``json``, pydantic and ``isinstance(x, dict)``
    treat it as a plain object, while writes raise ``TypeError``.
    """

    __slots__ = ("_hash",)

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("attrs are immutable; build a new node instead")

    __setitem__ = __delitem__ = __ior__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        try:
            return self._hash
        except AttributeError:
            self._hash: int = hash(tuple(sorted(self.items())))
            return self._hash

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("FrozenDict is not picklable (no pickle in Esper)")


EMPTY = FrozenDict()


def freeze(value: Any, where: str = "") -> Any:
    """Return ``value`` as immutable JSON (lists → tuples, objects → FrozenDict).

    Raises RuleError for anything that is not JSON: sets, NaN, non-string keys;
    ``where`` prefixes the message.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RuleError(f"{where}{value!r} is not a finite JSON number")
        return value
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v, where) for v in value)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise RuleError(f"{where}object key {key!r} is not a string")
        return FrozenDict({k: freeze(v, where) for k, v in value.items()})
    raise RuleError(f"{where}{type(value).__name__} is not a JSON value")


def thaw(value: Any) -> Any:
    """Plain JSON (lists, dicts with sorted keys) of a frozen value, for output."""
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: thaw(value[k]) for k in sorted(value)}
    return value
