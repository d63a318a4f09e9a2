"""The IR models' common base: frozen, extra="forbid", and pydantic's
ValidationError turned into IRValidationError that names the node and op."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from esper.errors import IRValidationError

_MAX_REPORTED = 3


def ir_error(message: str, node_id: str | None = None, op: str | None = None) -> IRValidationError:
    """An IRValidationError carrying ``node_id``/``op`` attributes for programs."""
    err = IRValidationError(message)
    err.node_id = node_id  # type: ignore[attr-defined]
    err.op = op  # type: ignore[attr-defined]
    return err


def node_error(node_id: str, op: Any, problem: str) -> IRValidationError:
    """``node 'h' (linear): <problem>`` — the one shape of a per-node error."""
    op_text = getattr(op, "value", op)
    return ir_error(f"node {node_id!r} ({op_text}): {problem}", node_id, str(op_text))


def _item(seq: Any, i: Any) -> Any:
    if isinstance(seq, Sequence) and not isinstance(seq, str) and isinstance(i, int):
        return seq[i] if -len(seq) <= i < len(seq) else None
    if isinstance(seq, Mapping):
        return seq.get(i)
    return None


def _where(loc: tuple[Any, ...], data: Any, model: str) -> tuple[str, tuple[Any, ...], Any]:
    """(who, remaining loc, raw object) for an error location."""
    raw_node: Any = None
    if model == "IRNode":
        raw_node, rest = data, loc
    elif model == "BlueprintIR" and len(loc) >= 2 and loc[0] == "nodes":
        raw_node, rest = _item(_item(data, "nodes"), loc[1]), loc[2:]
        if not isinstance(raw_node, Mapping):
            return f"node #{loc[1]}", rest, raw_node
    elif model == "BlueprintIR" and len(loc) >= 2 and loc[0] == "inputs":
        raw = _item(_item(data, "inputs"), loc[1])
        name = raw.get("name") if isinstance(raw, Mapping) else None
        who = f"input {name!r}" if isinstance(name, str) else f"input #{loc[1]}"
        return who, loc[2:], raw
    elif model == "IRInput" and isinstance(data, Mapping) and isinstance(data.get("name"), str):
        return f"input {data['name']!r}", loc, data
    else:
        return ("blueprint" if model == "BlueprintIR" else model), loc, data
    if isinstance(raw_node, Mapping):
        nid, op = raw_node.get("id"), raw_node.get("op")
        who = f"node {nid!r}" if isinstance(nid, str) else "node"
        if isinstance(op, str):
            who += f" ({op})"
        return who, rest, raw_node
    return "node", rest, raw_node


def _problem(err: Mapping[str, Any], rest: tuple[Any, ...]) -> str:
    kind, field = err["type"], ".".join(map(str, rest))
    if kind == "extra_forbidden":
        return f"unknown field {field!r}"
    if kind == "missing":
        return f"missing field {field!r}"
    if kind == "enum" and rest == ("op",):
        from esper.ir.types import IRNodeType

        known = ", ".join(t.value for t in IRNodeType)
        return f"unknown op {err['input']!r} (known ops: {known})"
    if kind == "literal_error" and rest == ("schema_version",):
        return f"unsupported schema_version {err['input']!r} (this Esper reads 1)"
    if kind == "model_type":
        got = type(err["input"]).__name__
        return f"expected a JSON object{' for ' + field if field else ''}, got {got}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{field}: {msg}" if field else msg


def translate(exc: ValidationError, data: Any, model: str) -> IRValidationError:
    """One IRValidationError for a pydantic ValidationError (ours re-raised as is)."""
    errors = exc.errors(include_url=False)
    for err in errors:
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, IRValidationError):
            return inner
    lines = []
    for err in errors[:_MAX_REPORTED]:
        who, rest, _ = _where(tuple(err["loc"]), data, model)
        lines.append(f"{who}: {_problem(err, rest)}")
    if len(errors) > _MAX_REPORTED:
        lines.append(f"(and {len(errors) - _MAX_REPORTED} more)")
    first = errors[0] if errors else None
    node_id = op = None
    if first is not None:
        _, _, raw = _where(tuple(first["loc"]), data, model)
        if isinstance(raw, Mapping) and model in ("IRNode", "BlueprintIR"):
            node_id = raw.get("id") if isinstance(raw.get("id"), str) else None
            op = raw.get("op") if isinstance(raw.get("op"), str) else None
    return ir_error("; ".join(lines), node_id, op)


class IRModel(BaseModel):
    """Frozen, no extra fields; construction raises IRValidationError only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise translate(exc, data, type(self).__name__) from None

    # Nested models are validated by pydantic-core directly: our __init__ only
    # wraps errors, so pydantic need not route nested construction through it.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise translate(exc, obj, cls.__name__) from None

    @classmethod
    def model_validate_json(cls, json_data: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as exc:
            raise translate(exc, None, cls.__name__) from None
