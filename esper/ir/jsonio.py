"""Strict JSON in, deterministic JSON out. Python's json accepts NaN and
silently keeps the last of duplicate keys; a blueprint must do neither."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from esper.ir.base import ir_error


class _DuplicateKey(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)


def loads(text: str | bytes | bytearray) -> Any:
    """Parse JSON text (bytes must be UTF-8), raising IRValidationError."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ir_error(f"blueprint JSON must be str or bytes, got {type(text).__name__}")
    try:
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8-sig")
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ir_error(
            f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ir_error(f"malformed JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except _DuplicateKey as exc:
        raise ir_error(f"malformed JSON: duplicate key {exc.args[0]!r} in an object") from None
    except ValueError as exc:  # NaN / Infinity, via _constant
        raise ir_error(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ir_error("malformed JSON: nested too deeply") from None


def dumps(value: Any, indent: int | None = None) -> str:
    """Deterministic JSON: fixed separators, no NaN, non-ASCII kept as is."""
    if indent is None:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False)
